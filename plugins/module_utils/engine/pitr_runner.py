"""Runner commands of PostgreSQL point-in-time recovery (job files of kind ``postgres_base``).

``wal-stream``   run the WAL stream of the job's server (until SIGTERM/SIGINT, ``--duration``
                 seconds or ``--end-lsn``); exit 3 when the archive has a gap.
``wal-fetch F P`` copy WAL file F from storage to path P, verified: PostgreSQL's
                 ``restore_command`` for a data directory restored by hand. Exit 1 only when
                 F is not stored (PostgreSQL then ends recovery normally); any other failure
                 exits 126, which makes PostgreSQL abort recovery instead of stopping early.
``restore``      (kind postgres_base) point-in-time restore: ``--point-in-time`` or
                 ``restore.point_in_time`` (ISO-8601 or ``latest``, the default), or
                 ``--restore-point`` / ``restore.restore_point`` (a ``pg_create_restore_point``
                 name; a point in time is then an upper bound).

The functions take the runner's (config, args, log) and import the runner lazily.
"""

import collections
import os
import signal
import threading
import time

from . import pgwal
from . import pitr
from .errors import BackupError, ConfigError, SourceError
from .kinds.postgres.connection import PgConnection
from .kinds.postgres.wal import default_wal_job
from .walstream import DEFAULT_PARTIAL_INTERVAL, WalGapError, WalStreamer
from .kinds.postgres.target import PostgresTarget
from .schema import Field

EXIT_NOT_STORED = 1
EXIT_ABORT_RECOVERY = 126
RETRY_SECONDS = (5, 10, 30, 60)
# The stream touches this file (when set) while it works: the Deployment's liveness probe checks its age.
HEARTBEAT_ENV = "BACKUP_HEARTBEAT_FILE"
MIN_REPORT_SECONDS = 5.0
WINDOW_REFRESH_SECONDS = 300.0

# restore.target of a postgres_base job: the postgres target's fields plus where to recover.
TARGET_SCHEMA = PostgresTarget.SCHEMA.extend("target", {
    "data_dir": Field("path", "leave the recovered data directory here instead of copying a database"),
    "scratch_dir": Field("path", "where the base backup is unpacked and the WAL staged (default: the temp dir)"),
    "run_as": Field("str", "account the private PostgreSQL runs as when the runner is root (default postgres)",
                    nonempty=True),
    "recovery_timeout": Field("number", "seconds the recovery may take (default 3600)", exclusive_minimum=0),
})


def _check_kind(config, command):
    from .kinds.postgres.wal import BASE_KIND
    if config.kind != BASE_KIND:
        raise ConfigError("%s needs a job of kind %s, not %s" % (command, BASE_KIND, config.kind))


class LagClock:
    """Archive lag in seconds: the age of the oldest WAL the server wrote that is not stored yet.

    Fed with ``(time, server LSN)`` samples and the end of the stored WAL. The first write not
    stored happened after the newest sample whose LSN the store has reached, so the lag is the
    time since that sample (at most one report interval too high); 0 when the store holds
    everything the server had written at the last sample. Without such a sample (the backlog
    predates the first sample) the time since the first sample is a lower bound.
    """

    def __init__(self):
        self.samples = collections.deque()

    def observe(self, when, server_lsn, stored_lsn):
        self.samples.append((when, server_lsn))
        while len(self.samples) > 1 and self.samples[1][1] <= stored_lsn:
            self.samples.popleft()
        if self.samples[-1][1] <= stored_lsn:
            return 0.0
        return max(0.0, when - self.samples[0][0])


def _touch(path):
    try:
        with open(path, "a", encoding="utf-8"):
            pass
        os.utime(path)
    except OSError:
        pass  # a missing heartbeat restarts the pod; the stream itself is not stopped for it


