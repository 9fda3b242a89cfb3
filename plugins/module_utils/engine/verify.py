"""Verifying stored backups (``backup_verify``, ``runner verify`` and the restore drill).

For each chosen backup (``latest``, an id, an ISO-8601 time, or ``all``) every stored object
of its chain is read to the end: size and SHA-256 against the manifest, decrypted, fully
decompressed. With ``test_restore`` the backup is then restored into the kind's scratch
target (a throwaway database, Redis, directory) whose data checks compare the result with
the manifest's ``stats``.

The outcome is recorded next to the backup (``verification.json``, mirrored in the catalog
index) so retention can keep the newest verified backup and metrics can report the last
verified time. Only verdicts about the backup are recorded: a wrong key or an unreachable
scratch server says nothing about the backup and is reported, not recorded.

Record format (``verification.json``)::

    {"schema": 1, "result": "ok" | "failed", "verified_at": "2024-01-15T02:10:00Z",
     "test_restore": false, "objects": 2, "stored_bytes": 1234, "plain_bytes": 5678,
     "checks": [...], "error": null, "duration_seconds": 1.2}

A result with ``test_restore`` also carries ``phases``, the wall time of each phase of the
restore (engine/restore.py, RestoreClock; one pass when the scratch target declares its
payloads, as a real restore does): what a restore of this backup takes, which the drill
publishes as the job's expected recovery time.
"""

import contextlib
import time

from . import kinds
from . import resticstore
from .backup import ENGINE_VERSION
from .catalog import Catalog
from .errors import ConfigError, IntegrityError
from .integrity import declared_payloads, diagnose, verify_chain
from .keys import KeyMismatchError, chain_identities
from .restore import PROGRESS_INTERVAL, RestoreClock, restore_one_pass, restore_verified
from .selection import backup_chain, check_selector, select_backup
from .timeutil import to_iso, utc_now

RECORD_SCHEMA = 1
RESULT_OK = "ok"
RESULT_FAILED = "failed"


def select_backups(catalog, job, backup="latest"):
    """Manifests chosen by ``backup``: ``all`` (newest first), ``latest``, an id or a time."""
    if backup == "all":
        found = catalog.scan(job, with_orphans=False)
        if not found:
            raise ConfigError("job %s has no complete backup to verify" % job)
        return found
    return [select_backup(catalog, job, backup)[0]]


def verify_one(storage, catalog, manifest, identity=None, passphrase=None, test_restore=False,
               scratch_options=None, target_class=None, verified_cache=None, clock=None):
    """Verify one backup; returns the result dict (``result`` ok/failed/error), records nothing.

    ``clock`` (a RestoreClock) reports progress; a test restore's result gets its ``phases``
    (up to the end of the target's checks; dropping the scratch target is not part of them).
    """
    clock = clock or RestoreClock()
    result = {"id": manifest.id, "job": manifest.job, "kind": manifest.kind,
              "finished_at": manifest.finished_at, "test_restore": bool(test_restore),
              "objects": 0, "stored_bytes": 0, "plain_bytes": 0, "checks": [], "error": None}
    try:
        chain = backup_chain(catalog, manifest)
        manifest = chain[-1]
        keys = chain_identities(storage, chain, identity, passphrase)
        clock.mark("select")
        if test_restore:
            cls = target_class or kinds.target_class(manifest.kind)
            with contextlib.ExitStack() as stack:
                try:
                    target = stack.enter_context(cls.scratch(manifest, dict(scratch_options or {})))
                except Exception as exc:  # pylint: disable=broad-except  # re-raised unless the backup is damaged
                    # No scratch target (no redis-server, no rights): a damaged backup is still
                    # a failed verdict, not an error, as when verification came first.
                    diagnose(storage, chain, keys, exc, lambda message: None)
                    raise
                summary, report = _test_restore(storage, manifest, chain, keys, target, verified_cache, clock)
                result["phases"] = clock.phases()
            result["checks"] = report.get("checks") or []
            result["scratch"] = report.get("target") or target.describe()
        else:
            summary = verify_chain(storage, chain, keys, verified_cache, clock)
            clock.mark("verify")
        result.update(objects=summary["objects"], stored_bytes=summary["stored_bytes"],
                      plain_bytes=summary["plain_bytes"], chain=summary["backups"],
                      mode=summary.get("mode", "two-pass"))
        result["result"] = RESULT_OK
    except KeyMismatchError as exc:
        result.update(result="error", error=str(exc))
    except IntegrityError as exc:
        result.update(result=RESULT_FAILED, error=str(exc))
    # Timed by the clock that times the phases, and never below their total (which is kept in
    # microseconds): a rounded duration must not read shorter than the phases it contains.
    result["duration_seconds"] = max(round(time.monotonic() - clock.started, 3),
                                     result.get("phases", {}).get("total", 0.0))
    result["verified_at"] = to_iso(utc_now())
    return result


