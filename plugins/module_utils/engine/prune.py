"""Applying a retention policy to one job's backups at a storage location.

This is the engine side of ``backup_prune`` (and of the runner's ``prune`` command). The
policy itself is evaluated by :mod:`retention`; this module adds what an operator needs
before trusting a program with deletion:

* only **successful** backups (manifest ``status: complete`` and no failed verification)
  fill retention periods.  Failed or incomplete backups, and backups whose last verification
  failed, are pruned on their own once they are older than the grace period;
* the **newest successful** backup and the **newest verified** backup are always kept;
* at least ``min_keep`` successful backups are kept;
* a backup that a kept incremental builds on (its ``parent``, recursively) is kept;
* with ``copied`` (``require_copy``: the ids of the backups the offsite copy holds, see
  :func:`offsite.copied_ids`) a successful backup not copied yet is kept;
* more than ``max_delete`` deletions are refused unless ``force``;
* objects under a backup directory without a manifest (an interrupted run), ``.tmp-``
  leftovers and unfinished S3 multipart uploads are removed once older than ``orphan_grace``;
  junk the catalog cannot read (a manifest of a newer schema, a corrupt one, stray objects
  outside backup directories) is reported and never deleted.

Deletion goes backup by backup, newest first (children before their parents), manifest
first, so a half-deleted backup is never listed as complete (``Catalog.delete_backup``).

PostgreSQL point-in-time recovery (kind ``postgres_base``): pruning the base backups also
prunes their WAL job (``stats.wal_job``, default ``<job>-wal``). A WAL file stays when a kept
complete base backup needs it: on the base backup's timeline from its ``wal_start`` on, on any
later timeline, and every timeline history file. Everything older goes, oldest first, after
the base backups were deleted, and only when at least one complete base backup is kept. The
WAL deletions follow from the base backups' and do not count against ``max_delete``; with
``require_copy`` a WAL file goes only when ``wal_copied`` (the ids of the WAL job the offsite
copy holds) lists it, and no WAL goes when that is not given. A policy pointed at the WAL job
itself is refused: its files are not independent backups.
Pure Python, no Ansible import.
"""

import datetime

from . import manifest as mf
from . import pgwal
from . import resticstore
from .pgwal import wal_job_of
from .catalog import Catalog
from .errors import ConfigError, IntegrityError, StorageError
from .retention import Backup, Duration, Policy, RetentionError, apply_policy
from .restic import REPOSITORY_DIR
from .storage.base import MissingLocationError, is_unfinished
from .timeutil import parse_iso, to_iso, utc_now

DEFAULT_ORPHAN_GRACE = "24h"
VERIFIED_OK = "ok"
VERIFIED_FAILED = "failed"

REASON_NEWEST = "newest successful backup (always kept)"
REASON_NEWEST_VERIFIED = "newest verified backup (always kept)"
REASON_MIN_KEEP = "min_keep=%d (at least that many successful backups stay)"
REASON_PARENT = "parent of kept backup %s"
REASON_POLICY = "not kept by the policy"
REASON_NOT_COPIED = "not copied to the offsite destination yet (require_copy)"
WAL_KIND = "postgres_wal"    # kinds/postgres/wal.py (not imported: prune stays free of the kinds)
BASE_KIND = "postgres_base"


