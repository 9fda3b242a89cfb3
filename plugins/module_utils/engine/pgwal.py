"""PostgreSQL WAL arithmetic: LSNs, segment file names, and gaps in a run of segments.

Pure functions (no I/O), shared by the WAL streamer, the base backup kind and the
point-in-time restore.

A WAL segment file is named ``TTTTTTTTXXXXXXXXYYYYYYYY``: the timeline, then the segment
number split into the "log id" (``segno // segments_per_log_id``) and the segment within it,
all upper-case hex. ``segments_per_log_id`` is ``2**32 // segment_size`` (256 for the default
16 MiB segments). ``pg_receivewal`` writes the segment in progress as ``<name>.partial``;
timeline history files are ``TTTTTTTT.history``.
"""

import re

from .errors import ConfigError
from .manifest import Manifest

DEFAULT_SEGMENT_SIZE = 16 << 20
PARTIAL_SUFFIX = ".partial"
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")


def parse_lsn(text):
    """``'16/B374D848'`` -> ``0x16B374D848`` (an int); ConfigError for anything else."""
    match = _LSN_RE.match(str(text).strip()) if text is not None else None
    if match is None:
        raise ConfigError("%r is not a PostgreSQL LSN (expected two hex numbers as in 0/16B3748)" % (text,))
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value):
    """The inverse of ``parse_lsn``: ``0x16B374D848`` -> ``'16/B374D848'``."""
    if not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise ConfigError("%r is not a 64-bit LSN" % (value,))
    return "%X/%X" % (value >> 32, value & 0xFFFFFFFF)


def check_segment_size(segment_size):
    """PostgreSQL allows powers of two from 1 MiB to 1 GiB."""
    if (not isinstance(segment_size, int) or segment_size < (1 << 20) or segment_size > (1 << 30)
            or segment_size & (segment_size - 1)):
        raise ConfigError("%r is not a valid WAL segment size (a power of two from 1 MiB to 1 GiB)" % (segment_size,))
    return segment_size


def segments_per_log_id(segment_size=DEFAULT_SEGMENT_SIZE):
    return (1 << 32) // check_segment_size(segment_size)


def segment_number(lsn, segment_size=DEFAULT_SEGMENT_SIZE):
    """The segment number holding byte ``lsn`` (an int or LSN text)."""
    if isinstance(lsn, str):
        lsn = parse_lsn(lsn)
    return lsn // check_segment_size(segment_size)


