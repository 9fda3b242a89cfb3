"""The runner: what the CronJob containers execute.

    python -m ansible_collections.biometrics.backup.plugins.module_utils.engine.runner \\
        <backup|verify|restore|drill|prune|list|copy|wal-stream|wal-fetch> --config JOB_FILE [options]

``wal-stream`` and ``wal-fetch`` (PostgreSQL point-in-time recovery, kind ``postgres_base``) are
described in engine/pitr_runner.py; ``wal-fetch`` exits as PostgreSQL's restore_command expects.

It reads a job file (engine/jobconfig.py; secrets only as ``*_file`` / ``*_env``), checks
everything before it starts, runs the command with the same engine as the Ansible modules,
pushes metrics when the job file asks for them, prints the result as one JSON document on
stdout and logs to stderr (plain text or JSON lines, never a secret). ``prune``, ``verify``
and ``list`` accept several ``--config`` (one job each).

Exit codes:
    0  success
    1  the operation failed (source, storage or tool error; unexpected error)
    2  configuration or usage error, detected before anything was written;
       also a key that cannot open the backups, a storage location that does not exist
       (list, verify, restore, drill, prune; backup creates a missing directory), and prune
       refusing (max_delete)
    3  integrity: verification failed, a restore or drill was refused or its checks failed,
       a copy left a backup behind (a source object that does not match its manifest, or
       a copied object that does not read back right)
    4  the backup was stored but its size broke the size-anomaly ``fail`` policy
  130  interrupted (SIGINT); 143 terminated (SIGTERM) — nothing partial stays listed

A metrics push that fails is logged as an error but does not change the exit code: the
backup exists, and a missed push shows up as staleness in the alerts.
"""

import argparse
import datetime
import json
import math
import signal
import sys
import time

from . import operations, resticstore
from .config import read_text_file, resolve_secret_refs
from .errors import BackupError, ConfigError, IntegrityError, MissingDependencyError
from .jobconfig import JobConfig, parse_text, secret_values
from .pipeline import Progress
from .podlocks import PodLockHolders
from .operations import where
from .keys import KeyMismatchError
from .storage import location
from .storage.base import MissingLocationError
from .timeutil import to_iso, utc_now

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTEGRITY = 3
EXIT_SIZE = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
COMMANDS = ("backup", "verify", "restore", "drill", "prune", "list", "copy", "wal-stream", "wal-fetch")
MULTI_CONFIG = ("prune", "verify", "list", "copy")
PROGRESS_INTERVAL = 5.0


