"""Offsite copies: a job's backups copied from one storage location to another, verified there.

The stored bytes are copied as they are (compressed, encrypted): the copy needs no key.
Each backup is copied in the order a backup is written, so an incomplete copy is never listed:

1. every object the source manifest names is streamed from the source to the destination
   (bounded memory, hashed on the way: a source object that does not match its manifest is
   never copied), then read back from the destination to the end and its size and SHA-256
   compared with the manifest (:func:`pipeline.check_object` without decoding);
2. objects in the destination's backup directory that the manifest does not list are removed
   (a stray object fails verification at the destination);
3. the manifest is published last through the destination's :class:`Catalog` (index kept
   right), with a ``copied_from`` record (the source location and the time of the copy).

Incremental and idempotent: a backup the destination lists with the same objects is left
alone. With the destination's own retention ``policy`` a backup that policy would not keep
(together with what the destination holds) is not copied, so a destination that keeps less
than the source is not filled again with what its prune removed. Resumable: objects a killed copy had already stored are read back and kept when they
match, overwritten when not; unfinished objects are never read (prune removes them).
Chains are copied parent first, and a backup whose parent could not be copied is skipped.

Re-encryption (``reencrypt``, for a destination held by another team): each object is
decrypted with the source's key, given explicitly, and encrypted to the destination's age
recipients while it streams (:func:`reencrypt_object`, bounded memory); the source bytes are
still checked against the source manifest before anything is published, the destination's
manifest gets the new sizes and SHA-256 and records (``copied_from.reencrypted``) the
recipients, the source objects it stands for and the SHA-256 of each object's plaintext. The
key is checked (a recipient of every backup to copy, and a trial decryption) before anything
is written at the destination. A backup the destination holds counts as present whatever it
is encrypted to: a change of recipients applies to the backups copied from then on.

PostgreSQL point-in-time recovery: a copy of a job of ``postgres_base`` backups also copies
the WAL jobs they name (``stats.wal_job``, default ``<job>-wal``), after the base backups and
the same way, so that the destination can be restored to a point in time and ``require_copy``
can prune copied WAL. Every WAL file is copied when every backup is and the destination has no
retention policy of its own; otherwise only the WAL the base backups held at the destination
need (from the oldest one's ``wal_start`` on), the WAL its prune would delete again.

A listed backup is repaired (manifest removed first, so it stops being listed, then copied
again) when the destination listing shows one of its objects missing or of the wrong size,
when its recorded verification at the destination failed and reading its stored bytes back
finds a difference, or (``recheck="full"``) when reading back any of its objects does.
"""

import hashlib

from . import codecs
from . import manifest as mf
from . import pgwal
from . import resticstore
from .backup import ENGINE_VERSION
from .catalog import Catalog
from .config import read_text_file
from .errors import (BackupError, ConfigError, DecryptionError, IntegrityError, NotFoundError, ObjectMismatchError,
                     StorageError)
from .pipeline import CHUNK, PlaintextStream, check_object, store_stream
from .procutil import pump
from .pgwal import wal_job_of
from .restic import manifest_snapshots
from .prune import BASE_KIND, WAL_KIND, plan as retention_plan, wal_job_names
from .keys import KeyMismatchError, identities as restore_identities
from .storage.base import MissingLocationError, is_unfinished
from .timeutil import is_backup_id, parse_iso, to_iso, utc_now

RECHECKS = ("size", "full")
COPY_ACTION, REPAIR_ACTION = "copy", "repair"
_SIDE_OBJECTS = (mf.MANIFEST_NAME, mf.VERIFICATION_NAME)
REENCRYPT_KEYS = ("recipients", "recipients_file", "identity", "passphrase")
_NO_COMPRESSION = {"algorithm": "none", "level": 0, "threads": 0}


def source_objects(destination_manifest):
    """The source objects a destination manifest stands for: those recorded by a re-encrypting
    copy (``copied_from.reencrypted.source_objects``) or by the copy of a restic-format backup
    (``copied_from.restic.source_objects``), else its own (a byte-for-byte copy).
    Entries are returned as recorded: a malformed one must read as a different backup."""
    destination_manifest = mf.Manifest.wrap(destination_manifest)
    for section in ("reencrypted", "restic"):
        record = destination_manifest.copied_from.get(section)
        if isinstance(record, dict) and isinstance(record.get("source_objects"), list):
            return record["source_objects"]
    return destination_manifest["objects"]


def same_backup(source_manifest, destination_manifest):
    """Whether the destination's manifest is a copy of the source's stored backup (same id,
    job and stored objects; for a re-encrypted copy, the source objects it records)."""
    def objects(entries):
        try:
            return sorted((obj["name"], obj["size"], obj["sha256"]) for obj in entries)
        except (KeyError, TypeError):
            return None  # a malformed record is not the same backup: copied again
    source_manifest, destination_manifest = mf.Manifest.wrap(source_manifest), mf.Manifest.wrap(destination_manifest)
    return (source_manifest.id == destination_manifest.id
            and source_manifest.job == destination_manifest.job
            and objects(source_manifest["objects"]) == objects(source_objects(destination_manifest)))


