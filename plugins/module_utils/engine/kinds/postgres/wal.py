"""PostgreSQL point-in-time recovery, the backup side: base backups and the WAL file source.

``postgres_base`` (a kind): ``pg_basebackup --format=tar --wal-method=none --pgdata=-``
streamed through the pipeline as one payload ``base.tar``. The WAL the backup needs is not
in it: the WAL stream stores it (engine/walstream.py). ``stats`` records the start/end LSN,
timeline, the first and last WAL segment the backup needs, the system identifier and the
segment size.

``postgres_wal`` (a kind written by the WAL stream only): one spool file (a segment, a
partial segment or a timeline history file) as one payload (:class:`WalFileSource`), with
the commit times and restore points ``pg_waldump`` finds in it (:func:`scan_wal`).

The password reaches pg_basebackup through ``PGPASSWORD`` only. Sources read; they never
touch storage.
"""

import io
import re
import subprocess

from ...errors import ConfigError, SourceError
from ... import pgwal
from ... import procutil
from ...schema import Field, Schema
from ...timeutil import utc_now
from ..contract import Source
from .connection import CONNECTION, PgConnection, server_version_text

BASE_PAYLOAD = "base.tar"
WAL_KIND = "postgres_wal"
BASE_KIND = "postgres_base"
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


class WalFileSource(Source):
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
