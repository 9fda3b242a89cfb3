"""The restic storage format wired into the engine's operations (issue 16).

``storage.format: restic`` makes a backup stream each payload of its kind into the job's
restic repository (engine/restic.py, ``<prefix>/_restic/<job>``) instead of an age archive;
the engine manifest, written last into ``<prefix>/<job>/<backup-id>/`` as for archives, names
the snapshots and records the size and SHA-256 of every streamed payload.

Reading follows the manifest, not the option: a manifest with ``storage_format: restic`` is
read through ``restic dump`` (:class:`ResticPayloadStream`, checked against the manifest's
size and SHA-256 like an archive's object), so listings, verification, restores and prune
work on a location holding both formats. The repository password comes from the storage
options the Storage was built from (``storage.location.build_storage`` keeps them).

Standard library only (no Ansible imports).
"""

import datetime
import hashlib

from . import manifest as mf
from .errors import ConfigError, IntegrityError, NotFoundError, ObjectMismatchError, StorageError
from .restic import FORMAT_NAME, REPOSITORY_DIR, ResticRepository, job_repository_options, manifest_snapshots
from .storage.base import is_unfinished

ARCHIVE = "archive"
RESTIC = FORMAT_NAME
# Seconds a command waits for a live lock of the same job's repository before it is refused:
# a verification's restic check (exclusive in restic 0.14) or a prune must not make the next
# scheduled backup fail at once; one that holds the lock longer is refused with its holder named.
LOCK_WAIT = 600
# Set by the runner only (set_lock_check): who is asked whether the pod holding a lock has
# finished (podlocks.PodLockHolders, None outside a pod) and where a lock removed that way is
# reported (its log). A module never asks: run in some other pod (an AWX execution environment),
# its namespace is not the backup jobs'.
_LOCK_CHECK = {"holders": None, "notice": None}


def set_lock_check(holders, notice):
    """Let this process's repositories ask ``holders`` about lock holders, reporting to ``notice``."""
    _LOCK_CHECK.update(holders=holders, notice=notice)


# Kinds whose payloads are streams the restic format can hold (one snapshot per payload). A
# files backup streams its whole tree as the engine's pax tar every time: restic stores only
# the chunks it has not seen, so the tar of an unchanged tree adds (almost) nothing, and the
# restore keeps the files target's checks (index, per-file SHA-256, staging) unchanged.
STREAM_KINDS = ("postgres", "redis", "k8s_resources", "config_git", "files")


def storage_format_of(options):
    """The ``format`` of the storage options ``options`` (archive when unset)."""
    return (options or {}).get("format") or ARCHIVE


def storage_format(storage):
    """The ``format`` storage option of the location ``storage`` was built from."""
    return storage_format_of(storage.location_options)


def is_restic(manifest):
    return mf.Manifest.wrap(manifest).storage_format == RESTIC


# Why the other kinds stay archives: said in the refusal, so that nobody waits for them.
_NOT_RESTIC = {
    "directory_sync": "a directory sync stores only its sync record (the mirror is the destination directory "
                      "itself), so there is nothing to deduplicate",
    "velero": "a Velero job stores only the Backup object it submitted (Velero keeps the data in its own "
              "storage), so there is nothing to deduplicate",
    "postgres_wal": "PostgreSQL fetches WAL one segment at a time during a recovery, and every segment is new "
                    "data: a restic start per segment would slow recovery and deduplicate nothing",
    "postgres_base": "point-in-time recovery plans its restore from archive-format base backups and WAL (not "
                     "built for the restic format)",
}


def check_kind(kind, job, source_options=None):
    """ConfigError unless backups of ``kind`` with ``source_options`` can be stored in the restic format."""
    if kind not in STREAM_KINDS:
        why = _NOT_RESTIC.get(kind)
        raise ConfigError("job %s: kind %s cannot be stored in the restic format (storage.format: restic)%s; "
                          "the restic format holds the kinds %s: keep this job in the archive format"
                          % (job, kind, ": " + why if why else "", ", ".join(STREAM_KINDS)))
    if kind == "files" and (source_options or {}).get("incremental") is True:
        # A chain would need its parents' tars to restore; the repository already keeps only
        # what changed, so every restic files backup is whole and restores on its own.
        raise ConfigError("job %s: source.incremental cannot be used with storage.format restic: every files "
                          "backup in the restic format is a whole tree of which restic stores only the new "
                          "data; set source.incremental false (or keep the job in the archive format)" % job)


