"""PostgreSQL point-in-time recovery, the backup side: base backups and WAL streaming.

``postgres_base`` (a kind): ``pg_basebackup --format=tar --wal-method=none --pgdata=-``
streamed through the pipeline as one payload ``base.tar``. The WAL the backup needs is not
in it: the WAL stream stores it. ``stats`` records the start/end LSN, timeline, the first
and last WAL segment the backup needs, the system identifier and the segment size.

``WalStreamer``: ``pg_receivewal`` with a physical replication slot (created when missing,
reused otherwise) writes into a local spool directory; every completed segment (and every
timeline history file) is stored as a backup of kind ``postgres_wal`` in the WAL job
(default ``<job>-wal``), one manifest per file, then removed from the spool. The segment in
progress (``.partial``) is stored every ``partial_interval`` seconds when it changed, so the
archive trails the server by seconds; superseded partial copies are deleted. A restart
resumes from the slot (and from what the spool still holds); if the slot's position is
past the end of the stored WAL, or the server moved to another timeline, the streamer
reports a gap and stops: a new base backup is needed.

The password reaches pg_receivewal / pg_basebackup through ``PGPASSWORD`` only.
"""

import collections
import datetime
import hashlib
import io
import os
import re
import signal
import subprocess
import tempfile
import time

from ..catalog import Catalog
from ..errors import BackupError, ConfigError, IntegrityError, SourceError
from .. import pgwal
from .. import procutil
from ..schema import Field, Schema
from ..timeutil import to_iso, utc_now
from .base import Source
from .postgres import CONNECTION, PgConnection, server_version_text

BASE_PAYLOAD = "base.tar"
WAL_KIND = "postgres_wal"
BASE_KIND = "postgres_base"
DEFAULT_PARTIAL_INTERVAL = 10.0
_SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")
_LABEL_START_RE = re.compile(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+)", re.MULTILINE)
_LABEL_TLI_RE = re.compile(r"^START TIMELINE: (\d+)", re.MULTILINE)
_RANGE_RE = re.compile(r'"Timeline":\s*(\d+),\s*"Start-LSN":\s*"([0-9A-Fa-f]+/[0-9A-Fa-f]+)",\s*'
                       r'"End-LSN":\s*"([0-9A-Fa-f]+/[0-9A-Fa-f]+)"')