class Terminated(BaseException):
    """SIGTERM (Kubernetes stopping the pod): unwinds like Ctrl-C so partial objects are removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


# -- logging ------------------------------------------------------------------------------

def _human_bytes(count):
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024.0
    return "%d B" % count


class Log:
    """Lines on stderr: ``<time> <LEVEL> <command> <job>: message`` or JSON objects.

    Every line passes through ``scrub``: secret values read for this run are replaced,
    a last line of defence behind error messages that are built not to hold them.
    """

    def __init__(self, fmt="text", stream=None):
        self.format = fmt
        self.stream = stream or sys.stderr
        self.command = None
        self.job = None
        self._secrets = set()

    def add_secrets(self, values):
        self._secrets.update(value for value in values if isinstance(value, str) and len(value) >= 4)

    def scrub(self, text):
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "********")
        return text

    def emit(self, level, message, **fields):
        message = self.scrub(str(message))
        if self.format == "json":
            record = {"time": to_iso(utc_now()), "level": level, "command": self.command, "job": self.job,
                      "message": message}
            record.update({key: value for key, value in fields.items() if value is not None})
            line = self.scrub(json.dumps(record, sort_keys=True, default=str))
        else:
            where = " ".join(part for part in (self.command, self.job) if part)
            line = "%s %s %s: %s" % (to_iso(utc_now()), level.upper(), where or "runner", message)
        self.stream.write(line + "\n")
        self.stream.flush()

    def info(self, message, **fields):
        self.emit("info", message, **fields)

    def warning(self, message, **fields):
        self.emit("warning", message, **fields)

    def error(self, message, **fields):
        self.emit("error", message, **fields)


def exit_code_for(exc):
    if isinstance(exc, (KeyMismatchError, MissingLocationError)):
        # A storage location that is not there (mistyped path, unmounted volume, missing
        # bucket) is found before anything is read or written: the job file is wrong.
        return EXIT_CONFIG
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, (ConfigError, MissingDependencyError)):
        return EXIT_CONFIG
    return EXIT_FAILED


# -- metrics ------------------------------------------------------------------------------

class Metrics:
    """BackupMetrics when the job file configures them; a no-op otherwise. Shipping never raises."""

    def __init__(self, config, log, job=None):
        self.config = config
        self.log = log
        self.metrics = None
        if config is not None and config.metrics_enabled:
            from .metrics import BackupMetrics  # prometheus_client is only needed when configured
            self.metrics = BackupMetrics(job or config.job, config.kind, config.instance)

    def record(self, method, *args, **kwargs):
        if self.metrics is not None:
            getattr(self.metrics, method)(*args, **kwargs)

    def ship(self):
        if self.metrics is None or not self.metrics.recorded:
            return
        metrics = self.config.metrics
        try:
            if metrics.get("pushgateway_url"):
                username, password = self.config.metrics_credentials()
                self.log.add_secrets([password])
                self.metrics.push(metrics["pushgateway_url"], timeout=float(metrics.get("timeout") or 10),
                                  username=username, password=password)
                self.log.info("metrics pushed to %s" % metrics["pushgateway_url"].split("@")[-1])
            if metrics.get("textfile"):
                self.metrics.write_textfile(metrics["textfile"])
                self.log.info("metrics written to %s" % metrics["textfile"])
        except BackupError as exc:
            self.log.error("metrics were not shipped: %s" % exc)


# -- commands -----------------------------------------------------------------------------

def _finite(value):
    return value if value is None or math.isfinite(value) else None


def _prepare(config, command, log, from_copy=False):
    if from_copy:
        # --from-copy: the copy's destination stands in for the job's storage before anything is
        # resolved, so only its credentials are read: a restore, verify, list or drill from the
        # copy needs nothing of the primary storage (neither its objects nor its credentials),
        # which is what a disaster leaves.
        if not config.copy.get("destination"):
            raise ConfigError("%s: --from-copy needs the 'copy' section's destination" % config.where)
        config.storage = config.copy_destination()
    prepared = config.prepare(command)
    log.add_secrets(secret_values(config.storage_options()))
    if command == "backup":
        log.add_secrets(secret_values(config.source_options()))
        log.add_secrets([prepared["encryption"].get("passphrase")])
    if command in ("restore", "verify", "drill"):
        log.add_secrets(list(prepared["keys"]))
    if command == "copy" or "destination" in prepared:
        log.add_secrets(secret_values(config.copy_destination_options()))
    if prepared.get("reencrypt"):
        identity = prepared["reencrypt"]["_identity"] or ""
        log.add_secrets([identity, prepared["reencrypt"]["_passphrase"]] + identity.splitlines())
    return prepared


def cmd_backup(config, args, log):
    metrics = Metrics(config, log)
    started = time.monotonic()
    try:
        prepared = _prepare(config, "backup", log)
        storage = prepared["storage"]
        identity, passphrase = config.read_keys()
        log.add_secrets([identity, passphrase])

        def report(raw, stored, elapsed):
            log.info("progress: %s read, %s stored, %s/s" % (
                _human_bytes(raw), _human_bytes(stored), _human_bytes(raw / elapsed if elapsed else 0)),
                raw_bytes=raw, stored_bytes=stored, elapsed_seconds=round(elapsed, 1))

        run = operations.prepare_backup(config.job, prepared["source"], storage, compression=config.compression,
                                        encryption=prepared["encryption"], identity=identity, passphrase=passphrase,
                                        size_policy=config.size_policy,
                                        progress=Progress(report, interval=args.progress_interval))
        if args.check:
            plan = run.plan()
            log.info("check mode: would back up %s to %s" % (where(plan["source"]), where(plan["storage"])))
            return EXIT_OK, {"changed": False, "check_mode": True, "plan": plan}
        log.info("starting %s backup to %s" % (config.kind, where(storage.describe())))
        manifest = run.run()
    except BaseException:
        metrics.record("record_backup_result", False, utc_now())
        if config.schedule:
            metrics.record("record_schedule", cron_expression=config.schedule)
        metrics.ship()
        raise
    verdict = run.size_verdict
    finished = datetime.datetime.fromisoformat(manifest.finished_at.replace("Z", "+00:00"))
    ratio = _finite(manifest.size_change_ratio)
    failed_size = verdict is not None and verdict.failed
    if failed_size:
        metrics.record("record_backup_result", False, finished)
        metrics.record("record_size_change_ratio", verdict.ratio)
    else:
        stored_new, repository_bytes = operations.stored_figures(storage, manifest)
        duration = manifest.duration_seconds
        metrics.record("record_backup_result", True, finished,
                       duration_seconds=time.monotonic() - started if duration is None else duration,
                       size_bytes=manifest.size_bytes,
                       size_change_ratio=verdict.ratio if verdict is not None else None,
                       stored_new_bytes=stored_new, repository_bytes=repository_bytes)
    if config.schedule:
        metrics.record("record_schedule", cron_expression=config.schedule)
    metrics.ship()
    log.info("backup %s stored: %s in %d objects (%s before compression) in %.1fs" % (
        manifest.id, _human_bytes(manifest.size_bytes), len(manifest.objects),
        _human_bytes(manifest.raw_bytes or 0), manifest.duration_seconds or 0),
        backup_id=manifest.id, size_bytes=manifest.size_bytes)
    if verdict is not None and verdict.level != "ok":
        (log.error if failed_size else log.warning)("size anomaly: %s" % verdict.reason, size_change_ratio=ratio)
    result = {"changed": True, "backup_id": manifest.id, "job": manifest.job, "kind": manifest.kind,
              "size_bytes": manifest.size_bytes, "size_change_ratio": ratio,
              "size_check": manifest.size_check, "parent": manifest.parent,
              "duration_seconds": manifest.duration_seconds, "stats": manifest.stats,
              "manifest": manifest.to_dict()}
    if failed_size:
        raise _SizeFailure(result, verdict.reason)
    return EXIT_OK, result


class _SizeFailure(Exception):
    def __init__(self, result, reason):
        super().__init__("backup %s was stored, but its size breaks the job's size policy: %s"
                         % (result["backup_id"], reason))
        self.result = result


def _scratch_options(config):
    if config.drill.get("target") is not None:
        return config.target_options("drill")
    return resolve_secret_refs(operations.scratch_options(config.kind, config.source), "source")


def cmd_verify(config, args, log):
    prepared = _prepare(config, "verify", log, args.from_copy)
    identity, passphrase = prepared["keys"]
    selector = args.backup or config.verify.get("backup") or "latest"
    test_restore = bool(args.test_restore or config.verify.get("test_restore"))
    scratch = _scratch_options(config) if test_restore else None
    if scratch:
        log.add_secrets(secret_values(scratch))
    outcome = operations.verify(prepared["storage"], config.job, backup=selector, identity=identity,
                                passphrase=passphrase, test_restore=test_restore, scratch_options=scratch,
                                record=not args.check, log=log.info)
    metrics = Metrics(config, log)
    if outcome["changed"]:
        metrics.record("record_verification", outcome["failed"] == 0, utc_now())
        metrics.ship()
    if outcome["failed"]:
        return EXIT_INTEGRITY, outcome
    if outcome["errors"]:
        return EXIT_CONFIG, outcome
    return EXIT_OK, outcome


def restore_progress(log):
    """``progress`` for engine/restore.py: one log line per report, as backups print theirs."""
    def report(phase, done, total, elapsed, items=None):
        counted = sorted((items or {}).items())
        units = "".join(", %s %d of %d" % (what, did, whole) if whole is not None else ", %s %d" % (what, did)
                        for what, (did, whole) in counted)
        fields = {"%s_%s" % (what, key): value for what, (did, whole) in counted
                  for key, value in (("done", did), ("total", whole))}
        log.info("progress: %s %s of %s plaintext%s, %s/s%s" % (
            phase, _human_bytes(done), _human_bytes(total) if total else "?",
            " (%d%%)" % (100 * done // total) if total else "", _human_bytes(done / elapsed if elapsed else 0), units),
            phase=phase, plain_bytes=done, total_plain_bytes=total, elapsed_seconds=round(elapsed, 1), **fields)
    return report


def _phases_text(phases):
    return ", ".join("%s %.1fs" % (name, seconds) for name, seconds in phases.items() if name != "total")


def _load_override(path):
    if not path:
        return None
    return parse_text(read_text_file(path, "target file"), "target file %s" % path)


def cmd_restore(config, args, log):
    if config.kind == "postgres_base":  # point-in-time recovery: engine/pitr.py
        from . import pitr_runner
        return pitr_runner.cmd_restore(config, args, log, _load_override(args.target_file))
    prepared = _prepare(config, "restore", log, args.from_copy)
    identity, passphrase = prepared["keys"]
    options = config.target_options("restore", _load_override(args.target_file))
    log.add_secrets(secret_values(options))
    backup = args.backup or (None if args.point_in_time else config.restore.get("backup"))
    point_in_time = args.point_in_time or (None if args.backup else config.restore.get("point_in_time"))
    report = operations.restore(prepared["storage"], config.job, options, kind=config.kind, backup=backup,
                                point_in_time=point_in_time, identity=identity, passphrase=passphrase,
                                check_mode=args.check, log=log.info, progress=restore_progress(log),
                                progress_interval=args.progress_interval, verify_first=args.verify_first)
    log.info("%s %s backup %s: %d objects verified, %d checks passed in %.1fs (%s)" % (
        "verified (check mode, nothing written)" if args.check else "restored",
        report["kind"], report["backup_id"], report["verification"]["objects"],
        sum(1 for check in report["checks"] if check.get("ok")), report["phases"]["total"],
        _phases_text(report["phases"])), phases=report["phases"])
    return EXIT_OK, report


def drill_metrics_job(job, from_copy):
    """The ``job`` label of a drill's metrics: ``<job>-offsite`` for a drill from the copy, so
    that a failing offsite drill is not hidden by the next successful drill of the primary."""
    return "%s-offsite" % job if from_copy else job


def cmd_drill(config, args, log):
    """Restore the latest backup into a scratch target and check it: the weekly recovery drill.

    A ``postgres_base`` job is drilled by a point-in-time restore to a random moment of its
    recovery window (engine/pitr_drill.py).
    """
    job = config.drill.get("job") or config.job
    log.job = job
    metrics = Metrics(config, log, job=drill_metrics_job(job, args.from_copy))
    started = time.monotonic()
    pitr = config.kind == "postgres_base"
    if args.point_in_time and not pitr:
        raise ConfigError("drill --point-in-time is for jobs of kind postgres_base; a %s drill restores the latest "
                          "backup or --backup" % config.kind)
    try:
        prepared = _prepare(config, "drill", log, args.from_copy)
        if pitr:
            from . import pitr_drill
            ok, outcome = pitr_drill.cmd_drill(config, args, log, prepared, job)
        else:
            identity, passphrase = prepared["keys"]
            scratch = _scratch_options(config)
            log.add_secrets(secret_values(scratch))
            outcome = operations.drill(prepared["storage"], job, backup=args.backup or "latest", identity=identity,
                                       passphrase=passphrase, scratch_options=scratch, record=not args.check,
                                       log=log.info, progress=restore_progress(log),
                                       progress_interval=args.progress_interval)
            ok = outcome["ok"]
    except BaseException:
        metrics.record("record_drill", False, utc_now())
        metrics.ship()
        raise
    duration = time.monotonic() - started
    outcome["duration_seconds"] = round(duration, 3)
    outcome["from_copy"] = bool(args.from_copy)
    if pitr:
        if args.check:
            log.info("check mode: would recover %s to %s and check it" % (job, outcome["target_time"]))
            return EXIT_OK, outcome
        metrics.record("record_drill", ok, utc_now(), duration_seconds=duration)
        metrics.ship()
        failed = [check for check in outcome["checks"] if not check["ok"]]
        if ok:
            log.info("drill passed: %s recovered to %s (last commit %s), %d tables, %d rows counted, %d checks, in %.1fs"
                     % (job, outcome["target_time"], (outcome["recovered_to"] or {}).get("last_commit_time"),
                        outcome["tables"] or 0, outcome["rows"] or 0, len(outcome["checks"]), duration))
            return EXIT_OK, outcome
        log.error("drill failed for %s at %s: %s" % (job, outcome["target_time"], "; ".join(
            "%s: expected %s, got %s" % (check["what"], check.get("expected"), check.get("actual")) for check in failed)))
        return EXIT_INTEGRITY, outcome
    metrics.record("record_drill", ok, utc_now(), duration_seconds=duration)
    phases = outcome["results"][0].get("phases")
    if ok and phases:
        metrics.record("record_drill_phases", phases)
    if outcome["changed"]:
        metrics.record("record_verification", outcome["failed"] == 0, utc_now())
    metrics.ship()
    result = outcome["results"][0]
    if ok:
        log.info("drill passed: backup %s restored into a scratch target and checked (%d checks) in %.1fs%s"
                 % (result["id"], len(result["checks"]), duration,
                    " (expected recovery time %.1fs: %s)" % (phases["total"], _phases_text(phases)) if phases else ""),
                 phases=phases)
        return EXIT_OK, outcome
    log.error("drill failed for backup %s: %s" % (result["id"], result["error"]))
    return (EXIT_INTEGRITY if outcome["failed"] else EXIT_CONFIG), outcome


def cmd_prune(config, args, log):
    if args.destination:
        return _prune_destination(config, args, log)
    prepared = _prepare(config, "prune", log)
    options = config.prune_options()
    metrics = Metrics(config, log)
    result = operations.prune(prepared["storage"], config.job, config.retention_policy,
                              min_keep=options.get("min_keep", 1), max_delete=options.get("max_delete"),
                              force=bool(args.force or options.get("force")),
                              orphan_grace=options.get("orphan_grace"), dry_run=args.check, log=log.info,
                              copy_location=prepared["destination"] if options.get("require_copy") else None)
    counts = result["counts"]
    if not args.check:
        metrics.record("record_retention", counts["kept"], len(result["deleted"]), utc_now())
        metrics.ship()
    log.info("%s: kept %d, %s %d backups%s, %d orphans removed, %d junk objects reported" % (
        "dry run" if args.check else "pruned", counts["kept"], "would prune" if args.check else "pruned",
        counts["pruned"], "" if "wal_pruned" not in counts else " and %d WAL files (%d kept)" % (
            counts["wal_pruned"], counts["wal_kept"]), counts["orphans_removed"], counts["junk"]))
    return EXIT_OK, result


def cmd_copy(config, args, log):
    """Copy the job's backups to ``copy.destination``, each verified there, manifest last."""
    metrics = Metrics(config, log)
    try:
        prepared = _prepare(config, "copy", log)
        source, destination = prepared["storage"], prepared["destination"]
        reencrypt = prepared.get("reencrypt")
        log.info("%s %s to %s%s" % ("check mode: planning the copy of" if args.check else "copying",
                                    where(source.describe()), where(destination.describe()),
                                    ", re-encrypted to %d recipients" % len(reencrypt["recipients"]) if reencrypt else ""))
        outcome = operations.copy(source, destination, config.job,
                                  backup=args.backup or config.copy.get("backup") or "all",
                                  recheck=config.copy.get("recheck") or "size", check_mode=args.check, log=log.info,
                                  policy=config.copy_policy,
                                  min_keep=config.prune_options("copy.retention").get("min_keep", 1),
                                  reencrypt=reencrypt)
    except BaseException:
        if not args.check:
            metrics.record("record_copy", False, utc_now())
            metrics.ship()
        raise
    wal = outcome.get("wal") or []
    if not args.check:
        metrics.record("record_copy", outcome["ok"], utc_now(), lag_seconds=outcome["lag_seconds"],
                       bytes_copied=outcome["bytes_copied"] + sum(entry["bytes_copied"] for entry in wal))
        metrics.ship()
    log.info("%s: %d backups %s, %d in sync, %d failed, %d skipped, %s copied, lag %ds%s" % (
        "check mode" if args.check else "copy done", len(outcome["planned"] if args.check else outcome["copied"]),
        "to copy" if args.check else "copied", len(outcome["in_sync"]), len(outcome["failed"]),
        len(outcome["skipped"]), _human_bytes(outcome["bytes_copied"]), outcome["lag_seconds"],
        "".join("; WAL job %s: %d files %s, %d in sync, %d failed, %s" % (
            entry["job"], len(entry["planned"] if args.check else entry["copied"]),
            "to copy" if args.check else "copied", entry["in_sync"], len(entry["failed"]) + len(entry["skipped"]),
            _human_bytes(entry["bytes_copied"])) for entry in wal)),
        bytes_copied=outcome["bytes_copied"], lag_seconds=outcome["lag_seconds"])
    return (EXIT_OK if outcome["ok"] else EXIT_INTEGRITY), outcome