class PruneRefusedError(ConfigError):
    """More deletions than ``max_delete`` without ``force``; ``result`` holds the preview."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


class PartialPruneError(StorageError):
    """Deleting a backup failed after others were deleted; ``result`` is the prune's result
    up to there (``deleted`` lists what went), ``backup_id`` the backup that failed."""

    def __init__(self, job, backup_id, result, cause, message=None):
        super().__init__(message or "job %s: deleting backup %s failed after %d deletions: %s"
                         % (job, backup_id, len(result["deleted"]), cause))
        self.backup_id = backup_id
        self.result = result


def parse_grace(value, what="orphan_grace"):
    """A grace period: ``0`` or a duration such as ``36h``, ``7d``, ``2w`` (a month counts
    31 days, a year 365, as in ``borg prune --keep-within``); returns a timedelta."""
    if value is None:
        value = DEFAULT_ORPHAN_GRACE
    if isinstance(value, bool):
        raise ConfigError("%s must be a duration such as 24h or 7d, got %r" % (what, value))
    if (isinstance(value, int) and value == 0) or str(value).strip() in ("0", "0h", "0d"):
        return datetime.timedelta(0)
    try:
        return datetime.timedelta(hours=Duration(value, what=what).borg_hours())
    except OverflowError:
        raise ConfigError("%s %r is too long" % (what, value)) from None


def _validate_limit(name, value, minimum):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError("%s must be an integer >= %d, got %r" % (name, minimum, value))
    return value


def _summary(manifest):
    verification = manifest.verification or {}
    return {
        "id": manifest.id,
        "started_at": manifest.get("started_at"),
        "finished_at": manifest.get("finished_at"),
        "kind": manifest.get("kind"),
        "status": manifest.status,
        "parent": manifest.parent,
        "size_bytes": manifest.size_bytes,
        "verification": verification.get("result"),
        "verified_at": verification.get("verified_at"),
    }


def _age_reference(manifest, failed_verification):
    """When a failed backup's grace period starts: the failed verification, else the run."""
    candidates = []
    if failed_verification:
        candidates.append(manifest.verification.get("verified_at"))
    candidates += [manifest.get("finished_at"), manifest.get("started_at")]
    for value in candidates:
        if value:
            try:
                return parse_iso(value)
            except ValueError:
                continue
    return None


def plan(manifests, policy, min_keep=1, orphan_grace=None, now=None, within_reference=None, copied=None):
    """Decide, without touching storage, which of ``manifests`` (``Catalog.scan`` output) stay.

    ``copied``: None, or the ids of the backups the offsite copy holds; every successful
    backup outside it is then kept (``require_copy``).

    Returns ``{"keep": [...], "prune": [...]}``, both newest first; each entry is a summary
    of the manifest plus ``reasons`` (kept) or ``reason`` (pruned).
    """
    if not isinstance(policy, Policy):
        policy = Policy(**(policy or {}))
    min_keep = _validate_limit("min_keep", min_keep, 0) or 0
    grace = parse_grace(orphan_grace)
    now = now or utc_now()
    ordered = sorted((mf.Manifest.wrap(m) for m in manifests), key=lambda m: (parse_iso(m.started_at), m.id),
                     reverse=True)
    by_id = {m.id: m for m in ordered}

    successful, failed = [], []
    for manifest in ordered:
        complete = manifest.is_complete
        bad = manifest.verification_result == VERIFIED_FAILED
        if complete and not bad:
            successful.append(manifest)
        else:
            failed.append(manifest)

    reasons = {}  # id -> [reasons] for every kept backup
    if successful:
        result = apply_policy(
            [Backup(m.id, parse_iso(m.started_at), m) for m in successful],
            policy, now=now, within_reference=within_reference)
        for backup_id, why in result.reasons.items():
            reasons[backup_id] = list(why)

    def keep(backup_id, why):
        reasons.setdefault(backup_id, [])
        if why not in reasons[backup_id]:
            reasons[backup_id].append(why)

    # Rail: the newest complete backup stays whatever the policy and verifications say.
    complete = [m for m in ordered if m.is_complete]
    if complete:
        newest = complete[0]
        if newest.id not in reasons:
            keep(newest.id, REASON_NEWEST)
    # Rail: the newest backup that passed verification.
    verified = [m for m in complete if m.verification_result == VERIFIED_OK]
    if verified and verified[0].id not in reasons:
        keep(verified[0].id, REASON_NEWEST_VERIFIED)
    # Rail: at least min_keep successful backups.
    kept_successful = sum(1 for m in successful if m.id in reasons)
    for manifest in successful:
        if kept_successful >= min_keep:
            break
        if manifest.id not in reasons:
            kept_successful += 1
            keep(manifest.id, REASON_MIN_KEEP % min_keep)

    # Rail: require_copy - a successful backup the offsite copy does not hold yet stays.
    if copied is not None:
        for manifest in successful:
            if manifest.id not in copied:
                keep(manifest.id, REASON_NOT_COPIED)

    # Failed backups wait out the grace period, then go.
    failed_reason = {}
    for manifest in failed:
        bad = manifest.verification_result == VERIFIED_FAILED
        if not manifest.is_complete:
            what = "failed backup (status %s)" % manifest.status
        else:
            what = "verification failed at %s" % manifest.verification.get("verified_at")
        since = _age_reference(manifest, bad and manifest.is_complete)
        if manifest.id in reasons:
            continue  # kept by a rail above
        if since is not None and now - since < grace:
            keep(manifest.id, "%s, within the grace period of %s" % (what, _format_grace(grace)))
        else:
            failed_reason[manifest.id] = "%s, older than the grace period of %s" % (what, _format_grace(grace))

    # Rail: an incremental needs its whole chain. Walk from the newest, so a parent kept for
    # a child is itself followed to its own parent.
    for manifest in ordered:
        if manifest.id not in reasons:
            continue
        child = manifest
        seen = {child.id}
        while child.parent and child.parent in by_id and child.parent not in seen:
            parent_id = child.parent
            seen.add(parent_id)
            keep(parent_id, REASON_PARENT % child.id)
            child = by_id[parent_id]

    kept, pruned = [], []
    for manifest in ordered:
        entry = _summary(manifest)
        if manifest.id in reasons:
            entry["reasons"] = reasons[manifest.id]
            kept.append(entry)
        else:
            entry["reason"] = failed_reason.get(manifest.id, REASON_POLICY)
            pruned.append(entry)
    return {"keep": kept, "prune": pruned}