def repository(storage, job):
    """The ResticRepository of ``job`` at the location of ``storage`` (one per storage and job)."""
    options = storage.location_options
    if options is None:
        raise ConfigError("job %s is stored in the restic format, but this location was not opened from "
                          "storage options (no repository password)" % job)
    password = options.get("restic_password")
    if not password:
        raise ConfigError("job %s has backups in the restic format: give storage.restic_password or "
                          "restic_password_file (restic_password_env in a runner job file) to read them" % job)
    cache = storage.__dict__.setdefault("_restic_repositories", {})
    if job not in cache:
        cache[job] = ResticRepository(job_repository_options(options, job), password, lock_wait=LOCK_WAIT,
                                      lock_holders=_LOCK_CHECK["holders"], notice=_LOCK_CHECK["notice"])
    return cache[job]


def read_data_subset(storage):
    """The ``restic_read_data_subset`` storage option (None: ``restic check`` of the structure only)."""
    return (storage.location_options or {}).get("restic_read_data_subset")


def _where(manifest, obj):
    return "restic snapshot %s (%s of backup %s/%s)" % (
        (obj.restic_snapshot or "?")[:12], obj.payload, manifest.job, manifest.id)


class ResticPayloadStream:
    """The plaintext of one payload of a restic-format backup, read by ``restic dump``.

    Same protocol as pipeline.PlaintextStream: read to EOF, then ``finish()`` proves that size
    and SHA-256 are those the manifest recorded at backup time (ObjectMismatchError, an
    IntegrityError, otherwise); restic's own failures on damaged data are IntegrityErrors.
    """

    def __init__(self, storage, manifest, payload_name):
        manifest = mf.Manifest.wrap(manifest)
        obj = manifest.payload_object(payload_name)
        if obj is None:
            raise IntegrityError("backup %s has no payload %s" % (manifest.id, payload_name))
        snapshot = obj.restic_snapshot
        if snapshot not in manifest_snapshots(manifest):
            raise IntegrityError("backup %s: payload %s names no restic snapshot of its manifest"
                                 % (manifest.id, payload_name))
        self._expected = obj
        self._where = _where(manifest, obj)
        self._reader = repository(storage, manifest.job).open_dump(snapshot, obj.name)
        self._sha256 = hashlib.sha256()
        self.plain_bytes = 0
        self._ended = False

    def read(self, size=1 << 20):
        data = self._reader.read(size)
        if data:
            self._sha256.update(data)
            self.plain_bytes += len(data)
        else:
            self._ended = True
        return data

    def finish(self):
        while not self._ended:
            self.read(1 << 20)
        if self.plain_bytes != self._expected.size:
            raise ObjectMismatchError(self._where, "size", self._expected.size, self.plain_bytes)
        digest = self._sha256.hexdigest()
        if digest != self._expected.sha256:
            raise ObjectMismatchError(self._where, "sha256", self._expected.sha256, digest)
        return {"name": self._expected.name, "size": self.plain_bytes, "sha256": digest,
                "plain_bytes": self.plain_bytes}

    def close(self):
        self._reader.close()


def verify_objects(storage, manifest, clock=None, declared=frozenset()):
    """integrity.verify_objects for a restic-format backup: every payload dumped and checked
    against its size and SHA-256 (the declared ones of a one-pass restore are only looked up:
    their snapshot must exist and their stream is checked as the target reads it)."""
    manifest = mf.Manifest.wrap(manifest)
    seen = set()
    details = []
    repo = repository(storage, manifest.job)
    snapshots = manifest_snapshots(manifest)
    section = manifest.restic
    config = repo.config()
    if section.get("repository_id") and config.get("id") != section["repository_id"]:
        raise IntegrityError("backup %s was written to restic repository %s, but %s is repository %s (foreign "
                             "or re-created repository)"
                             % (manifest.id, section["repository_id"], repo.url, config.get("id")))
    for obj in manifest.objects:
        if not obj.payload or obj.name in seen:
            raise IntegrityError("backup %s: malformed restic object entry %s" % (manifest.id, obj.name))
        seen.add(obj.name)
        if obj.restic_snapshot not in snapshots:
            raise IntegrityError("backup %s: payload %s names no snapshot" % (manifest.id, obj.payload))
        if (manifest.id, obj.payload) in declared:
            if not repo.has_snapshot(obj.restic_snapshot):
                raise IntegrityError("%s is missing from %s" % (_where(manifest, obj), repo.url))
            details.append({"name": obj.name, "payload": obj.payload, "size": obj.size, "pending": True})
            continue
        stream = ResticPayloadStream(storage, manifest, obj.payload)
        try:
            while True:
                data = stream.read(1 << 20)
                if not data:
                    break
                if clock is not None:
                    clock.advance(len(data))
            report = stream.finish()
        finally:
            stream.close()
        report["payload"] = obj.payload
        details.append(report)
    if not details:
        raise IntegrityError("backup %s lists no payload object" % manifest.id)
    prefix = "%s/%s/" % (manifest.job, manifest.id)
    for info in storage.list(prefix):
        name = info.key[len(prefix):]
        if name not in (mf.MANIFEST_NAME, mf.VERIFICATION_NAME) and not is_unfinished(name):
            raise IntegrityError("%s is stored in restic-format backup %s, which keeps its data in restic "
                                 "(manifest edited, or a foreign object)" % (info.key, manifest.id))
    return details


