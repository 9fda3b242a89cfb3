"""The WAL stream: pg_receivewal into a spool, every file stored as a ``postgres_wal`` backup.

``WalStreamer``: ``pg_receivewal`` with a physical replication slot (created when missing,
reused otherwise) writes into a local spool directory; every completed segment (and every
timeline history file) is stored as a backup of kind ``postgres_wal`` in the WAL job
(default ``<job>-wal``), one manifest per file, then removed from the spool. The segment in
progress (``.partial``) is stored every ``partial_interval`` seconds when it changed, so the
archive trails the server by seconds; superseded partial copies are deleted. A restart
resumes from the slot (and from what the spool still holds); if the slot's position is
past the end of the stored WAL, or the server moved to another timeline, the streamer
reports a gap and stops: a new base backup is needed.

This is orchestration, not a source: it drives ``pg_receivewal``, reads the catalog
(:class:`WalState`) and stores each file through a ``BackupRun`` of
``WalFileSource`` (``kinds/postgres/wal.py``). The password reaches pg_receivewal through
``PGPASSWORD`` only.
"""

import collections
import datetime
import hashlib
import os
import signal
import subprocess
import tempfile
import time

from .catalog import Catalog
from .manifest import Manifest
from .errors import BackupError, ConfigError, IntegrityError, SourceError
from . import pgwal
from . import procutil
from .timeutil import to_iso, utc_now
from .kinds.postgres.wal import WAL_KIND, WalFileSource, check_slot, scan_wal, server_facts

DEFAULT_PARTIAL_INTERVAL = 10.0


class WalState:
    """What the WAL job holds: complete segments, partial copies and history files, by name."""

    def __init__(self, manifests):
        self.segments = {}   # name -> manifest (complete segments)
        self.partials = {}   # name (without .partial) -> [manifests], newest first
        self.histories = {}  # name -> manifest
        for manifest in manifests:  # newest first (Catalog.scan)
            manifest = Manifest.wrap(manifest)
            wal = manifest.stats
            name = wal.get("file")
            if manifest.kind != WAL_KIND or not name:
                continue
            if wal.get("type") == "segment":
                self.segments.setdefault(name, manifest)
            elif wal.get("type") == "partial":
                self.partials.setdefault(name, []).append(manifest)
            elif wal.get("type") == "history":
                self.histories.setdefault(name, manifest)

    @classmethod
    def load(cls, storage, wal_job):
        return cls(Catalog(storage).scan(wal_job, with_orphans=False))

    def last_segment(self, segment_size):
        """``(timeline, segno)`` of the newest complete segment, or None."""
        parsed = [pgwal.parse_segment_name(name, segment_size) for name in self.segments]
        parsed = [(tli, segno) for tli, segno, dummy in filter(None, parsed)]
        return max(parsed) if parsed else None


def partial_reach(position, end, earlier=()):
    """Manifest stats saying up to when a partial copy holds every commit (``reach_time``).

    ``position`` is ``(server clock, WAL insert LSN)`` read from the server just before the spool
    file was read, ``end`` the LSN the stored copy ends at. A commit record is inserted right
    after its timestamp is taken, so every commit stamped before that clock reading lies before
    that insert LSN (up to the microseconds between a backend taking its commit time and
    inserting the record). When the copy reaches that LSN it holds every commit up to the clock
    reading; when it does not (pg_receivewal had not received it yet, or the position is
    unknown) ``reach_time`` is null and the restore planner uses the copy's last commit time
    (``last_xact_time``) instead, never the time it was read from the spool.

    ``earlier``: readings taken before earlier copies (oldest first). Under a steady write load
    the insert LSN is always ahead of what pg_receivewal has received, so the newest reading is
    rarely reached; the newest earlier reading the copy does reach is just as true (every commit
    stamped before it lies before its LSN), and keeps the recovery window moving.
    """
    def stamp(clock):
        return clock.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")

    reached = [reading for reading in list(earlier) + [position] if reading is not None and end >= reading[1]]
    chosen = max(reached, key=lambda reading: reading[0]) if reached else None
    if position is None and chosen is None:
        return {"reach_time": None, "reach_lsn": None}
    stats = {"reach_time": stamp(chosen[0]) if chosen else None,
             "reach_lsn": pgwal.format_lsn((chosen or position)[1])}
    if position is not None:
        stats["server_clock"] = stamp(position[0])
    return stats