def _format_grace(grace):
    hours = int(grace.total_seconds() // 3600)
    if hours and hours % 24 == 0:
        return "%dd" % (hours // 24)
    return "%dh" % hours


def _backup_dir_of(key):
    parts = key.split("/")
    return "/".join(parts[:2]) + "/" if len(parts) >= 3 else None


def find_orphans(storage, catalog, job, complete_ids, grace, now):
    """Garbage of ``job``: backup directories without a manifest, ``.tmp-`` leftovers, and
    unfinished multipart uploads. Returns ``(remove, wait)``, lists of entries with
    ``path``, ``objects`` (keys), ``uploads`` ((key, upload_id)), ``bytes``, ``last_modified``."""
    groups = {}

    def group(path):
        return groups.setdefault(path, {"path": path, "objects": [], "uploads": [], "bytes": 0,
                                        "last_modified": None})

    def touch(entry, moment):
        if moment is not None and (entry["last_modified"] is None or moment > entry["last_modified"]):
            entry["last_modified"] = moment

    for info in catalog.orphans:
        entry = group(_backup_dir_of(info.key) or info.key)
        entry["objects"].append(info.key)
        entry["bytes"] += info.size
        touch(entry, info.modified)
    # Leftovers of interrupted writes next to complete backups or the catalog index, and in the
    # job's restic repository, where an offsite copy writes through the engine's storage
    # (engine/restichttp.py): only the engine's unfinished objects, never restic's files.
    listed = set(key for entry in groups.values() for key in entry["objects"])
    repository = "%s/%s/" % (REPOSITORY_DIR, job)
    written = storage.list("%s/" % job)
    try:
        written += storage.list(repository)
    except MissingLocationError:
        pass
    for info in written:
        if not is_unfinished(info.key) or info.key in listed:
            continue
        entry = group(info.key)
        entry["objects"].append(info.key)
        entry["bytes"] += info.size
        touch(entry, info.modified)
    # S3: multipart uploads never completed. An upload in progress also marks its backup
    # directory as active, so a slow upload keeps its directory's first objects alive.
    for key, upload_id, initiated in (storage.list_incomplete_uploads("%s/" % job)
                                      + storage.list_incomplete_uploads(repository)):
        directory = _backup_dir_of(key)
        backup_id = directory.split("/")[1] if directory else None
        if backup_id in complete_ids or key.startswith(repository):
            entry = group("%s (upload %s)" % (key, upload_id[:12]))
        else:
            entry = group(directory or key)
        entry["uploads"].append((key, upload_id))
        touch(entry, initiated)
    remove, wait = [], []
    for path in sorted(groups):
        entry = groups[path]
        last = entry["last_modified"]
        (wait if last is not None and now - last < grace else remove).append(entry)
    return remove, wait


def _orphan_report(entry, action):
    last = entry["last_modified"]
    return {"path": entry["path"], "objects": len(entry["objects"]), "uploads": len(entry["uploads"]),
            "bytes": entry["bytes"], "last_modified": to_iso(last) if last else None, "action": action}


def wal_job_names(job, manifests):
    """The WAL jobs the ``postgres_base`` backups among ``manifests`` name, sorted (empty without one)."""
    return sorted(set(wal_job_of(job, m) for m in map(mf.Manifest.wrap, manifests) if m.kind == BASE_KIND))


def plan_wal(storage, job, manifests, kept_ids, copied=None, wal_copied=None):
    """What pruning ``job``'s base backups (``manifests``, with ``kept_ids`` staying) does to their WAL.

    Returns None when ``job`` has no ``postgres_base`` backup, else a dict per WAL job:
    ``{"job", "keep_from": [segment names], "kept", "prune": [summaries], "reason"}``
    plus ``_manifests`` (id -> manifest, for deletion). Nothing is pruned when no complete
    base backup stays, or under ``require_copy`` without ``wal_copied``.
    """
    bases = [m for m in map(mf.Manifest.wrap, manifests) if m.kind == BASE_KIND]
    if not bases:
        return None
    kept = [m for m in bases if m.id in kept_ids and m.is_complete]
    plans = []
    for wal_job in wal_job_names(job, bases):
        needs, starts = [], []
        for base in kept:
            if wal_job_of(job, base) != wal_job:
                continue
            start = pgwal.base_wal_start(base)
            if start is not None:
                needs.append(start[:2])
                starts.append(start)
        wal_manifests = Catalog(storage).scan(wal_job, with_orphans=False)
        entry = {"job": wal_job, "keep_from": [name for dummy, dummy2, name in sorted(set(starts))],
                 "kept": 0, "prune": [], "deleted": [], "reason": None, "_manifests": {}}
        plans.append(entry)
        if not needs:
            entry["reason"] = "no complete base backup using this WAL job is kept: all its WAL stays"
        elif copied is not None and wal_copied is None:
            entry["reason"] = "require_copy: the offsite copy of the WAL job was not checked: all its WAL stays"
        for manifest in wal_manifests:
            wal = manifest.stats
            parsed = pgwal.parse_segment_name(str(wal.get("file") or ""),
                                              wal.get("segment_size") or pgwal.DEFAULT_SEGMENT_SIZE)
            goes = (entry["reason"] is None and manifest.kind == WAL_KIND and parsed is not None
                    and wal.get("type") in ("segment", "partial") and not pgwal.wal_needed(needs, *parsed[:2])
                    and (wal_copied is None or manifest.id in wal_copied))
            if not goes:
                entry["kept"] += 1
                continue
            summary = {"id": manifest.id, "file": wal["file"], "type": wal["type"],
                       "finished_at": manifest.finished_at, "size_bytes": manifest.size_bytes,
                       "deleted": False}
            entry["prune"].append(summary)
            entry["_manifests"][manifest.id] = manifest
        entry["prune"].sort(key=lambda e: (e["file"], e["id"]))  # names sort as (timeline, segment)
    return plans


def _refuse_wal_job(job, manifests):
    if any(m.kind == WAL_KIND for m in manifests):
        raise ConfigError(
            "job %s holds PostgreSQL WAL (kind %s): its files are not independent backups and a retention "
            "policy must not be applied to them. Prune the %s job they belong to (its name without -wal "
            "by default): its WAL is pruned with it, keeping everything from the wal_start of the oldest kept "
            "base backup on" % (job, WAL_KIND, BASE_KIND))


def prune(storage, job, policy, min_keep=1, max_delete=None, force=False, orphan_grace=None,
          dry_run=False, now=None, within_reference=None, log=None, copied=None, wal_copied=None):
    """Apply ``policy`` to ``job`` at ``storage``; with ``dry_run`` only report. ``copied``:
    see :func:`plan` (None: no require_copy rail); ``wal_copied``: see :func:`plan_wal`.

    Returns a dict: ``job``, ``policy``, ``dry_run``, ``keep``, ``prune`` (each pruned entry
    with ``deleted``), ``orphans`` (each with ``action``), ``junk``, ``counts``, ``changed``.
    Raises :class:`PruneRefusedError` (nothing deleted) when more than ``max_delete`` backups
    would go without ``force``, and StorageError when a deletion fails (:class:`PartialPruneError`
    when backups were being deleted: what went before it is in the error's ``result``).
    """
    log = log or (lambda message: None)
    mf.validate_job_name(job)
    if not isinstance(policy, Policy):
        try:
            policy = Policy(**(policy or {}))
        except TypeError as exc:
            raise ConfigError("retention policy: %s" % exc) from None
    max_delete = _validate_limit("max_delete", max_delete, 0)
    min_keep = _validate_limit("min_keep", min_keep, 0)
    grace = parse_grace(orphan_grace)
    now = now or utc_now()

    catalog = Catalog(storage)
    manifests = catalog.scan(job)
    _refuse_wal_job(job, manifests)
    decided = plan(manifests, policy, min_keep=min_keep, orphan_grace=orphan_grace, now=now,
                   within_reference=within_reference, copied=copied)
    wal_plans = plan_wal(storage, job, manifests, set(e["id"] for e in decided["keep"]), copied, wal_copied)
    if wal_plans:
        oldest_kept = next((e for e in reversed(decided["keep"]) if e.get("kind") == BASE_KIND
                            and e.get("status") == mf.STATUS_COMPLETE), None)
        for entry in wal_plans:
            if oldest_kept is not None and entry["keep_from"] and entry["reason"] is None:
                oldest_kept["reasons"].append(pgwal.wal_keep_reason(entry["job"], entry["keep_from"][0]))
    complete_ids = set(m.id for m in manifests)
    orphans_remove, orphans_wait = find_orphans(storage, catalog, job, complete_ids, grace, now)
    result = {
        "job": job,
        "storage": storage.describe(),
        "policy": policy.as_dict(),
        "min_keep": min_keep,
        "max_delete": max_delete,
        "orphan_grace": _format_grace(grace),
        "dry_run": bool(dry_run),
        "keep": decided["keep"],
        "prune": decided["prune"],
        "orphans": ([_orphan_report(e, "would remove" if dry_run else "removed") for e in orphans_remove]
                    + [_orphan_report(e, "kept (within grace)") for e in orphans_wait]),
        "junk": list(catalog.junk),
        "deleted": [],
    }
    if wal_plans is not None:
        result["wal"] = [{key: value for key, value in entry.items() if key != "_manifests"} for entry in wal_plans]
    for entry in result["prune"]:
        entry["deleted"] = False
    result["counts"] = {
        "backups": len(manifests), "kept": len(result["keep"]), "pruned": len(result["prune"]),
        "orphans_removed": len(orphans_remove), "orphans_waiting": len(orphans_wait),
        "junk": len(catalog.junk),
    }
    wal_pruned = sum(len(entry["prune"]) for entry in wal_plans or [])
    if wal_plans is not None:
        result["counts"]["wal_pruned"] = wal_pruned
        result["counts"]["wal_kept"] = sum(entry["kept"] for entry in wal_plans)
    result["changed"] = bool(result["prune"] or orphans_remove or wal_pruned)
    restic_plan = None
    if resticstore.uses_restic(storage, manifests):
        # Before anything is deleted: a missing password fails here, not half-way.
        # Snapshots of a backup whose manifest is junk (unreadable) stay, as the junk does.
        junk_ids = {item["key"].split("/")[1] for item in catalog.junk if item["key"].count("/") >= 2}
        restic_plan = resticstore.plan_repository_prune(
            storage, job, manifests, {entry["id"] for entry in result["prune"]}, grace, now, junk_ids)
        result["changed"] = result["changed"] or bool(restic_plan[1]["orphan_snapshots"]
                                                      or restic_plan[1]["duplicate_snapshots"])
    if max_delete is not None and len(result["prune"]) > max_delete and not force:
        raise PruneRefusedError(
            "job %s: the policy would delete %d backups, more than max_delete=%d; nothing was "
            "deleted. Check the policy, then raise max_delete or set force to go ahead"
            % (job, len(result["prune"]), max_delete), result)
    if dry_run:
        if restic_plan is not None:
            result["restic"] = resticstore.prune_repository(storage, job, restic_plan[0], restic_plan[1], True, log)
        return result

    by_id = {m.id: m for m in manifests}
    for entry in result["prune"]:  # newest first: an incremental goes before its parent
        try:
            catalog.delete_backup(by_id[entry["id"]])
        except StorageError as exc:
            result["changed"] = bool(result["deleted"])
            raise PartialPruneError(job, entry["id"], result, exc) from None
        entry["deleted"] = True
        result["deleted"].append(entry["id"])
        log("deleted backup %s (%s)" % (entry["id"], entry["reason"]))
    for plan_entry, shown in zip(wal_plans or [], result.get("wal", [])):
        wal_catalog = Catalog(storage)
        for entry in shown["prune"]:  # oldest first: an interruption leaves the archive contiguous
            try:
                wal_catalog.delete_backup(plan_entry["_manifests"][entry["id"]])
            except StorageError as exc:
                result["changed"] = True
                raise PartialPruneError(shown["job"], entry["id"], result, exc) from None
            entry["deleted"] = True
            shown["deleted"].append(entry["id"])
        if shown["prune"]:
            log("deleted %d WAL files of job %s older than %s" % (len(shown["prune"]), shown["job"],
                                                                  shown["keep_from"][0]))
    for entry in orphans_remove:
        for key in entry["objects"]:
            storage.delete(key)
        for key, upload_id in entry["uploads"]:
            storage.abort_incomplete_upload(key, upload_id)
        log("removed orphaned %s (%d objects, %d uploads)" % (entry["path"], len(entry["objects"]), len(entry["uploads"])))
    if restic_plan is not None:
        # The manifests are gone first (a backup is never listed without its data); the
        # snapshots of the backups actually deleted are forgotten, then restic prunes.
        deleted = set(result["deleted"])
        restic_plan[1]["forget"] = [snapshot for manifest in manifests if manifest.id in deleted
                                    and resticstore.is_restic(manifest)
                                    for snapshot in resticstore.manifest_snapshots(manifest)]
        try:
            result["restic"] = resticstore.prune_repository(storage, job, restic_plan[0], restic_plan[1], False, log)
        except (StorageError, IntegrityError, ConfigError) as exc:
            # The manifests are gone already: say what was deleted, and that the repository
            # catches up later (snapshots without a manifest are forgotten after the orphan
            # grace; an unfinished restic prune runs again at the next prune).
            raise PartialPruneError(job, None, result, exc, message=(
                "job %s: %d backups deleted, then cleaning the restic repository failed (the next prune "
                "finishes it): %s" % (job, len(result["deleted"]), exc))) from None
    return result


__all__ = ["PartialPruneError", "PruneRefusedError", "parse_grace", "plan", "prune", "find_orphans", "RetentionError"]
