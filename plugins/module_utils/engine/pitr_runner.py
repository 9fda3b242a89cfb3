"""Runner commands of PostgreSQL point-in-time recovery (job files of kind ``postgres_base``).

``wal-stream``   run the WAL stream of the job's server (until SIGTERM/SIGINT, ``--duration``
                 seconds or ``--end-lsn``); exit 3 when the archive has a gap.
``wal-fetch F P`` copy WAL file F from storage to path P, verified: PostgreSQL's
                 ``restore_command`` for a data directory restored by hand. Exit 1 only when
                 F is not stored (PostgreSQL then ends recovery normally); any other failure
                 exits 126, which makes PostgreSQL abort recovery instead of stopping early.
``restore``      (kind postgres_base) point-in-time restore: ``--point-in-time`` or
                 ``restore.point_in_time`` (ISO-8601 or ``latest``, the default).

The functions take the runner's (config, args, log) and import the runner lazily.
"""

import os
import signal
import threading
import time

from . import pitr
from .errors import BackupError, ConfigError, SourceError
from .sources.postgres import PgConnection
from .sources.postgres_wal import (DEFAULT_PARTIAL_INTERVAL, WalGapError, WalStreamer, default_wal_job)
from .targets.postgres import PostgresTarget
from .schema import Field

EXIT_NOT_STORED = 1
EXIT_ABORT_RECOVERY = 126
RETRY_SECONDS = (5, 10, 30, 60)

# restore.target of a postgres_base job: the postgres target's fields plus where to recover.
TARGET_SCHEMA = PostgresTarget.SCHEMA.extend("target", {
    "data_dir": Field("path", "leave the recovered data directory here instead of copying a database"),
    "scratch_dir": Field("path", "where the base backup is unpacked and the WAL staged (default: the temp dir)"),
    "run_as": Field("str", "account the private PostgreSQL runs as when the runner is root (default postgres)",
                    nonempty=True),
    "recovery_timeout": Field("number", "seconds the recovery may take (default 3600)", exclusive_minimum=0),
})


def _check_kind(config, command):
    from .sources.postgres_wal import BASE_KIND
    if config.kind != BASE_KIND:
        raise ConfigError("%s needs a job of kind %s, not %s" % (command, BASE_KIND, config.kind))