SNIFF_LIMIT = 256 << 10
_RESTORE_POINT_RE = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F/]+, desc: RESTORE_POINT (.*)$", re.MULTILINE)
_XACT_TIME_RE = re.compile(r"desc: (?:COMMIT|ABORT)(?:_PREPARED)? (?:\d+: )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


_VALID_END_RE = re.compile(r"invalid record length at ([0-9A-Fa-f]+/[0-9A-Fa-f]+)")


def scan_wal(waldump, directory, name):
    """What the restore needs to know of WAL file ``name``, read with pg_waldump; None when unknown.

    ``{"times": (first, last), "restore_points": [{"name", "lsn"}]}``: the first and last
    commit/abort times (ISO-8601, UTC; ``(None, None)`` when the file holds no transaction end)
    tell which segment holds the first transaction end after a target time (a segment's
    storage time says nothing about its content when the stream catches up); the named
    restore points (``pg_create_restore_point``, LSN of the record) where a restore to a name
    stops. pg_waldump stops with "error in WAL record" at the end of a partial segment: what
    it printed before that counts; any other failure makes everything unknown (None).
    """
    try:
        done = subprocess.run([waldump, "--rmgr=Transaction", "--rmgr=XLOG", "--path=%s" % directory, name],
                              capture_output=True, timeout=300, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 and b"error in WAL record" not in done.stderr:
        return None
    text = done.stdout.decode("utf-8", "replace")
    times = _XACT_TIME_RE.findall(text)
    points = [{"name": point, "lsn": lsn} for lsn, point in _RESTORE_POINT_RE.findall(text)]
    # Where the valid WAL ends: pg_waldump stops at the first record that is not there (its CRC
    # covers the whole record, so everything before that position was received).
    ends = _VALID_END_RE.findall(done.stderr.decode("utf-8", "replace"))
    end = pgwal.parse_lsn(ends[-1]) if ends else None
    if not times:
        return {"times": (None, None), "restore_points": points, "end_lsn": end}
    return {"times": (times[0].replace(" ", "T") + "Z", times[-1].replace(" ", "T") + "Z"), "restore_points": points,
            "end_lsn": end}


def xact_times(waldump, directory, name):
    """``(first, last)`` commit/abort times of WAL file ``name`` (see ``scan_wal``); None when unknown."""
    scanned = scan_wal(waldump, directory, name)
    return scanned["times"] if scanned is not None else None


# The options of the WAL stream live in the base backup job's source section: one job file
# describes both halves of point-in-time recovery.
WAL_OPTIONS = Schema("postgres WAL stream", {
    "slot": Field("str", "physical replication slot of the WAL stream (default biometrics_backup)", nonempty=True),
    "wal_job": Field("str", "job name the WAL segments are stored under (default <job>-wal)", nonempty=True),
    "spool_dir": Field("path", "local directory pg_receivewal writes into (keep it on a persistent volume)"),
    "partial_interval": Field("number", "seconds between copies of the segment in progress (default 10)",
                              exclusive_minimum=0, maximum=3600),
    "checkpoint": Field("enum", "pg_basebackup --checkpoint (default fast)", choices=("fast", "spread")),
})


def default_wal_job(job, options):
    return (options or {}).get("wal_job") or "%s-wal" % job


def check_slot(name):
    if not _SLOT_RE.match(name or ""):
        raise ConfigError("replication slot %r: use 1-63 lowercase letters, digits and '_'" % (name,))
    return name


def server_facts(conn):
    """``{system_identifier, timeline, segment_size, server_version, server_version_num}`` of a server."""
    with conn.connect(autocommit=True) as db:
        row = db.execute("SELECT s.system_identifier::text, c.timeline_id, i.bytes_per_wal_segment, "
                         "current_setting('wal_level') FROM pg_catalog.pg_control_system() s, "
                         "pg_catalog.pg_control_checkpoint() c, pg_catalog.pg_control_init() i").fetchone()
        version = db.info.server_version
    if row[3] not in ("replica", "logical"):
        raise ConfigError("postgres: wal_level is %s on %s; point-in-time recovery needs wal_level=replica"
                          % (row[3], conn.endpoint()))
    return {"system_identifier": row[0], "timeline": int(row[1]), "segment_size": pgwal.check_segment_size(int(row[2])),
            "server_version": server_version_text(version), "server_version_num": version}


class PostgresBaseSource(Source):
    """``pg_basebackup`` in tar format on stdout, WAL left to the stream."""

    kind = BASE_KIND
    SCHEMA = CONNECTION.extend("source", dict(WAL_OPTIONS.fields))

    def __init__(self, options):
        super().__init__(options)
        self.conn = PgConnection(self.options, "source")
        self.checkpoint = self.options.get("checkpoint") or "fast"
        if self.options.get("slot"):
            check_slot(self.options["slot"])
        self._version = None
        self._facts = None

    def describe(self):
        description = self.conn.describe()
        description.pop("database", None)
        return dict(description, checkpoint=self.checkpoint, wal_job=self.options.get("wal_job"))

    def tool_versions(self):
        if self._version is None:
            self._version = procutil.tool_version(self.conn.tool("pg_basebackup"))[0]
        return {"pg_basebackup": self._version}

    def preflight(self):
        self.conn.tool("pg_basebackup")
        self._facts = server_facts(self.conn)
        self.tool_versions()

    def produce(self, emit, context):
        facts = self._facts or server_facts(self.conn)
        argv = [self.conn.tool("pg_basebackup"), "--pgdata=-", "--format=tar", "--wal-method=none",
                "--checkpoint=%s" % self.checkpoint, "--no-password", "--verbose",
                "--label=biometrics.backup %s" % context.job]
        tool = procutil.ToolStream(argv, env=self.conn.tool_env("postgres"), what="pg_basebackup",
                                   secrets=self.conn.secrets)
        stream = TarSniffer(tool, ("backup_label", "backup_manifest"))
        try:
            emit(BASE_PAYLOAD, stream)
        finally:
            tool.close()
        size = facts["segment_size"]
        label = stream.files.get("backup_label", b"").decode("utf-8", "replace")
        start = _LABEL_START_RE.search(label)
        timeline = _LABEL_TLI_RE.search(label)
        ranges = _RANGE_RE.findall(stream.files.get("backup_manifest", b"").decode("utf-8", "replace"))
        if start is None or timeline is None or not ranges:
            raise SourceError("pg_basebackup's output holds no backup_label or backup manifest WAL range: "
                              "cannot tell which WAL this backup needs")
        timeline = int(timeline.group(1))
        start_lsn, end_lsn = start.group(1).upper(), ranges[-1][2].upper()
        if int(ranges[-1][0]) != timeline:
            raise SourceError("the base backup started on timeline %d and ended on timeline %s (promotion during "
                              "the backup): take it again" % (timeline, ranges[-1][0]))
        return {
            # The manifest's times are whole seconds; the restore needs to know whether the
            # backup was complete before a target within the same second.
            "completed_at": utc_now().isoformat().replace("+00:00", "Z"),
            "system_identifier": facts["system_identifier"], "server_version": facts["server_version"],
            "server_version_num": facts["server_version_num"], "timeline": timeline, "segment_size": size,
            "start_lsn": start_lsn, "end_lsn": end_lsn,
            "wal_start": pgwal.segment_of_lsn(timeline, start_lsn, size),
            "wal_end": pgwal.segment_of_lsn(timeline, end_lsn, size),
            "wal_job": default_wal_job(context.job, self.options),
        }


class TarSniffer:
    """Passes a tar stream through unchanged, keeping (the last SNIFF_LIMIT bytes of) chosen members.

    pg_basebackup writes ``backup_label`` first and ``backup_manifest`` (with the WAL range
    the backup needs) last; both are read on the way to storage, without a second pass.
    """

    def __init__(self, raw, names):
        self._raw = raw
        self._names = set(names)
        self.files = {}
        self._buffer = b""
        self._member = None    # name being kept, or None
        self._remaining = 0    # data bytes left in the current member
        self._padding = 0      # padding bytes after it
        self._long_name = None
        self._done = False

    def read(self, size=-1):
        data = self._raw.read(size)
        if data and not self._done:
            self._feed(data)
        return data

    def readable(self):
        return True

    def _feed(self, data):
        self._buffer += data
        while True:
            if self._remaining:
                take = self._buffer[:self._remaining]
                self._buffer = self._buffer[len(take):]
                self._remaining -= len(take)
                if self._member is not None:
                    kept = self.files.get(self._member, b"") + take
                    self.files[self._member] = kept[-SNIFF_LIMIT:]
                elif self._long_name is not None:
                    self._long_name[1].append(take)
                if self._remaining:
                    return
                self._after_member()
                continue
            if self._padding:
                take = min(self._padding, len(self._buffer))
                self._buffer = self._buffer[take:]
                self._padding -= take
                if self._padding:
                    return
                continue
            if len(self._buffer) < 512:
                return
            header, self._buffer = self._buffer[:512], self._buffer[512:]
            if header == bytes(512):
                self._done = True
                self._buffer = b""
                return
            self._header(header)

    def _header(self, header):
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix and header[257:262] == b"ustar":
            name = prefix + "/" + name
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            self._done = True  # not a tar we understand: stop looking, keep streaming
            return
        kind = header[156:157]
        if self._long_name is not None and self._long_name[0] == "done":
            name = self._long_name[1]
            self._long_name = None
        self._member = None
        if kind == b"L":  # GNU long name: the next member's name is this member's data
            self._long_name = ["reading", []]
        elif name in self._names:
            self._member = name
            self.files[name] = b""
        self._remaining = size
        self._padding = (-size) % 512
        if size == 0:
            self._after_member()

    def _after_member(self):
        if self._long_name is not None and self._long_name[0] == "reading":
            self._long_name = ["done", b"".join(self._long_name[1]).split(b"\0", 1)[0].decode("utf-8", "replace")]


class _WalFileSource(Source):
    """One spool file (a segment, a partial segment or a history file) as one payload."""

    kind = WAL_KIND

    def __init__(self, name, data, stats, describe):
        super().__init__({})
        self.name = name
        self.data = data
        self.stats = stats
        self._describe = describe

    def describe(self):
        return dict(self._describe)

    def produce(self, emit, context):
        emit(self.name, io.BytesIO(self.data))
        return dict(self.stats)


class WalState:
    """What the WAL job holds: complete segments, partial copies and history files, by name."""

    def __init__(self, manifests):
        self.segments = {}   # name -> manifest (complete segments)
        self.partials = {}   # name (without .partial) -> [manifests], newest first
        self.histories = {}  # name -> manifest
        for manifest in manifests:  # newest first (Catalog.scan)
            wal = manifest.get("stats") or {}
            name = wal.get("file")
            if manifest.get("kind") != WAL_KIND or not name:
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
        from ..manifest import validate_job_name
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
            stored_system = (manifest.get("stats") or {}).get("system_identifier")
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
        from ..backup import BackupRun
        # When the file was read from the spool, to the microsecond: a partial copy holds the
        # WAL written up to then (the manifest's own times are whole seconds).
        stats = dict(stats, file=name, captured_at=self._read_at, system_identifier=self.facts["system_identifier"],
                     segment_size=self.facts["segment_size"], plain_sha256=hashlib.sha256(data).hexdigest(),
                     plain_bytes=len(data))
        source = _WalFileSource(name, data, stats, {"host": self.conn.host or "local socket",
                                                    "port": self.conn.port or 5432, "slot": self.slot})
        run = BackupRun(self.wal_job, source, self.storage, compression=self.compression, encryption=self.encryption)
        manifest = run.run()
        self.result["bytes_stored"] += manifest["size_bytes"]
        self.result["last_stored_at"] = manifest["finished_at"]
        if self.progress is not None:
            self.progress()
        return manifest

    def _xact_times(self, directory, name):
        if self._waldump is None:
            try:
                self._waldump = self.conn.tool("pg_waldump")
            except ConfigError:
                self._waldump = ""
        if not self._waldump:
            return None
        return scan_wal(self._waldump, directory, name)

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
            times = self._xact_times(scratch, base)
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
                self.log("could not delete superseded partial WAL copy %s: %s" % (manifest["id"], exc))

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