def _window_start(storage, job, state):
    """When the oldest base backup whose WAL is still stored (not pruned) was complete, or None."""
    from .catalog import Catalog
    from .kinds.postgres.wal import BASE_KIND
    stored = list(state.segments) + list(state.partials)
    if not stored:
        return None
    first = min(stored)  # segment names sort by timeline, then segment number
    oldest = None
    for base in Catalog(storage).scan(job, with_orphans=False):
        stats = base.stats
        if base.kind != BASE_KIND or not stats.get("wal_start") or stats["wal_start"] < first:
            continue
        done = pitr.base_completed_at(base)
        oldest = done if oldest is None else min(oldest, done)
    return oldest


class StreamStatus:
    """Heartbeat file and metrics of a running WAL stream (pushed every report interval).

    ``on_tick`` is the streamer's callback; it touches the heartbeat every time and, once per
    interval, reads the server's current WAL position and pushes the stream's metrics
    (``BackupMetrics.record_wal_stream``) as one fresh push of what changed since the last.
    """

    def __init__(self, config, log, wal_job, options, storage, interval):
        from .runner import Metrics
        self.config = config
        self.log = log
        self.wal_job = wal_job
        self.conn = PgConnection(options, "source")
        self.storage = storage
        self.interval = max(MIN_REPORT_SECONDS, float(interval))
        self.heartbeat = os.environ.get(HEARTBEAT_ENV) or None
        self.enabled = Metrics(config, log, job=wal_job).metrics is not None
        self.clock = LagClock()
        self.slot = options.get("slot") or "biometrics_backup"
        self._written = collections.deque()  # (monotonic time, LSN pg_receivewal reported written)
        self._written_stored = 0  # the newest such LSN reported before the newest partial copy was read
        self._db = None
        self._last_report = None
        self._reported_segments = {}  # id(streamer) -> segments already counted
        self._window = (None, None)  # (start, when computed)
        # No beat yet: the first comes with the first file stored or the first pass of the
        # running stream (the Deployment's startup probe waits for it).

    def beat(self):
        if self.heartbeat:
            _touch(self.heartbeat)

    def _metrics(self):
        from .runner import Metrics
        return Metrics(self.config, self.log, job=self.wal_job)

    def _server_lsn(self):
        """The server's current WAL position; also notes what pg_receivewal reported written."""
        import psycopg
        asked = time.monotonic()
        try:
            if self._db is None or self._db.closed:
                self._db = self.conn.connect(autocommit=True)
            row = self._db.execute(
                "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_receive_lsn() "
                "ELSE pg_catalog.pg_current_wal_lsn() END::text, (SELECT r.write_lsn::text FROM "
                "pg_catalog.pg_replication_slots s JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid "
                "WHERE s.slot_name = %s)", (self.slot,)).fetchone()
        except (SourceError, psycopg.Error) as exc:
            self.log.info("archive lag not measured: %s" % (str(exc).splitlines() or [""])[0])
            self.close()
            return None
        if row and row[1]:
            self._written.append((asked, pgwal.parse_lsn(row[1])))
        return pgwal.parse_lsn(row[0]) if row and row[0] else None

    def _stored_lsn(self, streamer):
        """End of the stored WAL: the streamer's own figure, or what pg_receivewal had reported
        written before the newest partial copy was read (the copy's data, read back, cannot tell
        the last record's trailing zero bytes from the file's zero fill)."""
        read_at = streamer.partial_read_at
        while self._written and read_at is not None and self._written[0][0] < read_at:
            self._written_stored = max(self._written_stored, self._written.popleft()[1])
        return max(streamer.stored_end_lsn, self._written_stored)

    def close(self):
        if self._db is not None:
            try:
                self._db.close()
            except Exception:  # pylint: disable=broad-exception-caught  # closing a broken connection
                pass
            self._db = None

    def on_tick(self, streamer):
        self.beat()
        now = time.monotonic()
        if not self.enabled or (self._last_report is not None and now - self._last_report < self.interval):
            return
        self._last_report = now
        self.report(streamer, up=True)

    def report(self, streamer, up, measure=True, gap_at=None):
        """Push the stream's state; ``up`` False when it stopped, ``measure`` False when the server is gone."""
        from .timeutil import parse_iso, utc_now
        if not self.enabled:
            return
        now = utc_now()
        values = {"reported_at": now if up else None}
        state = streamer.state
        stored_at = streamer.result.get("last_stored_at")
        if stored_at is None and state is not None:
            stored_at = max((m.finished_at for m in list(state.segments.values())
                             + [ms[0] for ms in state.partials.values() if ms]), default=None)
        if stored_at is not None:
            values["last_archived_at"] = parse_iso(stored_at)
        if state is not None:
            reach = pitr.wal_reach(state, streamer.facts["segment_size"] if streamer.facts else pgwal.DEFAULT_SEGMENT_SIZE)
            if reach is not None:
                values["window_end"] = parse_iso(reach)
        if measure and streamer.stored_end_lsn is not None:
            server = self._server_lsn()
            if server is not None:
                stored = self._stored_lsn(streamer)
                values["lag_bytes"] = max(0, server - stored)
                values["lag_seconds"] = self.clock.observe(time.time(), server, stored)
        if state is not None:
            start, computed = self._window
            if start is None or time.monotonic() - computed >= WINDOW_REFRESH_SECONDS:
                try:
                    start = _window_start(self.storage, self.config.job, state)
                    self._window = (start, time.monotonic())
                except BackupError as exc:
                    self.log.info("recovery window not measured: %s" % exc)
            if start is not None and values.get("window_end") is not None and values["window_end"] >= start:
                values["window_start"] = start
            else:  # no base backup, or its WAL is not stored yet: nothing can be recovered yet
                values.pop("window_end", None)
        counted = self._reported_segments.get(id(streamer), 0)
        values["segments_stored"] = streamer.result["segments_stored"] - counted
        self._reported_segments = {id(streamer): streamer.result["segments_stored"]}
        # Not backup_last_success_timestamp_seconds: the alerts built on it (never verified, no
        # retention pass) would fire for the WAL job, which has its own (WalStreamStalled).
        metrics = self._metrics()
        metrics.record("record_wal_stream", up, **values)
        if gap_at is not None:
            metrics.record("record_wal_gap", gap_at)
        metrics.ship()