def check_repository(storage, job, full=False):
    """``restic check`` of ``job``'s repository with the configured read-data subset (``full``:
    all pack data unless a subset is configured, as drills and test restores do); returns
    ``{"read_data_subset", "output"}``; IntegrityError when restic finds errors."""
    subset = read_data_subset(storage) or ("all" if full else None)
    output = repository(storage, job).check(subset)
    return {"read_data_subset": subset, "output": output[-5:]}


def uses_restic(storage, manifests):
    """Whether ``manifests`` (a job's) or the location's ``format`` option involve restic."""
    return storage_format(storage) == RESTIC or any(is_restic(manifest) for manifest in manifests)


def plan_repository_prune(storage, job, manifests, pruned_ids, grace, now, keep_ids=frozenset()):
    """What a prune of ``job`` removes from its restic repository: the snapshots of the pruned
    backups, and snapshots tagged with a backup id that has no manifest (a runner killed between
    snapshot and manifest) once the newest snapshot of that backup is older than ``grace``
    (except those of ``keep_ids``; a copy made by restic copy counts from when it was stored).

    Also the duplicates of a kept backup: snapshots tagged with its id that its manifest does not
    name, once older than ``grace``, and only while every snapshot the manifest names is there.
    Two copy runs racing into one destination both copy a backup's snapshots (each restic copy
    sees none there yet); the manifest published last names one set, the other set is never read.
    Returns ``(repository, plan)``; ``plan`` is ``{"forget": [ids], "orphan_snapshots": [{id,
    backup_id, time}], "duplicate_snapshots": [{id, backup_id, time}], "waiting": n, "present":
    [every snapshot id listed]}`` (``present`` for the re-check before ``forget``)."""
    repo = repository(storage, job)
    manifests = [mf.Manifest.wrap(manifest) for manifest in manifests]
    complete = {manifest.id for manifest in manifests} | set(keep_ids)
    forget = []
    named = {}
    for manifest in manifests:
        if manifest.id in pruned_ids and is_restic(manifest):
            forget.extend(manifest_snapshots(manifest))
        elif is_restic(manifest) and manifest.id not in keep_ids and manifest.verification_result != "failed":
            named[manifest.id] = _named_snapshots(manifest)
    try:
        snapshots = repo.snapshots({"job": job})
    except NotFoundError:
        if forget:
            raise IntegrityError("job %s has restic-format backups to prune, but there is no restic repository at "
                                 "%s" % (job, repo.url)) from None
        snapshots = []  # format restic, no backup taken yet
    # A backup's snapshots are judged together, by the newest of them: a postgres backup writes
    # its globals snapshot long before its dump's, and only then its manifest. A snapshot whose
    # time cannot be read waits (it is never taken for old).
    present = {snap["id"] for snap in snapshots}
    candidates, duplicates = {}, {}
    for snap in snapshots:
        backup_id = snap["tag_map"].get("backup_id")
        if not backup_id or snap["id"] in forget:
            continue
        if backup_id in named:
            # Only while the named snapshots are all there: forgetting a duplicate must never
            # take the last readable copy of a backup. (None: a manifest naming malformed ids.)
            if named[backup_id] and snap["id"] not in named[backup_id] and named[backup_id] <= present:
                duplicates.setdefault(backup_id, []).append(snap)
            continue
        if backup_id in complete:
            continue
        candidates.setdefault(backup_id, []).append(snap)
    arrivals = {}
    if any(snap.get("original") for group in (candidates, duplicates) for snaps in group.values() for snap in snaps):
        # A copy (restic copy, the offsite copy) keeps its source's time; it may have arrived a
        # moment ago for a copy run about to publish its manifest, so it ages from its arrival.
        try:
            arrivals = repo.snapshot_arrivals()
        except (StorageError, ConfigError):
            pass  # unknown arrival: the copies wait
    # A backup's orphans age together, by the newest of them; duplicates one by one, each is whole.
    groups = [("orphan_snapshots", backup_id, snaps) for backup_id, snaps in sorted(candidates.items())]
    groups += [("duplicate_snapshots", backup_id, [snap])
               for backup_id, snaps in sorted(duplicates.items()) for snap in snaps]
    aged = {"orphan_snapshots": [], "duplicate_snapshots": []}
    waiting = 0
    for kind, backup_id, snaps in groups:
        moments = [_snapshot_time(snap) if not snap.get("original")
                   else _later(_snapshot_time(snap), arrivals.get(snap["id"])) for snap in snaps]
        if any(moment is None for moment in moments) or now - max(moments) < grace:
            waiting += len(snaps)
            continue
        aged[kind].extend({"id": snap["id"], "backup_id": backup_id, "time": snap.get("time")} for snap in snaps)
    return repo, dict(aged, forget=sorted(set(forget)), waiting=waiting, present=sorted(present))