def _prune_destination(config, args, log):
    """``prune --destination``: copy.retention applied at copy.destination, with the same rails."""
    if config.copy_policy is None or not config.copy.get("destination"):
        raise ConfigError("%s: prune --destination needs copy.destination and copy.retention" % config.where)
    # The destination alone: the pod of <job>-copy-prune mounts its credentials and not the primary
    # storage's, nor copy.reencrypt's key (a prune decrypts nothing).
    destination_options = config.copy_destination_options()
    log.add_secrets(secret_values(destination_options))
    destination = location.build_storage(destination_options)
    options = config.prune_options("copy.retention")
    result = operations.prune(destination, config.job, config.copy_policy, min_keep=options.get("min_keep", 1),
                              max_delete=options.get("max_delete"), force=bool(args.force or options.get("force")),
                              orphan_grace=options.get("orphan_grace"), dry_run=args.check, log=log.info)
    counts = result["counts"]
    log.info("%s at %s: kept %d, %s %d backups%s" % (
        "dry run" if args.check else "pruned", where(destination.describe()), counts["kept"],
        "would prune" if args.check else "pruned", counts["pruned"], "" if "wal_pruned" not in counts
        else " and %d WAL files (%d kept)" % (counts["wal_pruned"], counts["wal_kept"])))
    return EXIT_OK, result