def cmd_wal_stream(config, args, log):
    from .runner import EXIT_INTEGRITY, EXIT_OK, Metrics, _prepare
    from .timeutil import utc_now
    _check_kind(config, "wal-stream")
    prepared = _prepare(config, "backup", log)
    options = prepared["source"].options
    wal_job = default_wal_job(config.job, options)
    spool = options.get("spool_dir") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "wal-spool-%s" % config.job)
    metrics = Metrics(config, log, job=wal_job)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    bounded = args.duration is not None or args.end_lsn is not None
    attempt = 0
    totals = None
    try:
        while True:
            streamer = WalStreamer(PgConnection(options, "source"), prepared["storage"], wal_job, spool,
                                   slot=options.get("slot") or "biometrics_backup", compression=config.compression,
                                   encryption=prepared["encryption"],
                                   partial_interval=options.get("partial_interval") or DEFAULT_PARTIAL_INTERVAL,
                                   log=log.info)
            try:
                result = streamer.run(end_lsn=args.end_lsn, duration=args.duration, stop=stop)
            except WalGapError as exc:
                log.error(str(exc))
                metrics.record("record_backup_result", False, utc_now())
                metrics.ship()
                return EXIT_INTEGRITY, exc.result
            except SourceError as exc:
                if bounded or stop.is_set():
                    raise
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                attempt += 1
                log.error("%s; streaming again in %d s" % (exc, delay))
                metrics.record("record_backup_result", False, utc_now())
                metrics.ship()
                stop.wait(delay)
                if stop.is_set():
                    return EXIT_OK, totals
                continue
            attempt = 0
            totals = result
            metrics.record("record_backup_result", True, utc_now(), size_bytes=result["bytes_stored"])
            metrics.ship()
            log.info("WAL stream: %d segments, %d partial copies stored, last segment %s"
                     % (result["segments_stored"], result["partials_stored"], result["last_segment"]))
            if bounded or stop.is_set():
                return EXIT_OK, result
            time.sleep(1)  # pg_receivewal ended cleanly (the server shut down): start it again
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_wal_fetch(config, args, log):
    """Fetch one WAL file; raises _FetchExit with PostgreSQL's exit-code convention."""
    from .sources.postgres_wal import WalState
    _check_kind(config, "wal-fetch")
    if len(args.files) != 2:
        raise ConfigError("wal-fetch takes two arguments: the WAL file name (%%f) and the path to write (%%p)")
    name, path = args.files
    try:
        prepared = _prepare_restore(config, log)
        storage = prepared["storage"]
        identity, passphrase = prepared["keys"]
        wal_job = default_wal_job(config.job, config.source)
        state = WalState.load(storage, wal_job)
        manifest = (state.segments.get(name) or state.histories.get(name)
                    or (state.partials.get(name) or [None])[0])
        if manifest is None:
            log.info("WAL file %s is not stored in job %s" % (name, wal_job))
            return EXIT_NOT_STORED, {"file": name, "stored": False}
        keys = pitr.Keys(storage, identity, passphrase)
        temporary = "%s.fetching" % path
        try:
            pitr.write_verified_wal(keys, manifest, name, temporary)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        os.replace(temporary, path)
        log.info("fetched %s%s from backup %s" % (name, " (partial copy)" if manifest["stats"].get("type") == "partial"
                                                  else "", manifest["id"]))
        return 0, {"file": name, "stored": True, "backup_id": manifest["id"], "type": manifest["stats"].get("type")}
    except (BackupError, OSError) as exc:
        log.error("wal-fetch %s failed: %s" % (name, exc))
        return EXIT_ABORT_RECOVERY, None


def wal_fetch_exit(code, result):
    """PostgreSQL's convention: 1 = not stored (end of archive), 126 = abort recovery (anything else)."""
    if code == 0:
        return 0
    if isinstance(result, dict) and result.get("stored") is False:
        return EXIT_NOT_STORED
    return EXIT_ABORT_RECOVERY


def _prepare_restore(config, log):
    from .runner import _prepare
    return _prepare(config, "restore", log)


def cmd_restore(config, args, log, target_override=None):
    """Point-in-time restore of a postgres_base job (the runner's ``restore`` for this kind)."""
    from .jobconfig import secret_values
    from .runner import EXIT_OK
    prepared = _prepare_restore(config, log)
    identity, passphrase = prepared["keys"]
    options = TARGET_SCHEMA.validate(config.target_options("restore", target_override), "restore.target")
    log.add_secrets(secret_values(options))
    where = {key: options.pop(key) for key in ("data_dir", "scratch_dir", "run_as", "recovery_timeout")
             if key in options}
    point_in_time = args.point_in_time or config.restore.get("point_in_time") or pitr.LATEST
    target = None
    database = options.get("database") or options.get("dbname")
    if "data_dir" not in where:
        target = PostgresTarget(options)
    report = pitr.restore_point_in_time(
        prepared["storage"], config.job, point_in_time, identity=identity, passphrase=passphrase,
        wal_job=config.source.get("wal_job"), target=target, database=database, data_dir=where.get("data_dir"),
        scratch_dir=where.get("scratch_dir"), bin_dir=config.source.get("bin_dir"), run_as=where.get("run_as"),
        user=config.source.get("user") or "postgres", timeout=where.get("recovery_timeout", 3600),
        check_mode=args.check, log=log.info)
    recovered = report.get("recovered_to") or {}
    log.info("%s base backup %s with WAL %s..%s to %s%s" % (
        "planned (check mode, nothing written):" if args.check else "recovered", report["plan"]["base_backup"],
        report["plan"]["wal_first"], report["plan"]["wal_last"], report["plan"]["target_time"],
        ": LSN %s, last commit %s" % (recovered.get("lsn"), recovered.get("last_commit_time")) if recovered else ""))
    return EXIT_OK, report