def reencrypt_settings(options):
    """Re-encryption options (secrets resolved) normalised, or None when none are given.

    ``recipients`` / ``recipients_file``: the destination's age public keys; ``identity``
    (AGE-SECRET-KEY lines) or ``passphrase``: the source's key, which must be given
    explicitly (the job's own ``encryption`` keys are never used for it).
    """
    if not options:
        return None
    if "_recipients" in options:
        return options  # already normalised
    unknown = sorted(set(options) - set(REENCRYPT_KEYS))
    if unknown:
        raise ConfigError("reencrypt: unknown option(s) %s (known: %s)" % (", ".join(unknown), ", ".join(REENCRYPT_KEYS)))
    recipients = options.get("recipients") or []
    recipients = recipients.splitlines() if isinstance(recipients, str) else list(recipients)
    if options.get("recipients_file"):
        recipients += read_text_file(options["recipients_file"], "reencrypt.recipients_file").splitlines()
    recipients = [str(line).strip() for line in recipients
                  if str(line).strip() and not str(line).strip().startswith("#")]
    if not recipients:
        raise ConfigError("reencrypt: give the destination's age recipients (recipients or recipients_file)")
    for line in recipients:
        if line.upper().startswith("AGE-SECRET-KEY-"):
            # Never echoed: the wrong half of a key pair is a secret.
            raise ConfigError("reencrypt.recipients holds an age secret key (AGE-SECRET-KEY-...); it takes the "
                              "destination's public keys (age1...)")
    identity = options.get("identity") or None
    passphrase = options.get("passphrase")
    passphrase = None if passphrase in (None, "") else passphrase
    if identity is None and passphrase is None:
        raise ConfigError("reencrypt: the source's key must be given explicitly - identity (identity_file, "
                          "identity_env) or passphrase (passphrase_file, passphrase_env); re-encrypting "
                          "decrypts every copied object with it")
    if identity is not None:
        codecs.parse_identities(identity)  # a malformed key fails here, never echoed
    parsed, seen = [], set()
    for line in recipients:
        recipient = codecs.parse_recipient(line)
        if str(recipient) not in seen:
            seen.add(str(recipient))
            parsed.append(recipient)
    return {"recipients": [str(item) for item in parsed], "_recipients": parsed,
            "_identity": identity, "_passphrase": passphrase}


def copied_manifest(source_manifest, source_description, copied_at):
    """The manifest published at the destination: the source's, plus where and when it came from.

    Verification reads the objects list, never the manifest's own bytes, so the extra field
    changes nothing there; the catalog's listing entry (``verification``) is dropped.
    """
    copied_from = {"storage": dict(source_description), "copied_at": to_iso(copied_at), "engine": ENGINE_VERSION}
    return mf.Manifest.wrap(source_manifest).without("verification").with_fields(copied_from=copied_from)


def reencrypted_manifest(source_manifest, objects, plaintext, recipients, source_description, copied_at):
    """The manifest of a re-encrypted copy: the source's, with the destination's ``objects``
    (new sizes and SHA-256), encrypted to ``recipients``, and in ``copied_from.reencrypted``
    what it was encrypted to before, the source objects it stands for (how later copies know
    the backup is there) and the size and SHA-256 of each object's plaintext. Public keys only."""
    source_manifest = mf.Manifest.wrap(source_manifest)
    manifest = copied_manifest(source_manifest, source_description, copied_at)
    reencrypted = {
        "recipients": list(recipients),
        "source_encryption": codecs.public_encryption_info(source_manifest.encryption),
        "source_objects": [{"name": obj.name, "size": obj.size, "sha256": obj.sha256}
                           for obj in source_manifest.objects],
        "plaintext": plaintext,
    }
    manifest = manifest.with_fields(
        objects=objects, size_bytes=sum(obj["size"] for obj in objects),
        encryption={"mode": "age", "recipients": list(recipients)},
        copied_from=dict(manifest.copied_from, reencrypted=reencrypted))
    return mf.validate(mf.build(**_build_args(manifest)))


def restic_copied_manifest(source_manifest, snapshots, repository, source_description, copied_at):
    """The manifest of a restic-format backup copied into the destination's repository:
    ``snapshots`` maps the source's snapshot ids to the copies' (restic copy gives each copy an
    id of its own), ``repository`` is the destination repository's config. Payload sizes and
    SHA-256 stay (the same bytes are stored); a directory payload's entry, which holds its
    snapshot id, takes the copy's. ``copied_from.restic`` records the source's repository and
    objects (how later copies and require_copy know the backup is there)."""
    source_manifest = mf.Manifest.wrap(source_manifest)
    manifest = copied_manifest(source_manifest, source_description, copied_at)
    objects = []
    for obj in source_manifest.objects:
        entry = dict(obj)
        if obj.restic_snapshot:
            entry["restic_snapshot"] = snapshots[obj.restic_snapshot]
            if obj.payload == "directory" and obj.sha256 == obj.restic_snapshot:
                entry["sha256"] = snapshots[obj.restic_snapshot]
        objects.append(entry)
    section = dict(source_manifest.restic)
    section["snapshot_id"] = snapshots[section["snapshot_id"]]
    if isinstance(section.get("snapshots"), list):
        section["snapshots"] = [snapshots[snap] for snap in section["snapshots"]]
    section.update(repository_id=repository.get("id"), repository_version=repository.get("version"))
    record = {"source_repository_id": source_manifest.restic.get("repository_id"),
              "source_objects": [dict(obj) for obj in source_manifest.objects]}
    manifest = manifest.with_fields(objects=objects, restic=section,
                                    copied_from=dict(manifest.copied_from, restic=record))
    return mf.validate(mf.build(**_build_args(manifest)))


def _build_args(manifest):
    """``manifest`` as mf.build's arguments (so that the secret-field check runs on it)."""
    named = {"id": "backup_id", "job": "job", "kind": "kind", "started_at": "started_at",
             "finished_at": "finished_at", "objects": "objects", "compression": "compression",
             "encryption": "encryption", "tool_versions": "tool_versions", "stats": "stats",
             "parent": "parent", "source": "source"}
    args = {arg: manifest.get(key) for key, arg in named.items()}
    args["extra"] = {key: value for key, value in manifest.items()
                     if key not in named and key not in ("schema", "status", "size_bytes")}
    return args