def cmd_wal_stream(config, args, log):
    from .runner import EXIT_INTEGRITY, EXIT_OK, Metrics, _prepare
    from .timeutil import utc_now
    _check_kind(config, "wal-stream")
    prepared = _prepare(config, "backup", log)
    options = prepared["source"].options
    wal_job = default_wal_job(config.job, options)
    spool = options.get("spool_dir") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "wal-spool-%s" % config.job)
    metrics = Metrics(config, log, job=wal_job)
    partial_interval = options.get("partial_interval") or DEFAULT_PARTIAL_INTERVAL
    status = StreamStatus(config, log, wal_job, options, prepared["storage"], partial_interval)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    bounded = args.duration is not None or args.end_lsn is not None
    attempt = 0
    totals = None
    # A daemon's result metrics: a lost connection is retried after a short wait, and only a retry that fails
    # too records a failed attempt (a server restart is not a failed backup; WalStreamStalled and
    # backup_wal_stream_up tell of the outage). Once streaming works again - a file stored while
    # pg_receivewal runs, not one a new run's first sweep stores from the spool - the retries
    # start over, and after a recorded failure a success is recorded, so BackupJobFailing ends
    # with the outage.
    failure_recorded = [False]
    streamer = None

    def stored_a_file():
        nonlocal attempt
        status.beat()
        if streamer is None or not streamer.receiving:
            return
        attempt = 0
        if failure_recorded[0]:
            failure_recorded[0] = False
            metrics.record("record_backup_result", True, utc_now())
            metrics.ship()

    try:
        while True:
            streamer = WalStreamer(PgConnection(options, "source"), prepared["storage"], wal_job, spool,
                                   slot=options.get("slot") or "biometrics_backup", compression=config.compression,
                                   encryption=prepared["encryption"],
                                   partial_interval=partial_interval, log=log.info)
            streamer.progress = stored_a_file
            try:
                result = streamer.run(end_lsn=args.end_lsn, duration=args.duration, stop=stop,
                                      on_tick=status.on_tick)
            except WalGapError as exc:
                log.error(str(exc))
                metrics.record("record_backup_result", False, utc_now())
                metrics.ship()
                status.report(streamer, up=False, measure=False, gap_at=utc_now())
                return EXIT_INTEGRITY, exc.result
            except SourceError as exc:
                status.report(streamer, up=False, measure=False)
                if bounded or stop.is_set():
                    raise
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                attempt += 1
                log.error("%s; streaming again in %d s" % (exc, delay))
                if attempt > 1:
                    failure_recorded[0] = True
                    metrics.record("record_backup_result", False, utc_now())
                    metrics.ship()
                # Waiting to retry is working: the heartbeat file goes on (the metrics' heartbeat
                # does not, so a stream that cannot reach its server looks stalled).
                deadline = time.monotonic() + delay
                while not stop.is_set() and time.monotonic() < deadline:
                    status.beat()
                    stop.wait(min(10.0, max(0.0, deadline - time.monotonic())))
                if stop.is_set():
                    return EXIT_OK, totals
                continue
            attempt = 0
            totals = result
            metrics.record("record_backup_result", True, utc_now(), size_bytes=result["bytes_stored"])
            metrics.ship()
            status.report(streamer, up=not (bounded or stop.is_set()))
            log.info("WAL stream: %d segments, %d partial copies stored, last segment %s"
                     % (result["segments_stored"], result["partials_stored"], result["last_segment"]))
            if bounded or stop.is_set():
                return EXIT_OK, result
            time.sleep(1)  # pg_receivewal ended cleanly (the server shut down): start it again
    finally:
        status.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_wal_fetch(config, args, log):
    """Fetch one WAL file; raises _FetchExit with PostgreSQL's exit-code convention."""
    from .walstream import WalState
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
        kind = manifest.stats.get("type")
        log.info("fetched %s%s from backup %s" % (name, " (partial copy)" if kind == "partial" else "", manifest.id))
        return 0, {"file": name, "stored": True, "backup_id": manifest.id, "type": kind}
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