def cmd_list(config, args, log):
    storage = _prepare(config, "list", log, args.from_copy)["storage"]
    result = operations.inventory(storage, args.job or config.job)
    log.info("%d backups, %d junk objects, %d orphaned objects, %d unfinished uploads (%s)" % (
        len(result["backups"]), len(result["junk"]), len(result["orphans"]), len(result["incomplete_uploads"]),
        _human_bytes(result["incomplete_uploads_summary"]["bytes"])))
    return EXIT_OK, result


def cmd_wal_stream(config, args, log):
    from . import pitr_runner
    return pitr_runner.cmd_wal_stream(config, args, log)


def cmd_wal_fetch(config, args, log):
    from . import pitr_runner
    return pitr_runner.cmd_wal_fetch(config, args, log)


HANDLERS = {"backup": cmd_backup, "verify": cmd_verify, "restore": cmd_restore, "drill": cmd_drill,
            "prune": cmd_prune, "list": cmd_list, "copy": cmd_copy, "wal-stream": cmd_wal_stream,
            "wal-fetch": cmd_wal_fetch}


# -- main ---------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ansible_collections.biometrics.backup.plugins.module_utils.engine.runner",
        description="Run one biometrics.backup job command from a job file.")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", "-c", action="append", required=True, metavar="JOB_FILE",
                        help="job file (YAML or JSON); prune, verify and list accept several")
    parser.add_argument("--log-format", choices=("text", "json"), help="default: the job file's log_format")
    parser.add_argument("--check", action="store_true",
                        help="plan / verify only: backup and prune report what they would do, restore "
                             "verifies without writing, verify and drill record nothing, copy lists what it would copy")
    parser.add_argument("--backup", help="latest (default), a backup id, an ISO-8601 time, or all (verify); "
                        "copy: all (default), latest or a backup id")
    parser.add_argument("--point-in-time", help="restore: the newest backup at or before this ISO-8601 time; "
                        "drill (postgres_base): recover to this time instead of a random one")
    parser.add_argument("--restore-point", help="restore (postgres_base): recover to this named restore point "
                        "(pg_create_restore_point); --point-in-time is then an upper bound")
    parser.add_argument("--seed", type=int, help="drill (postgres_base): seed of the random target time")
    parser.add_argument("--target-file", help="restore: YAML/JSON of target options merged over restore.target")
    parser.add_argument("--verify-first", action="store_true",
                        help="restore: verify every object in full before the target is called, then read the "
                             "payloads again (two passes), also for targets that verify while they restore")
    parser.add_argument("--test-restore", action="store_true", help="verify: also restore into a scratch target")
    parser.add_argument("--force", action="store_true", help="prune: delete more than max_delete")
    parser.add_argument("--from-copy", action="store_true",
                        help="verify, restore, drill, list: read the offsite copy (copy.destination)")
    parser.add_argument("--destination", action="store_true",
                        help="prune: apply copy.retention at copy.destination instead of the job's storage")
    parser.add_argument("--job", help="list: another job at the same storage location")
    parser.add_argument("--duration", type=float, help="wal-stream: stop after this many seconds")
    parser.add_argument("--end-lsn", help="wal-stream: stop once the WAL up to this LSN is stored")
    parser.add_argument("files", nargs="*", metavar="WAL_FILE PATH", help="wal-fetch: %%f and %%p")
    parser.add_argument("--progress-interval", type=float, default=PROGRESS_INTERVAL,
                        help="seconds between progress lines of a backup, restore or drill (default %(default)s)")
    return parser