def select_sources(backups, selector="all"):
    """The source manifests to copy, oldest first, for ``all``, ``latest`` or a backup id;
    for one backup its chain's parents come along (a restore at the destination needs them)."""
    backups = [mf.Manifest.wrap(m) for m in backups]
    if selector in (None, "", "all"):
        chosen = list(backups)
    else:
        if selector == "latest":
            wanted = backups[:1]
        elif is_backup_id(selector):
            wanted = [m for m in backups if m.id == selector]
        else:
            raise ConfigError("backup must be all, latest or a backup id, got %r" % (selector,))
        if not wanted:
            raise NotFoundError("the source has no complete backup %s" % (selector,))
        by_id = {m.id: m for m in backups}
        chosen, item = [], wanted[0]
        while item is not None and item not in chosen:
            chosen.append(item)
            item = by_id.get(item.parent) if item.parent else None
    return sorted(chosen, key=lambda m: (parse_iso(m.started_at), m.id))


def plan_backup(source_manifest, destination_manifest, stored_sizes):
    """``(action, reason)`` for one source backup judged by the destination's catalog and
    listing alone (no object read): ``copy``, ``repair`` or None (in sync as far as listed).
    The listing is compared with the destination manifest's objects (a re-encrypted copy's
    differ from the source's)."""
    if destination_manifest is None:
        return COPY_ACTION, "missing at the destination"
    if not same_backup(source_manifest, destination_manifest):
        return REPAIR_ACTION, "the destination's manifest lists other objects"
    source_manifest = mf.Manifest.wrap(source_manifest)
    for obj in mf.Manifest.wrap(destination_manifest).objects:
        key = mf.object_key(source_manifest.job, source_manifest.id, obj.name)
        if key not in stored_sizes:
            return REPAIR_ACTION, "%s is missing at the destination" % key
        if stored_sizes[key] != obj.size:
            return REPAIR_ACTION, "%s is %d bytes at the destination, the manifest says %d" % (
                key, stored_sizes[key], obj.size)
    return None, None


def copied_ids(destination, job, source_backups):
    """Ids of ``source_backups`` (``Catalog.scan`` output) the ``destination`` lists with the
    same objects: what prune's ``require_copy`` rail may delete at the source. A destination
    that does not exist holds nothing."""
    try:
        present = {m.id: m for m in Catalog(destination, repair_index=False).scan(job, with_orphans=False)}
    except MissingLocationError:
        return set()
    source_backups = [mf.Manifest.wrap(m) for m in source_backups]
    # A copy whose verification there failed is no copy (a damaged restic copy stays listed).
    return {m.id for m in source_backups if m.id in present and same_backup(m, present[m.id])
            and present[m.id].verification_result != "failed"}


def copied_wal_ids(source, destination, job, manifests):
    """require_copy for PostgreSQL WAL: the ids of the WAL files ``destination`` holds (same
    objects as at ``source``), of every WAL job the ``postgres_base`` backups among ``manifests``
    name (default ``<job>-wal``); None when there is no base backup."""
    names = wal_job_names(job, manifests)
    if not names:
        return None
    held = set()
    for wal_job in names:
        held |= copied_ids(destination, wal_job, Catalog(source, repair_index=False).scan(wal_job, with_orphans=False))
    return held


def wal_wanted(manifest, needs):
    """Whether a WAL file (a ``postgres_wal`` manifest) is worth copying when the base backups the
    destination holds need ``needs`` (``[(timeline, first segno)]``, see :func:`pgwal.wal_needed`):
    history files and anything unparsable always are."""
    manifest = mf.Manifest.wrap(manifest)
    wal = manifest.stats
    if manifest.get("kind") != WAL_KIND or wal.get("type") not in ("segment", "partial"):
        return True
    parsed = pgwal.parse_segment_name(str(wal.get("file") or ""), wal.get("segment_size") or pgwal.DEFAULT_SEGMENT_SIZE)
    return parsed is None or pgwal.wal_needed(needs, *parsed[:2])


def copy_lag_seconds(source_backups, present_ids, now):
    """Seconds since the oldest source backup the destination lacks finished (0 in sync)."""
    missing = [parse_iso(m.finished_at) for m in map(mf.Manifest.wrap, source_backups) if m.id not in present_ids]
    if not missing:
        return 0.0
    return max(0.0, (now - min(missing)).total_seconds())


def _read_back(storage, key, obj):
    """None when ``key`` holds exactly the manifest's bytes, else why not."""
    try:
        check_object(storage, key, obj, "none", None)
    except NotFoundError:
        return "%s is missing" % key
    except IntegrityError as exc:
        return str(exc)
    return None


def stream_object(source, destination, key, obj):
    """Copy one stored object in CHUNK pieces; the source bytes must match ``obj`` (size, SHA-256)
    or nothing is published. Returns the number of bytes copied."""
    obj = mf.StoredObject.wrap(obj)
    reader = source.open_reader(key)
    try:
        with destination.open_writer(key) as writer:
            sha256, size = pump(reader.read, writer.write)
            if size != obj.size:
                raise ObjectMismatchError(key, "size", obj.size, size, note="at the source: not copied")
            if sha256 != obj.sha256:
                raise ObjectMismatchError(key, "sha256", obj.sha256, sha256, note="at the source: not copied")
            writer.commit()
    finally:
        reader.close()
    return size