def _named_snapshots(manifest):
    """Every snapshot id a kept restic manifest names (``restic.snapshots`` too), or None when
    it names a malformed one: that backup's snapshots are then left alone, not the prune stopped."""
    try:
        found = set(manifest_snapshots(manifest))
    except IntegrityError:
        return None
    section = manifest.get("restic")
    listed = section.get("snapshots") if isinstance(section, dict) else None
    if isinstance(listed, list):
        found.update(snap for snap in listed if isinstance(snap, str))
    return found


def _still_a_duplicate(storage, job, entry, present):
    """Whether the duplicate ``entry`` is still one now, by the manifest as stored (a copy run may
    have published one since the plan, or the plan read a stale index entry): the manifest is
    there, does not name this snapshot, and every snapshot it names was in the repository."""
    key = mf.object_key(job, entry["backup_id"], mf.MANIFEST_NAME)
    try:
        named = _named_snapshots(mf.loads(storage.get_bytes(key), key))
    except (NotFoundError, IntegrityError):
        return False   # gone or unreadable: leave its snapshots to the orphan rule or to a person
    return bool(named) and entry["id"] not in named and named <= present


def _later(first, second):
    """The later of two moments; None when either is unknown."""
    return None if first is None or second is None else max(first, second)


def _snapshot_time(snap):
    from .restic import _parse_time  # pylint: disable=import-outside-toplevel
    return _parse_time(snap.get("time"))


def prune_pending_key(job):
    """Where a prune notes that ``restic prune`` of ``job``'s repository is still owed: written
    before ``forget``, removed after ``restic prune`` succeeded (beside the repository, which
    the catalog skips)."""
    return "%s/%s.prune-pending" % (REPOSITORY_DIR, job)


def prune_repository(storage, job, repo, plan, dry_run, log):
    """Forget the planned snapshots and let restic delete the data nobody references; returns
    the report merged into prune's result (``restic``).

    ``restic prune`` also runs with nothing to forget when an earlier prune forgot snapshots but
    did not finish (its note is still there), so the space it freed is reclaimed. Snapshots
    without a manifest are looked at once more just before ``forget``: a backup that published
    its manifest since the plan keeps them."""
    pending = storage.exists(prune_pending_key(job))
    orphans, duplicates = plan["orphan_snapshots"], plan.get("duplicate_snapshots", [])
    if not dry_run:
        orphans = [entry for entry in orphans
                   if not storage.exists(mf.object_key(job, entry["backup_id"], mf.MANIFEST_NAME))]
        present = set(plan.get("present", ()))
        duplicates = [entry for entry in duplicates if _still_a_duplicate(storage, job, entry, present)]
    ids = plan["forget"] + [entry["id"] for entry in orphans + duplicates]
    report = {"repository": repo.describe(), "forgotten": [] if dry_run else ids,
              "would_forget": ids if dry_run else [], "orphan_snapshots": orphans,
              "duplicate_snapshots": duplicates,
              "orphan_snapshots_waiting": plan["waiting"], "pruned": False,
              "prune_pending": pending}
    if dry_run or not (ids or pending):
        return report
    storage.put_bytes(prune_pending_key(job), b"restic forget ran; restic prune is owed\n")
    if ids:
        repo.forget(ids)
        log("forgot %d restic snapshots (%d of pruned backups, %d without a manifest, %d duplicates of kept backups)"
            % (len(ids), len(plan["forget"]), len(orphans), len(duplicates)))
    report["prune_output"] = repo.prune()[-5:]
    storage.delete(prune_pending_key(job))
    report["pruned"] = True
    report["prune_pending"] = False
    log("restic prune of %s done" % repo.describe())
    return report