def _emit_result(result):
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def run_one(command, path, args, log):
    """Run ``command`` for one job file; returns (exit code, result or None)."""
    log.command, log.job = command, None
    config = None
    try:
        config = JobConfig.load(path)
        log.job = config.job
        if args.log_format is None:
            log.format = config.log_format
        code, result = HANDLERS[command](config, args, log)
        return code, result
    except _SizeFailure as exc:
        log.error(str(exc))
        return EXIT_SIZE, exc.result
    except KeyboardInterrupt:
        log.error("%s interrupted (SIGINT): nothing partial was published" % command)
        return EXIT_SIGINT, None
    except Terminated:
        log.error("%s terminated (SIGTERM): nothing partial was published" % command)
        return EXIT_SIGTERM, None
    except BackupError as exc:
        what = "%s of job %s" % (command, config.job) if config is not None else "%s (%s)" % (command, path)
        log.error("%s failed: %s" % (what, exc), error=type(exc).__name__)
        return exit_code_for(exc), exc.result
    except Exception as exc:  # pylint: disable=broad-except  # one clear line, not a traceback
        log.error("%s failed unexpectedly: %s: %s" % (command, type(exc).__name__, exc), error=type(exc).__name__)
        return EXIT_FAILED, None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.config) > 1 and args.command not in MULTI_CONFIG:
        parser.error("%s takes exactly one --config" % args.command)
    if args.from_copy and args.command not in ("verify", "restore", "drill", "list"):
        parser.error("--from-copy is for verify, restore, drill and list")
    if args.destination and args.command != "prune":
        parser.error("--destination is for prune only")
    if args.point_in_time and args.command not in ("restore", "drill"):
        parser.error("--point-in-time is for restore and drill only")
    if args.restore_point and args.command != "restore":
        parser.error("--restore-point is for restore only")
    if args.verify_first and args.command != "restore":
        parser.error("--verify-first is for restore only")
    if args.seed is not None and (args.command != "drill" or args.point_in_time):
        parser.error("--seed is for drill only, without --point-in-time")
    if args.backup and args.point_in_time:
        parser.error("give --backup or --point-in-time, not both")
    if args.files and args.command != "wal-fetch":
        parser.error("only wal-fetch takes positional arguments")
    log = Log(args.log_format or "text")
    # In a job's pod (token mounted): a restic lock whose pod has finished is removed at once.
    resticstore.set_lock_check(PodLockHolders.in_cluster(), log.warning)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    worst, results = EXIT_OK, []
    try:
        for path in args.config:
            code, result = run_one(args.command, path, args, log)
            worst = max(worst, code)
            results.append(result)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.command == "wal-fetch":  # PostgreSQL's restore_command convention (engine/pitr_runner.py)
        from .pitr_runner import wal_fetch_exit
        worst = wal_fetch_exit(worst, results[0])
    if len(results) == 1:
        if results[0] is not None:
            _emit_result(results[0])
    else:
        _emit_result(results)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