class _SourcePlaintext:
    """The plaintext of one source object (decrypted, still compressed), hashed on its way;
    at its end the stored bytes' size and SHA-256 are checked against the source manifest
    (an error then, so that nothing is published)."""

    def __init__(self, source, key, obj, identities):
        self._key = key
        self._stream = PlaintextStream(source, key, obj, "none", identities)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._done = False

    def read(self, size=-1):
        data = self._stream.read(CHUNK if size is None or size < 0 else size)
        if data:
            self.sha256.update(data)
            self.size += len(data)
            return data
        if not self._done:
            self._done = True
            try:
                self._stream.finish()
            except ObjectMismatchError as exc:
                raise ObjectMismatchError(exc.key, exc.field, exc.expected, exc.actual,
                                          note="at the source: not copied") from None
        return b""

    def close(self):
        self._stream.close()


def reencrypt_object(source, destination, source_key, destination_key, obj, identities, recipients):
    """Decrypt one stored object with ``identities`` (None: it is not encrypted) and encrypt it
    to ``recipients`` (parsed age recipients) into ``destination_key``, streaming; published
    only when the source bytes match ``obj``. Returns ``(stored, plaintext)``, each
    ``{size, sha256}``: the new object's and its plaintext's."""
    plain = _SourcePlaintext(source, source_key, obj, identities)
    try:
        try:
            stored = store_stream(plain, destination, destination_key, _NO_COMPRESSION,
                                  {"mode": "age", "_recipients": recipients})
        except IntegrityError as exc:
            if isinstance(exc, ObjectMismatchError):
                raise
            # Undecryptable: say so when the stored bytes themselves differ from the manifest.
            problem = _read_back(source, source_key, obj)
            if problem:
                raise IntegrityError("%s (at the source: not copied)" % problem) from None
            raise IntegrityError("%s: %s (at the source: not copied)" % (source_key, exc)) from None
    finally:
        plain.close()
    return ({"size": stored["size"], "sha256": stored["sha256"]},
            {"size": plain.size, "sha256": plain.sha256.hexdigest()})