def _times_stats(scanned):
    """Manifest stats of ``scan_wal``'s answer: the times, the restore points, and whether they are known."""
    first, last = scanned["times"] if scanned is not None else (None, None)
    stats = {"first_xact_time": first, "last_xact_time": last, "xact_times_known": scanned is not None}
    if scanned is not None:
        stats["restore_points"] = scanned["restore_points"]
    return stats


class WalStreamer:
    """Runs pg_receivewal and stores what it writes. ``run()`` returns a result dict."""

    def __init__(self, conn, storage, wal_job, spool_dir, slot="biometrics_backup", compression=None,
                 encryption=None, partial_interval=DEFAULT_PARTIAL_INTERVAL, log=None):
        from .manifest import validate_job_name
        self.conn = conn
        self.storage = storage
        self.wal_job = validate_job_name(wal_job)
        self.spool_dir = spool_dir
        self.slot = check_slot(slot)
        self.compression = compression
        self.encryption = encryption or {}
        self.partial_interval = float(partial_interval)
        self.log = log or (lambda message: None)
        self.facts = None
        self.state = None
        self.result = {"wal_job": wal_job, "slot": slot, "segments_stored": 0, "partials_stored": 0,
                       "histories_stored": 0, "bytes_stored": 0, "gaps": [], "last_segment": None,
                       "last_stored_at": None}
        # End of the WAL stored so far (an int LSN, None before anything is known): the end of the
        # newest complete segment, or of the data in the newest partial copy.
        self.stored_end_lsn = None
        self.progress = None  # called after every file stored (the runner's heartbeat)
        # True while pg_receivewal runs: a file stored then holds WAL received from the server
        # (the sweeps before it starts and after it ended store what an earlier run left).
        self.receiving = False
        # time.monotonic() of the read of the newest stored partial copy: it holds every byte
        # pg_receivewal had written into the spool before then.
        self.partial_read_at = None
        self._last_partial_hash = None
        # (server clock, insert LSN) read before recent partial copies: see partial_reach.
        self._positions = collections.deque(maxlen=64)
        # One connection for those readings, kept between partial copies; the reason the
        # last reading failed, so that a lasting failure is logged once, not every copy.
        self._position_db = None
        self._position_problem = None
        self._waldump = None
        self._waldump_failed = False  # logged once: a lasting condition, not news every segment
        self._last_segno = None  # (timeline, segno) of the newest complete segment stored
        self._read_at = None

    # -- setup ---------------------------------------------------------------------------
    def _receivewal(self, *extra):
        return [self.conn.tool("pg_receivewal"), "--slot=%s" % self.slot, "--no-password"] + list(extra)

    def prepare(self):
        """Check server and archive, create the slot if needed; raise IntegrityError on a gap."""
        self.storage.ensure_ready()
        self.facts = server_facts(self.conn)
        size = self.facts["segment_size"]
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        self.state = WalState.load(self.storage, self.wal_job)
        for manifest in list(self.state.segments.values())[:1]:
            stored_system = manifest.stats.get("system_identifier")
            if stored_system and stored_system != self.facts["system_identifier"]:
                raise ConfigError("WAL job %s holds WAL of database system %s, but %s is system %s: use another "
                                  "wal_job for this server" % (self.wal_job, stored_system, self.conn.endpoint(),
                                                               self.facts["system_identifier"]))
        with self.conn.connect(autocommit=True) as db:
            # Created here rather than by pg_receivewal --create-slot, which does not reserve
            # WAL: the slot must hold WAL from the moment it exists.
            db.execute("SELECT pg_catalog.pg_create_physical_replication_slot(%s, true) WHERE NOT EXISTS "
                       "(SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = %s)", (self.slot, self.slot))
            row = db.execute("SELECT restart_lsn::text, wal_status FROM pg_catalog.pg_replication_slots "
                             "WHERE slot_name = %s", (self.slot,)).fetchone()
        if row is None:
            raise SourceError("replication slot %s vanished right after it was created" % self.slot)
        restart_lsn, wal_status = row
        self._last_segno = self.state.last_segment(size)
        resume = self._spool_resume(size)
        if resume is None and restart_lsn:
            resume = (self.facts["timeline"], pgwal.segment_number(restart_lsn, size))
        problem = None
        if wal_status == "lost":
            problem = "replication slot %s lost WAL the server removed (wal_status lost)" % self.slot
        else:
            problem = pgwal.stream_break(self._last_segno, resume)
        if problem:
            self._gap(problem, resume)
        self.result.update(system_identifier=self.facts["system_identifier"], timeline=self.facts["timeline"],
                           slot_restart_lsn=restart_lsn,
                           resumed_after=pgwal.segment_name(self._last_segno[0], self._last_segno[1], size)
                           if self._last_segno else None)

    def _spool_resume(self, size):
        """Where pg_receivewal resumes from files left in the spool, or None."""
        found = []
        for name in os.listdir(self.spool_dir):
            parsed = pgwal.parse_segment_name(name, size)
            if parsed is not None:
                found.append(parsed[:2])
        return min(found) if found else None

    def _gap(self, problem, resume=None):
        gap = {"detected_at": to_iso(utc_now()), "reason": problem}
        if resume is not None and self._last_segno is not None and resume[0] == self._last_segno[0]:
            size = self.facts["segment_size"]
            gap["missing_from"] = pgwal.segment_name(resume[0], self._last_segno[1] + 1, size)
            gap["missing_to"] = pgwal.segment_name(resume[0], resume[1] - 1, size)
        self.result["gaps"].append(gap)
        raise WalGapError(problem, self.result)

    # -- storing -------------------------------------------------------------------------
    def _store(self, name, data, stats):
        from .backup import BackupRun
        # When the file was read from the spool, to the microsecond: a partial copy holds the
        # WAL written up to then (the manifest's own times are whole seconds).
        stats = dict(stats, file=name, captured_at=self._read_at, system_identifier=self.facts["system_identifier"],
                     segment_size=self.facts["segment_size"], plain_sha256=hashlib.sha256(data).hexdigest(),
                     plain_bytes=len(data))
        source = WalFileSource(name, data, stats, {"host": self.conn.host or "local socket",
                                                   "port": self.conn.port or 5432, "slot": self.slot})
        run = BackupRun(self.wal_job, source, self.storage, compression=self.compression, encryption=self.encryption)
        manifest = run.run()
        self.result["bytes_stored"] += manifest.size_bytes
        self.result["last_stored_at"] = manifest.finished_at
        if self.progress is not None:
            self.progress()
        return manifest

    def _xact_times(self, directory, name, complete=True):
        """``scan_wal`` of a spooled file, or None: the file is then stored without commit times,
        which restores to a time handle (more slowly); the reason is logged once per stream. A
        partial copy may hold no whole record yet, so only a complete segment pg_waldump cannot
        read is reported."""
        if self._waldump is None:
            try:
                self._waldump = self.conn.tool("pg_waldump")
            except ConfigError as exc:
                self._waldump = ""
                self.log("WAL is stored without commit times: %s" % exc)
        if not self._waldump:
            return None
        scanned = scan_wal(self._waldump, directory, name)
        if scanned is None and complete and not self._waldump_failed:
            self._waldump_failed = True
            self.log("WAL segment %s is stored without commit times: %s could not read it (a pg_waldump "
                     "reads only WAL of its own PostgreSQL major version: give the server's bin_dir when "
                     "they differ); later such segments are not reported again" % (name, self._waldump))
        return scanned

    def _read(self, path):
        self._read_at = utc_now().isoformat().replace("+00:00", "Z")
        with open(path, "rb") as handle:
            return handle.read()

    def sweep(self, final=False, force_partial=False):
        """Store completed files from the spool; the partial too when due (or ``force_partial``)."""
        size = self.facts["segment_size"]
        names = sorted(os.listdir(self.spool_dir))
        for name in names:
            tli = pgwal.history_timeline(name)
            if tli is not None:
                if name not in self.state.histories:
                    self.state.histories[name] = self._store(name, self._read(os.path.join(self.spool_dir, name)),
                                                             {"type": "history", "timeline": tli})
                    self.result["histories_stored"] += 1
                continue
        segments = []
        partial = None
        for name in names:
            parsed = pgwal.parse_segment_name(name, size)
            if parsed is None:
                continue
            if parsed[2]:
                partial = (name, parsed)
            else:
                segments.append((parsed[:2], name))
        for (tli, segno), name in sorted(segments):
            path = os.path.join(self.spool_dir, name)
            if name not in self.state.segments:
                if self._last_segno is not None and tli == self._last_segno[0] and segno > self._last_segno[1] + 1:
                    self._gap("segment %s follows %s: the segments between them never reached the spool"
                              % (name, pgwal.segment_name(tli, self._last_segno[1], size)), (tli, segno))
                if self._last_segno is not None and tli != self._last_segno[0]:
                    self._gap("segment %s is on timeline %d, the stored WAL on timeline %d"
                              % (name, tli, self._last_segno[0]))
                data = self._read(path)
                if len(data) != size:
                    raise IntegrityError("spool file %s is %d bytes, a segment is %d" % (name, len(data), size))
                times = self._xact_times(self.spool_dir, name)
                self.state.segments[name] = self._store(name, data, dict(_times_stats(times), **{
                    "type": "segment", "timeline": tli, "segno": segno,
                    "start_lsn": pgwal.format_lsn(pgwal.segment_start_lsn(segno, size))}))
                self.result["segments_stored"] += 1
                self.log("stored WAL segment %s" % name)
                self._drop_partials(name)
            if self._last_segno is None or (tli, segno) > self._last_segno:
                self._last_segno = (tli, segno)
            self._stored_up_to(pgwal.segment_start_lsn(segno + 1, size))
            self.result["last_segment"] = pgwal.segment_name(self._last_segno[0], self._last_segno[1], size)
            os.remove(path)
        if partial is not None and (final or force_partial):
            self._store_partial(partial)

    def _store_partial(self, partial):
        name, (tli, segno, dummy) = partial
        read_at = time.monotonic()
        position = self._server_position()  # before the read: what the copy must hold to reach that time
        earlier = list(self._positions)
        if position is not None:
            self._positions.append(position)
        try:
            data = self._read(os.path.join(self.spool_dir, name))
        except FileNotFoundError:
            return  # completed (renamed) meanwhile: the next sweep stores the segment
        digest = hashlib.sha256(data).hexdigest()
        base = name[:-len(pgwal.PARTIAL_SUFFIX)]
        if base in self.state.segments:
            return
        if digest == self._last_partial_hash:
            self.partial_read_at = read_at  # unchanged: the stored copy holds what was written until now
            return
        size = self.facts["segment_size"]
        older = list(self.state.partials.get(base, []))
        with tempfile.TemporaryDirectory(prefix="walpart-") as scratch:
            with open(os.path.join(scratch, base), "wb") as copy:
                copy.write(data)
            times = self._xact_times(scratch, base, complete=False)
        # pg_receivewal fills a new segment file with zeros; records are 8-byte aligned.
        end = pgwal.segment_start_lsn(segno, size) + (len(data.rstrip(b"\0")) + 7) // 8 * 8
        if times is not None and times.get("end_lsn") is not None:
            end = max(end, times["end_lsn"])  # a record may end in zero bytes the estimate leaves out
        manifest = self._store(base, data, dict(_times_stats(times), **dict(partial_reach(position, end, earlier), **{
            "type": "partial", "timeline": tli, "segno": segno, "end_lsn": pgwal.format_lsn(end),
            "start_lsn": pgwal.format_lsn(pgwal.segment_start_lsn(segno, size))})))
        self._last_partial_hash = digest
        self._stored_up_to(end)
        self.partial_read_at = read_at
        self.state.partials[base] = [manifest]
        self.result["partials_stored"] += 1
        self._delete(older)

    def _server_position(self):
        """``(server clock, WAL insert LSN)`` read just before a partial copy is read, or None when the
        server cannot be asked (the copy's reach is then its last commit, see :func:`partial_reach`).

        A standby gives None too: its clock says nothing about commits on the primary that have not
        reached it yet, so only the copy's own last commit is a safe reach.
        """
        try:
            if self._position_db is None:
                self._position_db = self.conn.connect(autocommit=True)
            row = self._position_db.execute(
                "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.clock_timestamp(), "
                "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
                "ELSE pg_catalog.pg_current_wal_insert_lsn()::text END").fetchone()
        except Exception as exc:  # pylint: disable=broad-except  # a missing reach is conservative, never fatal
            self._close_position_db()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return self._no_position("could not read the server's WAL position before a partial copy (its reach "
                                     "is then its last commit): %s" % procutil.scrub(first, self.conn.secrets))
        if row[0]:
            return self._no_position("the server is a standby: the reach of a partial WAL copy is its last commit")
        self._position_problem = None
        return row[1], pgwal.parse_lsn(row[2])

    def _no_position(self, problem):
        if problem != self._position_problem:
            self.log(problem)
            self._position_problem = problem
        return None

    def _close_position_db(self):
        db, self._position_db = self._position_db, None
        if db is not None:
            try:
                db.close()
            except Exception:  # pylint: disable=broad-except  # closing a broken connection may fail too
                pass

    def _stored_up_to(self, lsn):
        if self.stored_end_lsn is None or lsn > self.stored_end_lsn:
            self.stored_end_lsn = lsn

    def _drop_partials(self, name):
        self._delete(self.state.partials.pop(name, []))

    def _delete(self, manifests):
        catalog = Catalog(self.storage)
        for manifest in manifests:
            try:
                catalog.delete_backup(manifest)
            except BackupError as exc:  # a superseded copy left behind costs space, not correctness
                self.log("could not delete superseded partial WAL copy %s: %s" % (Manifest.wrap(manifest).id, exc))

    # -- running -------------------------------------------------------------------------
    def run(self, end_lsn=None, duration=None, stop=None, poll=0.5, on_tick=None):
        """Stream until ``end_lsn`` is reached, ``duration`` seconds passed, or ``stop`` (an Event) is set.

        Without any of them it runs until pg_receivewal exits (connection lost, server gone),
        which is an error for a daemon: the caller restarts it. ``on_tick(streamer)`` is called
        after every pass over the spool (about every ``poll`` seconds) while pg_receivewal runs.
        """
        if self.state is None:
            self.prepare()
        self.sweep(force_partial=False)  # what a previous run left complete in the spool
        argv = self._receivewal("--directory=%s" % self.spool_dir, "--no-loop", "--verbose",
                                "--status-interval=%d" % max(1, min(10, int(self.partial_interval))))
        if end_lsn:
            argv.append("--endpos=%s" % pgwal.format_lsn(pgwal.parse_lsn(end_lsn)))
        proc = subprocess.Popen(argv, env=self.conn.tool_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tail = procutil._StderrTail(proc.stderr)  # pylint: disable=protected-access
        tail.start()
        started = time.monotonic()
        self.receiving = True
        last_partial = started
        stopped_by_us = False
        try:
            while True:
                exited = proc.poll() is not None
                now = time.monotonic()
                due = now - last_partial >= self.partial_interval
                self.sweep(force_partial=due)
                if due:
                    last_partial = now
                if exited:
                    break
                if on_tick is not None:
                    on_tick(self)
                if (duration is not None and now - started >= duration) or (stop is not None and stop.is_set()):
                    stopped_by_us = True
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=30)
                    continue
                time.sleep(poll)
        except BaseException:
            self._close_position_db()
            raise
        finally:
            self.receiving = False
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tail.join()
        returncode = proc.returncode
        try:
            self.sweep(final=True)
        finally:
            self._close_position_db()
        self.result["duration_seconds"] = round(time.monotonic() - started, 3)
        if returncode != 0 and not stopped_by_us:
            raise SourceError(procutil.scrub("pg_receivewal stopped (exit %s): %s" % (returncode, tail.text()),
                                             self.conn.secrets))
        return self.result


class WalGapError(IntegrityError):
    """The archive misses WAL: segments were never stored, or the timeline changed."""

    def __init__(self, message, result):
        super().__init__("WAL gap in the archive: %s" % message)
        self.result = result