def _prepare_restore(config, log, from_copy=False):
    from .runner import _prepare
    return _prepare(config, "restore", log, from_copy)


def cmd_restore(config, args, log, target_override=None):
    """Point-in-time restore of a postgres_base job (the runner's ``restore`` for this kind)."""
    from .jobconfig import secret_values
    from .runner import EXIT_OK
    prepared = _prepare_restore(config, log, getattr(args, "from_copy", False))  # --from-copy: base backups and WAL
    identity, passphrase = prepared["keys"]
    options = TARGET_SCHEMA.validate(config.target_options("restore", target_override), "restore.target")
    log.add_secrets(secret_values(options))
    where = {key: options.pop(key) for key in ("data_dir", "scratch_dir", "run_as", "recovery_timeout")
             if key in options}
    restore_point = getattr(args, "restore_point", None) or config.restore.get("restore_point")
    point_in_time = args.point_in_time or config.restore.get("point_in_time") or (None if restore_point else pitr.LATEST)
    target = None
    database = options.get("database") or options.get("dbname")
    if "data_dir" not in where:
        target = PostgresTarget(options)
    report = pitr.restore_point_in_time(
        prepared["storage"], config.job, point_in_time, identity=identity, passphrase=passphrase,
        wal_job=config.source.get("wal_job"), target=target, database=database, data_dir=where.get("data_dir"),
        scratch_dir=where.get("scratch_dir"), bin_dir=config.source.get("bin_dir"), run_as=where.get("run_as"),
        user=config.source.get("user") or "postgres", timeout=where.get("recovery_timeout", 3600),
        check_mode=args.check, log=log.info, restore_point=restore_point)
    recovered = report.get("recovered_to") or {}
    log.info("%s base backup %s with WAL %s..%s to %s%s" % (
        "planned (check mode, nothing written):" if args.check else "recovered", report["plan"]["base_backup"],
        report["plan"]["wal_first"], report["plan"]["wal_last"],
        "restore point %r" % restore_point if restore_point else report["plan"]["target_time"],
        ": LSN %s, last commit %s" % (recovered.get("lsn"), recovered.get("last_commit_time")) if recovered else ""))
    return EXIT_OK, report