class Copier:
    """Copies ``job``'s backups from ``source`` to ``destination`` (two Storage objects)."""

    def __init__(self, source, destination, job, recheck="size", log=None, policy=None, min_keep=1,
                 reencrypt=None, wal_needs=None):
        self.job = mf.validate_job_name(job)
        if recheck not in RECHECKS:
            raise ConfigError("recheck must be one of %s, got %r" % (", ".join(RECHECKS), recheck))
        self.reencrypt = reencrypt_settings(reencrypt)
        self.source = source
        self.destination = destination
        resticstore.share_password(source, destination)
        self.recheck = recheck
        self.policy = policy  # the destination's retention (a retention.Policy or its mapping), or None
        self.min_keep = min_keep
        self.wal_needs = wal_needs  # WAL job only: [(timeline, first segno)] the destination's bases need, or None
        self.log = log or (lambda message: None)
        self.source_catalog = Catalog(source, repair_index=False)
        self.destination_catalog = Catalog(destination)
        self._restic_copies = ({}, {}, {})  # (copied, failed, destination config) of this run

    # -- looking -------------------------------------------------------------------------
    def _destination_state(self):
        """``(manifests by id, stored sizes by key)``; an absent location holds nothing."""
        try:
            listed = self.destination_catalog.scan(self.job, with_orphans=False)
            sizes = {info.key: info.size for info in self.destination.list("%s/" % self.job)}
        except MissingLocationError:
            return {}, {}
        return {m.id: m for m in listed}, sizes

    def _plan_restic(self, source_manifest, destination_manifest):
        """plan_backup for a restic-format backup: its payloads are snapshots in the job's
        repository at the destination, which must hold every one its manifest names."""
        if destination_manifest is None:
            return COPY_ACTION, "missing at the destination"
        if not same_backup(source_manifest, destination_manifest):
            return REPAIR_ACTION, "the destination's manifest lists other objects"
        try:
            repository = resticstore.repository(self.destination, self.job)
            for snapshot in manifest_snapshots(destination_manifest):
                if not repository.has_snapshot(snapshot):
                    return REPAIR_ACTION, "restic snapshot %s is missing at the destination" % snapshot[:12]
        except IntegrityError as exc:
            return REPAIR_ACTION, str(exc)
        return None, None

    def _stored_damage(self, destination_manifest):
        """Read back the destination's objects of a listed backup, judged by its manifest's
        entries (for a byte-for-byte copy the source's, as same_backup found): the first
        difference, or None."""
        if resticstore.is_restic(destination_manifest):
            try:
                resticstore.verify_objects(self.destination, destination_manifest)
            except (IntegrityError, NotFoundError) as exc:
                return str(exc)
            except (ConfigError, StorageError) as exc:
                # Cannot read it back now (a live lock, the site unreachable): not damage.
                self.log("backup %s at the destination not read back this time: %s" % (destination_manifest.id, exc))
            return None
        for obj in destination_manifest.objects:
            problem = _read_back(self.destination, mf.object_key(self.job, destination_manifest.id, obj.name), obj)
            if problem:
                return problem
        return None

    def _unwanted(self, chosen, present, now):
        """Ids of ``chosen`` missing at the destination that its own policy would prune (for a WAL
        job: that no base backup at the destination needs), and partial WAL copies a file the
        destination already holds supersedes."""
        missing = [m for m in chosen if m.id not in present]
        unwanted = self._superseded_at_destination(missing, present)
        if self.wal_needs is not None:
            unwanted.update((m.id, "no base backup at the destination needs it") for m in missing
                            if m.id not in unwanted and not wal_wanted(m, self.wal_needs))
            return unwanted
        if self.policy is None:
            return unwanted
        missing = [m.with_fields(verification=None) for m in missing]
        decided = retention_plan(list(present.values()) + missing, self.policy, min_keep=self.min_keep, now=now)
        kept = {entry["id"] for entry in decided["keep"]}
        unwanted.update((m.id, "the destination's retention policy would not keep it") for m in missing
                        if m.id not in kept and m.id not in unwanted)
        return unwanted

    @staticmethod
    def _superseded_at_destination(missing, present):
        """Missing partial WAL copies that a file the destination holds supersedes. Only files
        already there count: a complete segment still to be copied could fail to arrive, and then
        its partial copy is what the destination has (it goes after the segment arrives, see
        :meth:`_drop_superseded`)."""
        held = [m for m in present.values() if m.kind == WAL_KIND]
        found = {}
        for manifest in missing:
            if manifest.kind != WAL_KIND or manifest.stats.get("type") != "partial":
                continue
            for superseded, reason in pgwal.superseded_partials(held + [manifest]):
                if superseded.id == manifest.id:
                    found[manifest.id] = reason
        return found

    def plan(self, selector="all", now=None):
        """What a copy would do: ``{source_backups, steps, in_sync, present, unwanted}`` (reads only)."""
        source_backups = self.source_catalog.scan(self.job, with_orphans=False)
        if self.reencrypt is not None and any(resticstore.is_restic(m) for m in source_backups):
            raise ConfigError("job %s has backups in the restic format, which copy.reencrypt cannot apply to: their "
                              "copies are encrypted by the destination repository (its restic_password); "
                              "remove reencrypt; nothing was copied" % self.job)
        chosen = select_sources(source_backups, selector)
        present, sizes = self._destination_state()
        unwanted = self._unwanted(chosen, present, now or utc_now())
        chosen = [m for m in chosen if m.id not in unwanted]
        steps, in_sync, damaged = [], [], []
        for manifest in chosen:
            if resticstore.is_restic(manifest):
                action, reason = self._plan_restic(manifest, present.get(manifest.id))
            else:
                action, reason = plan_backup(manifest, present.get(manifest.id), sizes)
            if action is None:
                if self.recheck == "full" or present[manifest.id].verification_result == "failed":
                    problem = self._stored_damage(present[manifest.id])
                    if problem and resticstore.is_restic(manifest):
                        # restic copy would skip the snapshot and never store again blobs its
                        # index lists: a repair would only unlist the copy. Reported, kept.
                        damaged.append({"id": manifest.id, "action": "damaged", "reason": problem, "error": (
                            "the copy at the destination is damaged (%s); restic copy cannot store again data the "
                            "destination repository's index lists: repair that repository (restic check, restic "
                            "rebuild-index) or remove the job's repository there to copy everything again" % problem)})
                        continue
                    if problem:
                        action, reason = REPAIR_ACTION, problem
            if action is None:
                in_sync.append(manifest.id)
                continue
            objects = manifest.objects
            steps.append({"id": manifest.id, "action": action, "reason": reason,
                          "parent": manifest.parent, "objects": len(objects),
                          "bytes": sum(obj.size for obj in objects),
                          "finished_at": manifest.finished_at, "_manifest": manifest})
        other = []
        if self.reencrypt is not None:
            wanted = set(self.reencrypt["recipients"])
            other = [backup_id for backup_id in in_sync
                     if set(present[backup_id].encryption.get("recipients") or []) != wanted]
        return {"source_backups": chosen, "steps": steps, "in_sync": in_sync, "damaged": damaged, "other_recipients": other,
                "present": set(present), "sizes": sizes, "unwanted": unwanted, "all_source": source_backups,
                "present_manifests": present}

    # -- keys (re-encryption) ------------------------------------------------------------
    def _check_keys(self, steps):
        """Find the source key of every backup to copy, before anything is written.

        The identity must be a recipient of the backup (or the passphrase open its envelope)
        and, once per set of recipients, decrypt the start of a payload: otherwise the run
        stops here (KeyMismatchError). A backup whose key envelope or first payload is
        damaged at the source fails alone (``_key_error``)."""
        tried = set()
        for step in steps:
            manifest = step["_manifest"]
            try:
                found = restore_identities(self.source, manifest, self.reencrypt["_identity"],
                                           self.reencrypt["_passphrase"])
            except KeyMismatchError as exc:
                raise KeyMismatchError("reencrypt: %s; nothing was written at the destination" % exc) from None
            except IntegrityError as exc:
                step["_key_error"] = exc
                continue
            step["_identities"] = found
            encryption = manifest.encryption
            recipients = (tuple(sorted(encryption.get("recipients") or [])), encryption.get("key_object"))
            if found is None or (recipients in tried and not encryption.get("key_object")):
                continue
            try:
                self._trial_decrypt(manifest, found)
            except KeyMismatchError:
                raise
            except IntegrityError as exc:
                step["_key_error"] = exc
                continue
            tried.add(recipients)

    def _trial_decrypt(self, manifest, found):
        for obj in manifest.objects:
            if not obj.payload:
                continue
            key = mf.object_key(self.job, manifest.id, obj.name)
            stream = PlaintextStream(self.source, key, obj, "none", found)
            try:
                stream.read(CHUNK)
            except DecryptionError:
                problem = _read_back(self.source, key, obj)
                if problem:
                    raise IntegrityError("%s (at the source: not copied)" % problem) from None
                raise KeyMismatchError("reencrypt: the given key does not decrypt %s (backup %s); nothing was "
                                       "written at the destination" % (key, manifest.id)) from None
            finally:
                stream.close()
            return

    # -- copying -------------------------------------------------------------------------
    def _copy_one(self, step, sizes, now):
        manifest = step["_manifest"]
        job, backup_id = self.job, manifest.id
        if step.get("_key_error") is not None:
            raise step["_key_error"]  # found before anything was written
        if step["action"] == REPAIR_ACTION:
            # Unlist it first: from here on a kill leaves an unlisted directory, never a
            # listed backup that does not verify. Its old verdict goes with it.
            self.destination.delete(mf.object_key(job, backup_id, mf.MANIFEST_NAME))
            self.destination.delete(mf.object_key(job, backup_id, mf.VERIFICATION_NAME))
        if self.reencrypt is not None:
            return self._reencrypt_one(step, now)
        if resticstore.is_restic(manifest):
            return self._publish_restic(step, now)
        copied = reused = 0
        names = set()
        for obj in manifest.objects:
            key = mf.object_key(job, backup_id, obj.name)
            names.add(obj.name)
            # Left by an earlier, interrupted copy: kept when it reads back right.
            if sizes.get(key) == obj.size and _read_back(self.destination, key, obj) is None:
                reused += obj.size
                continue
            copied += stream_object(self.source, self.destination, key, obj)
            problem = _read_back(self.destination, key, obj)
            if problem:
                raise IntegrityError("read back from the destination after copying: %s" % problem)
        self._remove_strays(backup_id, names)
        self.destination_catalog.publish(copied_manifest(manifest, self.source.describe(), now))
        return copied, reused

    def _record_damage(self, plan):
        """A damaged restic copy's verdict, recorded at the destination: it then counts as no copy
        for require_copy and as unverified for the destination's prune, as a failed verification
        there would."""
        # local: verify pulls in the restore engine
        from .verify import record_of  # pylint: disable=import-outside-toplevel
        for entry in plan["damaged"]:
            record = record_of({"result": "failed", "verified_at": to_iso(utc_now()),
                                "error": "offsite copy recheck: %s" % entry["reason"]})
            try:
                self.destination_catalog.record_verification(plan["present_manifests"][entry["id"]], record)
            except BackupError as exc:
                self.log("could not record the damage of %s at the destination: %s" % (entry["id"], exc))

    def _copy_restic(self, steps):
        """The restic snapshots of the restic-format backups among ``steps``, copied before any
        manifest is published (see :meth:`_publish_restic`)."""
        manifests = [step["_manifest"] for step in steps if resticstore.is_restic(step["_manifest"])]
        if not manifests:
            return
        try:
            self._restic_copies = resticstore.copy_snapshots(self.source, self.destination, self.job, manifests)
        except (ConfigError, StorageError, IntegrityError, NotFoundError) as exc:
            # The destination repository could not be opened or created (a wrong password, no
            # restic, an unreachable site): every restic backup of this run fails with that;
            # the archive-format ones are still copied.
            self.log("restic-format backups not copied: %s" % exc)
            self._restic_copies = ({}, {m.id: exc for m in manifests}, {})

    def _publish_restic(self, step, now):
        """A restic-format backup whose snapshots :meth:`_copy_restic` copied: every payload read
        back from the destination's repository and checked against the manifest, then the
        manifest (the copies' snapshot ids) published. Returns ``(bytes stored, 0)``."""
        manifest = step["_manifest"]
        copied, failed, repository = self._restic_copies
        if manifest.id in failed:
            error = failed[manifest.id]
            if isinstance(error, (IntegrityError, NotFoundError)):
                raise error
            raise _StepFailed(str(error))
        snapshots, size = copied[manifest.id]
        copy = restic_copied_manifest(manifest, snapshots, repository, self.source.describe(), now)
        self._remove_strays(manifest.id, set())  # a stray object would fail the read-back
        try:
            resticstore.verify_objects(self.destination, copy)
        except (ConfigError, StorageError) as exc:
            # Not damage: the read-back could not run now (a live lock of the destination's
            # prune or drill, the site unreachable); the next run reads it back again.
            raise _StepFailed("read back from the destination: %s" % exc) from None
        if self._published_meanwhile(manifest):
            # Another copy run published this backup meanwhile (two runs racing, each restic copy
            # finding no copy there yet): its manifest stays, readers may hold it already; this
            # run's snapshots are duplicates that the destination's prune forgets.
            self.log("backup %s: another copy run published it at the destination meanwhile; its manifest stays"
                     % manifest.id)
            return size, 0
        self.destination_catalog.publish(copy)
        return size, 0

    def _published_meanwhile(self, manifest):
        """Whether the destination holds, now, a complete copy of ``manifest`` that another run
        published: a manifest that reads, is this backup's, and whose snapshots are all there. A
        junk or incomplete one is replaced, as before."""
        key = mf.object_key(self.job, manifest.id, mf.MANIFEST_NAME)
        try:
            theirs = mf.loads(self.destination.get_bytes(key), key)
        except (NotFoundError, IntegrityError):
            return False
        if theirs.get("job") != self.job or theirs.get("id") != manifest.id:
            return False
        return self._plan_restic(manifest, theirs) == (None, None)

    def _listed_at_source(self, backup_id):
        prefix = "%s/%s/" % (self.job, backup_id)
        return any(info.key == prefix + mf.MANIFEST_NAME for info in self.source.list(prefix))

    def _remove_strays(self, backup_id, names):
        prefix = "%s/%s/" % (self.job, backup_id)
        for info in self.destination.list(prefix):
            name = info.key[len(prefix):]
            if name not in names and name not in _SIDE_OBJECTS and not is_unfinished(name):
                self.destination.delete(info.key)  # a stray would fail verification there

    def _reencrypt_one(self, step, now):
        """Every object decrypted and encrypted to the destination's recipients (age output
        differs on every run, so nothing a killed run stored can be matched and reused)."""
        manifest = step["_manifest"]
        backup_id = manifest.id
        encryption = manifest.encryption
        algorithm = manifest.compression_algorithm
        if algorithm not in codecs.SUFFIX:
            raise IntegrityError("backup %s records unknown compression %r: not re-encrypted" % (backup_id, algorithm))
        objects, plaintext, copied = [], [], 0
        for obj in manifest.objects:
            source_key = mf.object_key(self.job, backup_id, obj.name)
            if not obj.payload:
                if obj.name == encryption.get("key_object"):
                    continue  # the source's passphrase envelope: the copy is encrypted to recipients
                copied += stream_object(self.source, self.destination, source_key, obj)
                entry = dict(obj)
            else:
                name = codecs.stored_name(obj.payload, algorithm, "age")
                stored, plain = reencrypt_object(self.source, self.destination, source_key,
                                                 mf.object_key(self.job, backup_id, name), obj,
                                                 step.get("_identities"), self.reencrypt["_recipients"])
                copied += stored["size"]
                entry = dict(obj, name=name, size=stored["size"], sha256=stored["sha256"])
                plaintext.append({"name": name, "size": plain["size"], "sha256": plain["sha256"]})
            problem = _read_back(self.destination, mf.object_key(self.job, backup_id, entry["name"]), entry)
            if problem:
                raise IntegrityError("read back from the destination after copying: %s" % problem)
            objects.append(entry)
        self._remove_strays(backup_id, {obj["name"] for obj in objects})
        self.destination_catalog.publish(reencrypted_manifest(
            manifest, objects, plaintext, self.reencrypt["recipients"], self.source.describe(), now))
        return copied, 0

    def run(self, selector="all", check_mode=False, now=None):
        """Copy (or, in check mode, plan) and return the outcome; see module docstring."""
        # Check mode writes nothing, not even the destination's catalog index (a cache).
        self.destination_catalog.repair_index = not check_mode
        plan = self.plan(selector, now)
        steps = plan["steps"]
        outcome = {"job": self.job, "source": self.source.describe(),
                   "destination": self.destination.describe(), "check_mode": bool(check_mode),
                   "in_sync": plan["in_sync"], "planned": [_public(step) for step in steps],
                   "copied": [], "failed": list(plan["damaged"]), "skipped": [], "vanished": [], "superseded": [], "bytes_copied": 0,
                   "bytes_reused": 0, "not_wanted": sorted(plan["unwanted"]),
                   "reencrypt": ({"recipients": self.reencrypt["recipients"]} if self.reencrypt is not None
                                 else None),
                   "other_recipients": plan["other_recipients"]}
        if plan["other_recipients"]:
            self.log("%d backups at the destination are encrypted to other recipients than reencrypt names; "
                     "they are kept as they are" % len(plan["other_recipients"]))
        # A damaged copy is listed but is no copy: it counts as missing for the lag.
        present = set(plan["present"]) - {entry["id"] for entry in plan["damaged"]}
        if self.reencrypt is not None and steps:
            self._check_keys(steps)  # reads only: a wrong key stops the run before any write
        if not check_mode:
            self._record_damage(plan)
        if check_mode or not steps:
            present -= {step["id"] for step in steps}
        else:
            self.destination.ensure_ready()
            self._copy_restic(steps)
            # Parents already at the destination: in sync, or no longer at the source at all.
            done = set(plan["present"]) - {step["id"] for step in steps}
            for step in steps:
                parent = step["parent"]
                if parent and parent not in done:
                    present.discard(step["id"])
                    outcome["skipped"].append(dict(_public(step), error="its parent %s is not at the destination"
                                                   % parent))
                    self.log("backup %s skipped: parent %s was not copied" % (step["id"], parent))
                    continue
                try:
                    copied, reused = self._copy_one(step, plan["sizes"], now or utc_now())
                except (IntegrityError, _StepFailed) as exc:
                    present.discard(step["id"])
                    outcome["failed"].append(dict(_public(step), error=str(exc)))
                    self.log("backup %s not copied: %s" % (step["id"], exc))
                    continue
                except NotFoundError as exc:
                    present.discard(step["id"])
                    if self._listed_at_source(step["id"]):  # listed, yet an object is missing: damaged
                        outcome["failed"].append(dict(_public(step), error="at the source: %s" % exc))
                        self.log("backup %s not copied: at the source: %s" % (step["id"], exc))
                        continue
                    # Unlisted at the source since the plan: a partial WAL copy the stream
                    # replaced by a newer one, or a backup pruned meanwhile. Nothing of it is
                    # listed at the destination; the next run copies what replaced it.
                    outcome["vanished"].append(dict(_public(step), error=str(exc)))
                    self.log("backup %s not copied: it left the source while the copy ran (%s)" % (step["id"], exc))
                    continue
                done.add(step["id"])
                present.add(step["id"])
                outcome["bytes_copied"] += copied
                outcome["bytes_reused"] += reused
                outcome["copied"].append(dict(_public(step), bytes_copied=copied, bytes_reused=reused))
                self.log("backup %s %s: %d bytes copied, %d bytes already there" % (
                    step["id"], "copied" if step["action"] == COPY_ACTION else "repaired", copied, reused))
        moment = now or utc_now()
        outcome["lag_seconds"] = copy_lag_seconds(plan["source_backups"], present, moment)
        outcome["changed"] = bool(steps) if check_mode else bool(outcome["copied"])
        outcome["ok"] = not outcome["failed"] and not outcome["skipped"]
        if any(m.kind == WAL_KIND for m in plan["all_source"]) or any(
                m.kind == WAL_KIND for m in plan["present_manifests"].values()):
            outcome["superseded"] = self._drop_superseded(plan, check_mode)
            outcome["changed"] = outcome["changed"] or bool(outcome["superseded"])
        if self.wal_needs is None and any(m.kind == BASE_KIND for m in plan["all_source"]):
            self._copy_wal(outcome, plan, present, selector, check_mode, moment)
        return outcome

    def _drop_superseded(self, plan, check_mode):
        """A WAL job: delete the destination's partial copies that a WAL file now held there supersedes
        (the stream does the same at the source; without it every copy run would leave one more).
        Judged from a fresh listing after the copies, so a segment whose copy failed supersedes
        nothing; in check mode from what the destination holds plus the planned copies.
        Returns the ids (to delete, in check mode)."""
        if check_mode:
            planned = {step["id"]: step["_manifest"] for step in plan["steps"]}
            held = list(dict(plan["present_manifests"], **planned).values())
        else:
            held = self.destination_catalog.scan(self.job, with_orphans=False)
        gone = []
        for manifest, reason in pgwal.superseded_partials(held):
            if not check_mode:
                try:
                    self.destination_catalog.delete_backup(manifest)
                except BackupError as exc:  # costs space, not correctness: the next run tries again
                    self.log("could not delete superseded partial WAL copy %s at the destination: %s"
                             % (manifest.id, exc))
                    continue
            self.log("partial WAL copy %s %s at the destination: %s" % (
                manifest.id, "would be deleted" if check_mode else "deleted", reason))
            gone.append(manifest.id)
        return gone

    def _copy_wal(self, outcome, plan, present, selector, check_mode, now):
        """PostgreSQL point-in-time recovery: the WAL jobs the base backups name are copied after
        them, the same way (verified, manifest last). All their WAL when every backup is copied
        and the destination keeps everything; else only the WAL the base backups at the
        destination after this run (check mode: after the planned copies) need."""
        arriving = set(present) | ({step["id"] for step in plan["steps"]} if check_mode else set())
        held = dict(plan["present_manifests"])
        held.update((m.id, m) for m in plan["source_backups"] if m.id in arriving)
        outcome["wal"] = []
        for wal_job in wal_job_names(self.job, plan["all_source"]):
            needs = None
            if self.policy is not None or selector not in (None, "", "all"):
                needs = [start[:2] for start in (pgwal.base_wal_start(m) for m in held.values()
                                                 if m.kind == BASE_KIND and wal_job_of(self.job, m) == wal_job)
                         if start is not None]
            copier = Copier(self.source, self.destination, wal_job, recheck=self.recheck, log=self.log,
                            reencrypt=self.reencrypt, wal_needs=needs)
            result = copier.run("all", check_mode, now)
            entry = {key: result[key] for key in ("job", "planned", "copied", "failed", "skipped", "vanished", "bytes_copied",
                                                  "bytes_reused", "lag_seconds", "changed", "ok", "superseded")}
            entry["in_sync"] = len(result["in_sync"])
            entry["not_wanted"] = len(result["not_wanted"])
            outcome["wal"].append(entry)
            outcome["changed"] = outcome["changed"] or entry["changed"]
            outcome["ok"] = outcome["ok"] and entry["ok"]
            self.log("WAL job %s: %d files %s, %d in sync, %d not needed at the destination, %d failed, %d skipped" % (
                wal_job, len(entry["planned"] if check_mode else entry["copied"]),
                "to copy" if check_mode else "copied", entry["in_sync"], entry["not_wanted"],
                len(entry["failed"]), len(entry["skipped"])))