def segment_name(timeline, segno, segment_size=DEFAULT_SEGMENT_SIZE):
    """File name of segment ``segno`` on ``timeline``."""
    if not isinstance(timeline, int) or not 1 <= timeline <= 0xFFFFFFFF:
        raise ConfigError("%r is not a timeline id" % (timeline,))
    per = segments_per_log_id(segment_size)
    if not isinstance(segno, int) or segno < 0 or segno // per > 0xFFFFFFFF:
        raise ConfigError("%r is not a segment number" % (segno,))
    return "%08X%08X%08X" % (timeline, segno // per, segno % per)


def segment_of_lsn(timeline, lsn, segment_size=DEFAULT_SEGMENT_SIZE):
    """File name of the segment holding ``lsn`` on ``timeline``."""
    return segment_name(timeline, segment_number(lsn, segment_size), segment_size)


def parse_segment_name(name, segment_size=DEFAULT_SEGMENT_SIZE):
    """``(timeline, segno, partial)`` of a segment file name (with or without ``.partial``); None otherwise."""
    partial = name.endswith(PARTIAL_SUFFIX)
    base = name[:-len(PARTIAL_SUFFIX)] if partial else name
    match = _SEGMENT_RE.match(base)
    if match is None:
        return None
    timeline, log_id, seg = (int(part, 16) for part in match.groups())
    per = segments_per_log_id(segment_size)
    if timeline == 0 or seg >= per:
        return None
    return timeline, log_id * per + seg, partial


def history_timeline(name):
    """The timeline of a ``TTTTTTTT.history`` file name, else None."""
    match = _HISTORY_RE.match(name)
    return int(match.group(1), 16) if match else None


def segment_start_lsn(segno, segment_size=DEFAULT_SEGMENT_SIZE):
    return segno * check_segment_size(segment_size)


def find_gaps(segnos, first=None, last=None):
    """Missing segment numbers as ``[(from, to), ...]`` (inclusive ranges), in order.

    ``segnos``: the numbers present (any order, duplicates allowed). The range checked runs
    from ``first`` (default: the smallest present) to ``last`` (default: the largest present).
    """
    present = sorted(set(segnos))
    if first is None:
        if not present:
            return []
        first = present[0]
    if last is None:
        if not present:
            return []
        last = present[-1]
    gaps = []
    expected = first
    for segno in present:
        if segno < first:
            continue
        if segno > last:
            break
        if segno > expected:
            gaps.append((expected, segno - 1))
        expected = segno + 1
    if expected <= last:
        gaps.append((expected, last))
    return gaps


def describe_gaps(gaps, timeline, segment_size=DEFAULT_SEGMENT_SIZE, limit=5):
    """``'000000010000000000000003'`` or ``'...03 to ...07'`` for each gap (at most ``limit``), joined."""
    parts = []
    for start, end in gaps[:limit]:
        if start == end:
            parts.append(segment_name(timeline, start, segment_size))
        else:
            parts.append("%s to %s" % (segment_name(timeline, start, segment_size),
                                       segment_name(timeline, end, segment_size)))
    if len(gaps) > limit:
        parts.append("and %d more gaps" % (len(gaps) - limit))
    return ", ".join(parts)


def stream_break(last_stored, resume, timeline_changed=False):
    """Why streaming from ``resume`` after ``last_stored`` would lose WAL, or None.

    ``last_stored``: ``(timeline, segno)`` of the newest complete segment stored (None when
    nothing is stored yet); ``resume``: ``(timeline, segno)`` where the stream starts again
    (the slot's restart position). The segment after the last stored one must be the next
    streamed: anything later is a hole in the archive.
    """
    if last_stored is None or resume is None:
        return None
    stored_tli, stored_segno = last_stored
    tli, segno = resume
    if tli != stored_tli and not timeline_changed:
        return ("the server is on timeline %d but the stored WAL ends on timeline %d (promotion or restore "
                "of the database): a new base backup is needed" % (tli, stored_tli))
    if segno > stored_segno + 1:
        return ("the stream resumes at segment %d but the stored WAL ends at segment %d: %d segment(s) were "
                "never stored (replication slot lost or recreated)" % (segno, stored_segno, segno - stored_segno - 1))
    return None


def base_wal_start(base):
    """``(timeline, segno, name)`` of the first WAL segment a ``postgres_base`` backup needs, or None.

    ``base`` is its manifest (``stats.wal_start``, else ``stats.start_lsn`` with ``stats.timeline``)
    or a flat mapping with those keys (the retention lookup's input).
    """
    if not isinstance(base, dict):
        return None
    stats = base.get("stats") if isinstance(base.get("stats"), dict) else base
    size = stats.get("segment_size") or DEFAULT_SEGMENT_SIZE
    try:
        if stats.get("wal_start"):
            parsed = parse_segment_name(str(stats["wal_start"]), size)
            if parsed is not None:
                return parsed[0], parsed[1], segment_name(parsed[0], parsed[1], size)
        if stats.get("start_lsn") and stats.get("timeline"):
            timeline = int(stats["timeline"])
            segno = segment_number(stats["start_lsn"], size)
            return timeline, segno, segment_name(timeline, segno, size)
    except (ConfigError, TypeError, ValueError):
        return None
    return None


def wal_job_of(job, base):
    """The WAL job a ``postgres_base`` backup names: ``stats.wal_job``, default ``<job>-wal``.

    ``base`` is its manifest or a flat mapping with ``wal_job`` (the retention lookup's input),
    as for :func:`base_wal_start`.
    """
    stats = base.get("stats") if isinstance(base.get("stats"), dict) else base
    return stats.get("wal_job") or "%s-wal" % job


def wal_needed(needs, timeline, segno):
    """Whether WAL segment ``(timeline, segno)`` is needed by any base backup in ``needs``
    (``[(timeline, first segno)]``): by one on the same timeline from its first segment on, and by
    every one on an earlier timeline (the archive may continue on a later timeline after a promotion)."""
    return any(timeline > tli or (timeline == tli and segno >= first) for tli, first in needs)


def wal_keep_reason(wal_job, name):
    """The retention reason of the oldest kept base backup: the WAL range it keeps."""
    return "oldest kept base backup: WAL of job %s kept from %s on (older WAL is pruned)" % (wal_job, name)


def superseded_partials(manifests):
    """Manifests of partial WAL copies that another listed WAL file makes redundant, with the reason.

    ``manifests`` are a WAL job's (``postgres_wal``) manifests. A partial copy of a segment is
    superseded by the complete segment, or by a partial copy of the same segment that reaches
    further (``stats.end_lsn``; the backup id breaks ties): pg_receivewal only appends to the
    segment in progress, so the further copy holds every byte of the shorter one. The stream
    deletes what it supersedes at once; a copy destination uses this to do the same.
    Returns ``[(manifest, reason)]``.
    """
    complete = set()
    partials = {}
    for manifest in manifests:
        wal = Manifest.wrap(manifest).stats
        if wal.get("type") == "segment" and wal.get("file"):
            complete.add(wal["file"])
        elif wal.get("type") == "partial" and wal.get("file"):
            partials.setdefault(wal["file"], []).append(manifest)

    def reach(manifest):
        manifest = Manifest.wrap(manifest)
        try:
            end = parse_lsn(manifest.stats.get("end_lsn"))
        except ConfigError:
            end = -1
        return end, manifest.id

    found = []
    for name, copies in sorted(partials.items()):
        if name in complete:
            found.extend((m, "the complete segment %s is stored" % name) for m in copies)
            continue
        copies = sorted(copies, key=reach)
        found.extend((m, "a newer partial copy of %s (%s) reaches further" % (name, Manifest.wrap(copies[-1]).id))
                     for m in copies[:-1])
    return found