def share_password(source, destination):
    """A copy destination opened without a restic password takes the source's: the job's copies
    then open with the job's password unless the destination names its own."""
    options = destination.location_options
    given = (source.location_options or {}).get("restic_password")
    if options is not None and given and not options.get("restic_password"):
        destination.location_options = dict(options, restic_password=given)


ABANDONED_KEY_SECONDS = 600


def _drop_abandoned_keys(storage, repository):
    """Keys of a repository whose init never wrote its config (a copy killed between the two):
    each wraps a master key no config belongs to, and restic, which stops at the first key the
    password opens, could pick one and fail. Only keys older than ABANDONED_KEY_SECONDS go: a
    younger one may belong to an init that is running now."""
    if storage.exists(repository + "config"):
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    for info in storage.list(repository + "keys/"):
        if info.modified is not None and (now - info.modified).total_seconds() > ABANDONED_KEY_SECONDS:
            storage.delete(info.key)


def copy_snapshots(source, destination, job, manifests):
    """Copy the restic snapshots of ``manifests`` (restic-format backups of ``job``) from the
    job's repository at ``source`` into its repository at ``destination`` (two Storage objects,
    each with its own credentials and repository password), one ``restic copy`` per backup.

    restic writes the destination through a RepositoryServer on loopback, which stores through
    the destination's Storage (restic 0.14 would take both locations' S3 credentials from one
    environment). Returns ``(copied, failed, config)``: ``copied`` maps each backup id copied
    whole to ``(snapshot ids source -> destination, bytes stored)``, ``failed`` each other backup
    id to its error, ``config`` the destination repository's config (``id``, ``version``).
    A live lock stops the run (every backup not yet copied fails with it) rather than waiting
    ``lock_wait`` once per backup. Nothing of the engine's catalog is written here: the caller
    publishes the manifests."""
    from .restichttp import RepositoryServer  # pylint: disable=import-outside-toplevel
    from .restic import RepositoryLockedError  # pylint: disable=import-outside-toplevel
    source_repo = repository(source, job)
    destination_repo_options = job_repository_options(destination.location_options or {}, job)
    password = (destination.location_options or {}).get("restic_password")
    if not password:
        raise ConfigError("job %s has backups in the restic format: give the copy destination a "
                          "restic_password (or restic_password_file / restic_password_env), or the job's "
                          "storage one, for the destination's repository" % job)
    copied, failed = {}, {}
    lineage = source_repo.lineage()
    destination.ensure_ready()
    _drop_abandoned_keys(destination, "%s/%s/" % (REPOSITORY_DIR, job))
    with RepositoryServer(destination, "%s/%s" % (REPOSITORY_DIR, job)) as server:
        target = ResticRepository(destination_repo_options, password, lock_wait=LOCK_WAIT,
                                  lock_holders=_LOCK_CHECK["holders"], notice=_LOCK_CHECK["notice"],
                                  served_at=server)
        target.copy_from(source_repo, [])  # creates the destination repository when missing
        config = target.config()
        locked = None
        for manifest in map(mf.Manifest.wrap, manifests):
            if locked is not None:
                failed[manifest.id] = locked
                continue
            before, errors_before = server.bytes_received, len(server.errors)
            try:
                snapshots = manifest_snapshots(manifest)
                gone = [snap for snap in snapshots if snap not in lineage or not source_repo.has_snapshot(snap)]
                if gone:
                    raise NotFoundError("restic snapshot %s of backup %s is no longer in %s"
                                        % (gone[0][:12], manifest.id, source_repo.url))
                target.copy_from(source_repo, snapshots)
            except RepositoryLockedError as exc:
                failed[manifest.id] = locked = exc
                continue
            except (NotFoundError, IntegrityError) as exc:
                failed[manifest.id] = exc
                continue
            except StorageError as exc:
                problems = "; ".join(server.errors[errors_before:][-3:])
                failed[manifest.id] = StorageError("%s%s" % (exc, "; at the destination: " + problems if problems else ""))
                continue
            copied[manifest.id] = [snapshots, server.bytes_received - before]
        origins = target.origins() if copied else {}
    for backup_id in list(copied):
        snapshots, size = copied[backup_id]
        missing = [snap for snap in snapshots if lineage[snap] not in origins]
        if missing:
            del copied[backup_id]
            failed[backup_id] = IntegrityError("restic copy left no copy of snapshot %s at %s"
                                               % (missing[0][:12], target.url))
        else:
            copied[backup_id] = ({snap: origins[lineage[snap]] for snap in snapshots}, size)
    return copied, failed, config