def _test_restore(storage, manifest, chain, keys, target, verified_cache, clock):
    """Verify ``chain`` and restore it into the scratch ``target``: ``(verification summary, report)``.

    The path a real restore takes (engine/restore.py): one pass when the target declares its
    payloads, so the phases a drill publishes are those of the restore it stands for; else
    every object is read in full first. A scratch target is thrown away either way.
    """
    declared = declared_payloads(target, manifest, chain)
    if declared is None:
        summary = verify_chain(storage, chain, keys, verified_cache, clock)
        clock.mark("verify")
        return summary, restore_verified(storage, manifest, chain, keys, target, clock)
    summary, report, dummy = restore_one_pass(storage, chain, keys, target, declared, clock)
    if verified_cache is not None:
        by_backup = {}
        for detail in summary["details"]:
            by_backup.setdefault(detail["backup"], []).append({k: v for k, v in detail.items() if k != "backup"})
        verified_cache.update(by_backup)
    return summary, report


def record_of(result):
    """The ``verification.json`` document for a result."""
    record = {key: result.get(key) for key in ("result", "verified_at", "test_restore", "objects",
                                               "stored_bytes", "plain_bytes", "checks", "error",
                                               "duration_seconds")}
    record.update(schema=RECORD_SCHEMA, engine=ENGINE_VERSION)
    return record


def verify(storage, job, backup="latest", identity=None, passphrase=None, test_restore=False,
           scratch_options=None, record=True, target_class=None, log=None, progress=None,
           progress_interval=PROGRESS_INTERVAL):
    """Verify the chosen backups of ``job``; record each verdict unless ``record`` is false.

    ``progress``: see engine/restore.py, RestoreClock. Returns
    ``{job, backup, results, verified, failed, errors, ok, changed}``.
    """
    log = log or (lambda message: None)
    catalog = Catalog(storage)
    check_selector(backup)
    manifests = select_backups(catalog, job, backup or "latest")
    cache = {}
    results = []
    changed = False
    restic_check = None
    if any(resticstore.is_restic(manifest) for manifest in manifests):
        # The repository's own check, once per run: structure, plus the configured share of
        # the pack data (storage.restic_read_data_subset; all of it in a drill or test restore
        # unless a share is configured). Each backup's payloads are then dumped in full and
        # compared with their manifest's SHA-256.
        try:
            restic_check = dict(resticstore.check_repository(storage, job, full=test_restore), ok=True)
        except IntegrityError as exc:
            restic_check = {"ok": False, "error": str(exc),
                            "read_data_subset": resticstore.read_data_subset(storage) or ("all" if test_restore else None)}
        log("restic check of job %s (read data: %s): %s" % (
            job, restic_check.get("read_data_subset") or "none",
            "ok" if restic_check["ok"] else restic_check["error"]))
    for manifest in manifests:
        result = verify_one(storage, catalog, manifest, identity, passphrase, test_restore,
                            scratch_options, target_class, cache, RestoreClock(progress, progress_interval))
        if resticstore.is_restic(manifest):
            result["restic_check"] = restic_check
            if not restic_check["ok"] and result["result"] == RESULT_OK:
                # The repository's check covers every job's packs, and this backup's own payloads
                # just dumped with their recorded SHA-256: a run-level error, not a failed verdict
                # recorded on this backup (prune deletes failed backups after the grace period, so
                # one damaged pack elsewhere would otherwise condemn the whole history).
                result.update(result="error", error="restic check of the repository found errors elsewhere "
                                                    "(this backup's payloads dumped intact): %s" % restic_check["error"])
        if result["result"] in (RESULT_OK, RESULT_FAILED) and record:
            catalog.record_verification(manifest, record_of(result))
            result["recorded"] = True
            changed = True
        else:
            result["recorded"] = False
        log("backup %s: %s%s" % (manifest.id, result["result"],
                                 ": " + result["error"] if result["error"] else
                                 " (%d objects, %d bytes)" % (result["objects"], result["stored_bytes"])))
        results.append(result)
    counts = {name: sum(1 for r in results if r["result"] == name) for name in (RESULT_OK, RESULT_FAILED, "error")}
    return {"job": job, "backup": backup or "latest", "results": results, "verified": counts[RESULT_OK],
            "failed": counts[RESULT_FAILED], "errors": counts["error"],
            "ok": counts[RESULT_OK] == len(results), "changed": changed}