class _StepFailed(Exception):
    """One backup's copy failed for a reason that is neither damage nor absence (a live lock, an
    unreachable destination during restic copy): reported with the backup, the run goes on."""


def _public(step):
    return {key: value for key, value in step.items() if not key.startswith("_")}


def copy_backups(source, destination, job, backup="all", recheck="size", check_mode=False, log=None,
                 now=None, policy=None, min_keep=1, reencrypt=None):
    """Copy ``job``'s backups (``all``, ``latest`` or an id, with its chain) from ``source`` to
    ``destination`` (whose own retention ``policy``, when given, decides what is worth copying);
    with ``reencrypt`` (see :func:`reencrypt_settings`) encrypted to other recipients on the way.
    Returns ``{job, source, destination, planned, copied, failed, skipped, vanished, superseded,
    in_sync, not_wanted, bytes_copied, bytes_reused, lag_seconds, changed, ok, check_mode, reencrypt,
    other_recipients}`` (``superseded``: a WAL job's partial copies deleted at the destination)
    and, for a job of ``postgres_base`` backups, ``wal``: one entry per WAL job the base backups name
    (copied after them, see :meth:`Copier._copy_wal`) with its ``planned``, ``copied``, ``failed``
    and ``skipped`` lists, ``in_sync`` and ``not_wanted`` counts, bytes and lag; ``changed`` and
    ``ok`` then cover the WAL too."""
    return Copier(source, destination, job, recheck=recheck, log=log, policy=policy,
                  min_keep=min_keep, reencrypt=reencrypt).run(backup, check_mode, now)
