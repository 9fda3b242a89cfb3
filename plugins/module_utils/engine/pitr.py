"""PostgreSQL point-in-time restore: base backup + stored WAL -> a private server -> result.

1. plan: the newest ``postgres_base`` backup finished at or before the target, and every WAL
   segment from the one holding its start LSN up to the first one holding a transaction end
   (commit/abort, times recorded by the streamer with pg_waldump) after the target; for
   ``latest``, up to the newest stored segment or partial copy; for a named restore point
   (``pg_create_restore_point``, found in the restore points the streamer recorded per WAL
   file), the newest base backup that ended before it and the WAL up to the segment holding
   it. A missing segment, a base backup without stored WAL, or a target beyond the stored
   WAL fails here;
2. verify and stage: every object is read in full (SHA-256, size, decrypt, decompress):
   WAL into ``<scratch>/wal`` (a partial copy under its segment name), the base tarball
   unpacked into ``<scratch>/data``. Nothing outside the scratch directory is touched yet;
3. recover: a private ``postgres`` (Unix socket in the scratch directory, no TCP, trust
   for local connections only) with ``recovery.signal``, ``restore_command`` copying from the
   verified staging directory, ``recovery_target_time`` (or ``recovery_target_name``) and
   ``recovery_target_action=promote``,
   all passed on its command line (nothing written into the configuration files); the
   engine waits until it has promoted and reads the LSN and the commit time it stopped at;
4. deliver: ``pg_dump`` of one database of the private server into ``pg_restore`` on the
   target (PostgresTarget: a new database, row counts checked, optional swap), or the stopped
   data directory moved to ``data_dir`` for a full cluster restore.

If the stored WAL holds no transaction end after the target (the database was idle since),
PostgreSQL would stop with "recovery ended before configured recovery target was reached";
when that WAL was stored after the target, the state at the target is the state at its end,
so the private server then recovers to the end of the stored WAL instead (reported as
``target_reached: false``, ``no_commit_after_target: true``). The planner tells it from the
commit times the stream recorded; for WAL stored without them, PostgreSQL's stop says it (see
``_recover_after_a_missed_target``).
"""

import datetime
import os
import pwd
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from . import pgwal
from .backup import recorded_compression
from . import procutil
from .catalog import Catalog
from .errors import ConfigError, IntegrityError, NotFoundError, SourceError
from .pipeline import CHUNK, PlaintextStream
from . import manifest as mf
from .keys import identities as backup_identities
from .kinds.postgres.connection import count_rows, psycopg, require_psycopg
from .kinds.postgres.source import DUMP_PAYLOAD
from .kinds.postgres.wal import BASE_KIND, BASE_PAYLOAD, default_wal_job
from .walstream import WalState
from .kinds.contract import RestoreContext
from .timeutil import parse_iso

LATEST = "latest"
UNKNOWN = "unknown"
_STOP_RE = re.compile(r"recovery stopping (before|after) commit of transaction (\d+), time ([0-9:. +-]+)")
_NOT_REACHED = "recovery ended before configured recovery target was reached"
_LAST_COMMIT_RE = re.compile(r"last completed transaction was at log time ([0-9:. +-]+)")


class RestorePlan:
    """What a point-in-time restore will read, decided before any byte is read."""

    def __init__(self, base, wal, target_time, wal_job, stored_until):
        self.base = base                # manifest of the base backup
        self.wal = wal                  # [(file name to stage, manifest, kind)] in replay order
        self.target_time = target_time  # datetime or None (latest)
        self.wal_job = wal_job
        self.stored_until = stored_until
        self.no_commit_after_target = False
        self.times_unknown = False      # some WAL was stored without commit times (no pg_waldump)
        self.restore_point = None       # recover to this named restore point instead
        self.restore_point_lsn = None   # where it lies, when the stored WAL says

    def describe(self):
        stats = self.base.stats
        return {"base_backup": self.base.id, "base_finished_at": self.base.finished_at,
                "timeline": stats.get("timeline"), "start_lsn": stats.get("start_lsn"),
                "end_lsn": stats.get("end_lsn"), "wal_job": self.wal_job,
                "target_time": (to_iso_precise(self.target_time) if self.target_time
                                else None if self.restore_point else LATEST),
                "wal_first": self.wal[0][0] if self.wal else None, "wal_last": self.wal[-1][0] if self.wal else None,
                "wal_segments": len(self.wal), "wal_partial": bool(self.wal and self.wal[-1][2] == "partial"),
                "restore_point": self.restore_point, "restore_point_lsn": self.restore_point_lsn,
                "wal_stored_until": self.stored_until, "no_commit_after_target": self.no_commit_after_target,
                "wal_times_known": not self.times_unknown,
                "bytes_to_read": self.base.size_bytes + sum(m.size_bytes for dummy, m, dummy2 in self.wal)}

    def covers_target(self):
        """Whether the stored WAL is known to hold every commit up to the target time."""
        return (self.target_time is not None and self.stored_until is not None
                and parse_iso(self.stored_until) >= self.target_time)


def _beyond_stored_wal(wal_job, stored_until, target):
    """The error for a ``target`` time after the end of the WAL stored in ``wal_job``."""
    return NotFoundError("the stored WAL of job %s ends at %s, before the target %s: it cannot be recovered yet "
                         "(is the WAL stream running?)"
                         % (wal_job, stored_until or "an unknown time (a complete segment without the partial "
                            "copy after it)", to_iso_precise(target)))


def to_iso_precise(moment):
    return moment.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_target(point_in_time):
    """None for ``latest``, else an aware datetime (naive times are UTC)."""
    if point_in_time in (None, "", LATEST):
        return None
    try:
        return parse_iso(point_in_time)
    except ValueError:
        raise ConfigError("point_in_time %r is neither 'latest' nor an ISO-8601 time" % (point_in_time,)) from None


def plan_restore(storage, job, point_in_time=None, wal_job=None, restore_point=None):
    """A RestorePlan for ``job`` (base backups) and ``wal_job`` (its WAL); errors name what is missing.

    ``restore_point``: recover to the named restore point instead (``recovery_target_name``);
    ``point_in_time`` is then an upper bound (see ``_locate_restore_point``)."""
    target = parse_target(point_in_time)
    if restore_point is not None and (not isinstance(restore_point, str) or not restore_point.strip()
                                      or len(restore_point) > 63):
        raise ConfigError("restore_point %r is not a restore point name (1 to 63 characters)" % (restore_point,))
    catalog = Catalog(storage)
    bases = [m for m in catalog.scan(job, with_orphans=False) if m.kind == BASE_KIND]
    if not bases:
        raise NotFoundError("job %s has no %s backup" % (job, BASE_KIND))
    if target is not None:
        usable = [m for m in bases if base_completed_at(m) <= target]
        if not usable:
            raise NotFoundError("job %s has no base backup finished at or before %s (the oldest finished at %s)"
                                % (job, to_iso_precise(target), bases[-1].finished_at))
    else:
        usable = bases
    base = usable[0]
    state = None
    point = None
    if restore_point is not None:
        wal_job = wal_job or base.stats.get("wal_job") or default_wal_job(job, {})
        state = WalState.load(storage, wal_job)
        base, point = _locate_restore_point(usable, state, restore_point, wal_job, target)
    stats = base.stats
    wal_job = wal_job or stats.get("wal_job") or default_wal_job(job, {})
    size = int(stats.get("segment_size") or pgwal.DEFAULT_SEGMENT_SIZE)
    timeline = int(stats["timeline"])
    first = pgwal.segment_number(stats["start_lsn"], size)
    needed_end = pgwal.segment_number(stats["end_lsn"], size)
    state = state or WalState.load(storage, wal_job)
    segments, partials = {}, {}
    for name, manifest in state.segments.items():
        parsed = pgwal.parse_segment_name(name, size)
        if parsed and parsed[0] == timeline and parsed[1] >= first:
            segments[parsed[1]] = manifest
    for name, manifests in state.partials.items():
        parsed = pgwal.parse_segment_name(name, size)
        if parsed and parsed[0] == timeline and parsed[1] >= first:
            partials[parsed[1]] = manifests[0]
    system = stats.get("system_identifier")
    for manifest in list(segments.values()) + list(partials.values()):
        wal_stats = manifest.stats
        if system and wal_stats.get("system_identifier") not in (None, system):
            raise IntegrityError("WAL %s in job %s belongs to database system %s, the base backup %s to %s"
                                 % (wal_stats.get("file"), wal_job, wal_stats["system_identifier"], base.id, system))
    candidates = sorted(set(segments) | set(partials))
    if not candidates:
        raise NotFoundError("no WAL of base backup %s (from segment %s) is stored in job %s"
                            % (base.id, pgwal.segment_name(timeline, first, size), wal_job))
    newest = max(candidates)
    stored_until = _horizon(segments, partials, newest)
    beyond = unknown_times = False
    if point is not None:
        # Recovery stops at the restore point's record: WAL up to the segment holding it.
        last = min(newest, pgwal.segment_number(point["lsn"], size))
    elif target is None:
        last = newest
    else:
        last = _last_needed(candidates, segments, partials, target)
        if last == UNKNOWN:
            # Some WAL was stored without transaction times (no pg_waldump): replay all of it
            # and let PostgreSQL's recovery_target_time find the stop (or, when it finds none,
            # restore_point_in_time recovers to the end of it: see covers_target).
            last, unknown_times = newest, True
        elif last is None:
            # No transaction ended after the target in the stored WAL: the target's state is
            # the state at the end of the stored WAL, provided that WAL was stored after it.
            if restore_point is not None:
                last = newest  # the point lies before the target: all stored WAL up to it
            elif stored_until is None or parse_iso(stored_until) < target:
                raise _beyond_stored_wal(wal_job, stored_until, target)
            else:
                last, beyond = newest, True
    last = max(last, min(needed_end, newest))
    if last < needed_end:
        raise NotFoundError("base backup %s needs WAL up to segment %s, and job %s holds WAL only up to %s"
                            % (base.id, pgwal.segment_name(timeline, needed_end, size), wal_job,
                               pgwal.segment_name(timeline, newest, size)))
    # Segments before the last must be complete; the last may be a partial copy.
    present = [segno for segno in segments if segno < last] + [last] if (last in segments or last in partials) else []
    gaps = pgwal.find_gaps(present, first, last)
    if gaps:
        raise IntegrityError("WAL needed to restore base backup %s to %s is missing from job %s: %s"
                             % (base.id, to_iso_precise(target) if target else LATEST, wal_job,
                                pgwal.describe_gaps(gaps, timeline, size)))
    wal = []
    for segno in range(first, last + 1):
        name = pgwal.segment_name(timeline, segno, size)
        if segno in segments:
            wal.append((name, segments[segno], "segment"))
        else:
            wal.append((name, partials[segno], "partial"))
    plan = RestorePlan(base, wal, target, wal_job, stored_until)
    plan.no_commit_after_target = beyond
    plan.times_unknown = unknown_times
    plan.restore_point = restore_point
    plan.restore_point_lsn = point["lsn"] if point else None
    return plan


def _provably_after(state, point, target):
    """Whether the restore point recording ``point`` lies after ``target``: some WAL file before the
    one holding it (same timeline, lower segment) has a commit stamped after ``target``."""
    parsed = pgwal.parse_segment_name(str(point.get("file") or ""))
    if parsed is None:
        return False
    for manifest in list(state.segments.values()) + [copies[0] for copies in state.partials.values()]:
        wal = manifest.stats  # a WalState holds Manifests
        other = pgwal.parse_segment_name(str(wal.get("file") or ""))
        if (other is not None and other[0] == parsed[0] and other[1] < parsed[1] and wal.get("last_xact_time")
                and parse_iso(wal["last_xact_time"]) > target):
            return True
    return False


def _locate_restore_point(bases, state, name, wal_job, target):
    """``(base, point)`` for a restore to the restore point ``name``; ``point`` is None when unknown.

    The streamer records the restore points of every WAL file it stores (pg_waldump, with
    their LSN). Known: the newest recording of ``name`` is the point, and the base backup is
    the newest (of ``bases``, all finished before ``target`` when given) on the point's timeline
    that ended before it with no other recording of the name between its start and the point
    (recovery stops at the first it meets). Not known (WAL stored without pg_waldump): the
    base backup is the newest finished before ``target``, which must be given as a time after
    the restore point was created; without it the restore is refused.
    """
    found, unknown = [], False
    for manifest in list(state.segments.values()) + [copies[0] for copies in state.partials.values()]:
        wal = manifest.stats  # a WalState holds Manifests
        if "restore_points" not in wal:
            unknown = True
            continue
        for point in wal["restore_points"]:
            if point.get("name") == name:
                found.append({"name": name, "lsn": point["lsn"], "timeline": wal.get("timeline"),
                              "file": wal.get("file")})
    unique = {}
    for point in found:  # a partial copy and its complete segment record the same point
        unique[(point["timeline"], pgwal.parse_lsn(point["lsn"]))] = point
    found = [unique[key] for key in sorted(unique)]
    if target is not None and found:
        # point_in_time is an upper bound: a recording that provably comes after it (a commit
        # stamped after the bound lies in an earlier WAL file) is not the one asked for. A
        # recording in doubt is checked after recovery (restore_point_in_time).
        later = [p for p in found if _provably_after(state, p, target)]
        if later and len(later) == len(found):
            raise NotFoundError("restore point %r was created after %s (at LSN %s): give a later point_in_time"
                                % (name, to_iso_precise(target), ", ".join(p["lsn"] for p in later)))
        found = [p for p in found if p not in later]
    if not found:
        if not unknown:
            raise NotFoundError("restore point %r is not in the stored WAL of job %s" % (name, wal_job))
        if target is None:
            raise ConfigError("restore point %r: the stored WAL of job %s was stored without pg_waldump, so where "
                              "the point lies is not known; give point_in_time too, a time after the restore point "
                              "was created (the newest base backup finished before it is used)" % (name, wal_job))
        return bases[0], None
    point = found[-1]
    lsn = pgwal.parse_lsn(point["lsn"])
    for base in bases:  # newest first
        stats = base.stats
        if not stats.get("end_lsn") or int(stats.get("timeline") or 0) != point["timeline"]:
            continue
        start, end = pgwal.parse_lsn(stats["start_lsn"]), pgwal.parse_lsn(stats["end_lsn"])
        if end > lsn:
            continue
        earlier = [p for p in found[:-1] if p["timeline"] == point["timeline"] and pgwal.parse_lsn(p["lsn"]) >= start]
        if earlier:
            raise NotFoundError("restore point %r was created more than once (at LSN %s): recovery from base backup "
                                "%s would stop at the first; use a unique name" % (
                                    name, ", ".join(p["lsn"] for p in earlier + [point]), base.id))
        return base, point
    raise NotFoundError("restore point %r (LSN %s, timeline %s) lies before the end of every base backup of the "
                        "job%s" % (name, point["lsn"], point["timeline"],
                                   " finished before %s" % to_iso_precise(target) if target else ""))


def _horizon(segments, partials, newest):
    """Up to when the stored WAL is known to hold every commit (ISO-8601), or None.

    A partial copy records ``reach_time`` (walstream.partial_reach): the server's
    clock read just before the copy was read from the spool, when the copy holds the WAL the
    server had inserted by then; else null, and then only its own last commit
    (``last_xact_time``) is known to be stored - a commit stamped just before the copy was read
    may not have reached pg_receivewal yet. Copies stored before ``reach_time`` was recorded:
    when they were read (``stats.captured_at``, else their whole-second store time). A complete
    segment as the newest file says nothing about the WAL after it: only its own last
    transaction end is known to be stored.
    """
    if newest in partials and newest not in segments:
        manifest = mf.Manifest.wrap(partials[newest])
        stats = manifest.stats
        if "reach_time" in stats:
            return stats["reach_time"] or stats.get("last_xact_time")
        return stats.get("captured_at") or manifest.finished_at
    return mf.Manifest.wrap(segments[newest]).stats.get("last_xact_time")


def wal_reach(state, segment_size=pgwal.DEFAULT_SEGMENT_SIZE):
    """Up to when the WAL a job holds (a WalState) is known to hold every commit (ISO-8601), or None.

    The rule a restore to ``latest`` applies (:func:`_horizon`), on the newest timeline stored:
    the recovery window's end the stream reports is then the time a restore could reach, not
    the time its newest file was stored.
    """
    segments, partials = {}, {}
    for name, manifest in state.segments.items():
        parsed = pgwal.parse_segment_name(name, segment_size)
        if parsed:
            segments[parsed[:2]] = manifest
    for name, manifests in state.partials.items():
        parsed = pgwal.parse_segment_name(name, segment_size)
        if parsed and manifests:
            partials[parsed[:2]] = manifests[0]
    if not segments and not partials:
        return None
    return _horizon(segments, partials, max(set(segments) | set(partials)))


def base_completed_at(base):
    """When a base backup was complete: ``stats.completed_at``, else its manifest time + 1 s (whole seconds)."""
    base = mf.Manifest.wrap(base)
    precise = base.stats.get("completed_at")
    if precise:
        return parse_iso(precise)
    return parse_iso(base.finished_at) + datetime.timedelta(seconds=1)


def _last_needed(candidates, segments, partials, target):
    """The first segment holding a transaction end after ``target`` (recovery stops there), or None.

    Segments without recorded times (pg_waldump was missing when they were stored) count
    as "maybe": the search goes on past them, and the first one with a later time ends it;
    when none has, the answer is UNKNOWN rather than None ("no transaction ended after it"),
    since a segment without times may hold one.
    """
    unknown = False
    for segno in candidates:
        stats = mf.Manifest.wrap(segments.get(segno) or partials[segno]).stats
        last_time = stats.get("last_xact_time")
        if last_time and parse_iso(last_time) > target:
            return segno
        if not stats.get("xact_times_known"):
            unknown = True
    return UNKNOWN if unknown else None


class Keys:
    """The identity or passphrase of the restore, opened per backup (each has its own recipients)."""

    def __init__(self, storage, identity=None, passphrase=None):
        self.storage = storage
        self.identity = identity
        self.passphrase = passphrase

    def open(self, manifest, obj):
        manifest = mf.Manifest.wrap(manifest)
        algorithm = recorded_compression(manifest)  # an unknown one is refused before the object is read
        key = mf.object_key(manifest.job, manifest.id, mf.StoredObject.wrap(obj).name)
        found = backup_identities(self.storage, manifest, self.identity, self.passphrase)
        return PlaintextStream(self.storage, key, obj, algorithm, found)


def _payload(manifest, name=None):
    """The entry of payload ``name`` (any payload when None) of ``manifest``."""
    manifest = mf.Manifest.wrap(manifest)
    for obj in manifest.objects:
        if obj.payload and (name is None or obj.payload == name):
            return obj
    raise IntegrityError("backup %s of job %s has no %s payload" % (manifest.id, manifest.job, name or "data"))


def stage_wal(keys, plan, wal_dir, log):
    """Read, verify and write every planned WAL file into ``wal_dir``; IntegrityError names the file."""
    os.makedirs(wal_dir, mode=0o700, exist_ok=True)
    total = 0
    for name, manifest, kind in plan.wal:
        try:
            total += write_verified_wal(keys, manifest, name, os.path.join(wal_dir, name))
        except IntegrityError as exc:
            raise IntegrityError("WAL %s%s (backup %s of job %s) failed verification: %s"
                                 % (name, " (partial copy)" if kind == "partial" else "", manifest.id,
                                    manifest.job, exc)) from None
    log("verified and staged %d WAL files (%d bytes)" % (len(plan.wal), total))
    return total


def write_verified_wal(keys, manifest, name, path):
    """Stored WAL file ``name``, decrypted and decompressed into ``path`` while its stored size
    and SHA-256 are checked, then its plain size against the manifest; returns that size.
    Raises IntegrityError when anything disagrees (``path`` is then not to be used)."""
    manifest = mf.Manifest.wrap(manifest)
    expected = manifest.stats.get("plain_bytes")
    stream = keys.open(manifest, _payload(manifest))
    try:
        with open(path, "wb") as out:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
        stream.finish()
    finally:
        stream.close()
    if expected is not None and stream.plain_bytes != expected:
        raise IntegrityError("WAL %s decompressed to %d bytes, its manifest says %d"
                             % (name, stream.plain_bytes, expected))
    return stream.plain_bytes


def _inside(root, path):
    return os.path.commonpath([root, path]) == root


def _checked_member(member, data_dir):
    """``member`` if extracting it stays inside ``data_dir``, else TarError.

    The checks of Python's tarfile ``data`` filter, for interpreters that lack it (Debian 12's
    3.11.2, which the runner image is built on): only files, directories and symbolic links;
    no absolute names or ``..``; paths and link targets resolved on disk (an earlier link in
    the archive counts) must stay inside; no set-id bits, no group/other write; owned by the
    extracting user.
    """
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        raise tarfile.TarError("member %r lies outside the data directory" % name)
    root = os.path.realpath(data_dir)
    if not _inside(root, os.path.realpath(os.path.join(root, name))):
        raise tarfile.TarError("member %r lies outside the data directory" % name)
    if member.issym():
        target = os.path.join(root, os.path.dirname(name), member.linkname)
        if os.path.isabs(member.linkname) or not _inside(root, os.path.realpath(target)):
            raise tarfile.TarError("symbolic link %r points outside the data directory" % name)
    elif member.isreg():
        member.mode = (member.mode & 0o755) | 0o600
    elif member.isdir():
        member.mode = (member.mode & 0o755) | 0o700
    else:
        raise tarfile.TarError("member %r is neither a file, a directory nor a symbolic link" % name)
    member.uid, member.gid, member.uname, member.gname = os.geteuid(), os.getegid(), "", ""
    return member


def _extract_checked(archive, data_dir):
    """Extract a streamed archive member by member, each checked first (see _checked_member)."""
    for member in archive:
        archive.extract(_checked_member(member, data_dir), data_dir)


def unpack_base(keys, plan, data_dir, log):
    """Stream the verified base tarball into ``data_dir`` (safe members only)."""
    stream = keys.open(plan.base, _payload(plan.base, BASE_PAYLOAD))
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                if hasattr(tarfile, "data_filter"):
                    archive.extractall(data_dir, filter="data")
                else:
                    _extract_checked(archive, data_dir)
        except (tarfile.TarError, OSError) as exc:
            stream.finish()  # a damaged object explains a damaged tar best
            raise IntegrityError("base backup %s: its tarball does not unpack: %s" % (plan.base.id, exc)) from None
        while stream.read(CHUNK):  # tar's trailing zero blocks
            pass
        stream.finish()
    except IntegrityError as exc:
        raise IntegrityError("base backup %s failed verification: %s" % (plan.base.id, exc)) from None
    finally:
        stream.close()
    log("verified and unpacked base backup %s (%d bytes)" % (plan.base.id, stream.plain_bytes))
    return stream.plain_bytes


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _account(run_as):
    """The pwd entry postgres runs as: ``run_as``, else None when we are not root, else ``postgres``."""
    if run_as:
        try:
            return pwd.getpwnam(run_as)
        except KeyError:
            raise ConfigError("run_as: no account named %s" % run_as) from None
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError("PostgreSQL does not run as root and there is no postgres account: give run_as") from None


def _check_reachable(path, account, what="scratch directory", advice="choose a scratch_dir it can reach"):
    """ConfigError unless ``account`` may traverse every directory above ``path``."""
    path = os.path.abspath(path)
    parent = path
    while True:
        info = os.stat(parent)
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid == account.pw_gid:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            raise ConfigError("%s %s: the account %s that runs the private PostgreSQL cannot enter %s; %s"
                              % (what, path, account.pw_name, parent, advice))
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _chown_tree(path, account):
    os.chown(path, account.pw_uid, account.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)


@dataclass
class PrivateServer:
    """A postgres on a recovered data directory, reachable only through a socket in ``scratch``."""

    bin_dir: str
    scratch: str
    data_dir: str
    wal_dir: str
    account: object
    target_time: object
    timeline: int
    restore_point: Optional[str] = None

    def __post_init__(self):
        self.socket_dir = os.path.join(self.scratch, "sock")
        self._temporary_socket_dir = False  # see prepare()
        self.log_path = os.path.join(self.scratch, "postgres.log")
        self.port = _free_port()
        self.proc = None
        self.user = None
        self.logged_last_commit = None  # the last commit a recovery stopped short logged

    def argv(self, with_target=True):
        hba = os.path.join(self.scratch, "pg_hba.conf")
        settings = {
            "listen_addresses": "", "port": str(self.port), "unix_socket_directories": self.socket_dir,
            "hba_file": hba, "ident_file": os.path.join(self.scratch, "pg_ident.conf"),
            "archive_mode": "off", "hot_standby": "off", "ssl": "off", "primary_conninfo": "",
            "primary_slot_name": "", "logging_collector": "off", "log_destination": "stderr",
            # The engine reads the log: its messages untranslated, its times in UTC.
            "lc_messages": "C", "log_timezone": "UTC", "timezone": "UTC",
            "restore_command": 'cp "%s/%%f" "%%p"' % self.wal_dir,
            "recovery_target_timeline": str(self.timeline), "recovery_target_action": "promote",
            "shared_preload_libraries": "",
        }
        if with_target and self.restore_point is not None:
            settings["recovery_target_name"] = self.restore_point
        elif with_target and self.target_time is not None:
            settings["recovery_target_time"] = to_iso_precise(self.target_time).replace("T", " ").replace("Z", "+00")
            settings["recovery_target_inclusive"] = "on"
        argv = [os.path.join(self.bin_dir, "postgres"), "-D", self.data_dir]
        for key, value in settings.items():
            argv.extend(["-c", "%s=%s" % (key, value)])
        return argv

    def prepare(self):
        # A scratch directory on a volume can make the socket's path too long to listen on.
        self.socket_dir, self._temporary_socket_dir = procutil.socket_directory(
            os.path.join(self.scratch, "sock"), ".s.PGSQL.%d" % self.port)
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)
        if self.account is not None and self._temporary_socket_dir:
            # The new directory itself becomes the account's below; the ones above it must let it in.
            _check_reachable(os.path.dirname(self.socket_dir), self.account, "temp directory",
                             "set TMPDIR to a directory it can reach, or choose a shorter scratch_dir")
            _chown_tree(self.socket_dir, self.account)
        with open(os.path.join(self.scratch, "pg_hba.conf"), "w", encoding="utf-8") as hba:
            hba.write("local all all trust\n")
        open(os.path.join(self.scratch, "pg_ident.conf"), "w", encoding="utf-8").close()
        for leftover in ("postmaster.pid", "postmaster.opts"):
            path = os.path.join(self.data_dir, leftover)
            if os.path.exists(path):
                os.remove(path)
        with open(os.path.join(self.data_dir, "recovery.signal"), "w", encoding="utf-8"):
            pass
        os.chmod(self.data_dir, 0o700)
        if self.account is not None:
            os.chmod(self.scratch, 0o700)
            _chown_tree(self.scratch, self.account)

    def start(self, with_target=True):
        log = open(self.log_path, "ab")  # pylint: disable=consider-using-with  # closed by stop()
        kwargs = {}
        if self.account is not None:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = procutil.tool_env({"TZ": "UTC", "LC_ALL": "C.UTF-8"}, drop=("PGHOST", "PGPORT", "PGDATA"))
        try:
            self.proc = subprocess.Popen(self.argv(with_target), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.scratch, **kwargs)
        finally:
            log.close()

    def log_text(self):
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def log_tail(self, lines=8):
        return "; ".join(line for line in self.log_text().splitlines()[-lines:] if line.strip())

    def connect(self, database="postgres"):
        return psycopg.connect(host=self.socket_dir, port=self.port, user=self.user, dbname=database,
                               autocommit=True, connect_timeout=5)

    def wait_promoted(self, timeout):
        """True once promoted; False when postgres exited (the caller reads the log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with self.connect() as conn:
                    if not conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()[0]:
                        return True
            except psycopg.OperationalError:
                pass
            time.sleep(0.3)
        raise SourceError("the private PostgreSQL did not finish recovery within %d seconds (log: %s)"
                          % (timeout, self.log_tail()))

    def stop(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(2)  # SIGINT: fast shutdown, a clean checkpoint
                try:
                    self.proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if self._temporary_socket_dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
                self._temporary_socket_dir = False


class _DumpStream:
    """pg_dump of the private server, shaped like a PlaintextStream for PostgresTarget."""

    def __init__(self, argv, env):
        self._stream = procutil.ToolStream(argv, env=env, what="pg_dump (recovered server)")
        self.plain_bytes = 0

    def read(self, size=CHUNK):
        data = self._stream.read(size)
        self.plain_bytes += len(data)
        return data

    def finish(self):
        return {"plain_bytes": self.plain_bytes}

    def close(self):
        self._stream.close()


def restore_point_in_time(storage, job, point_in_time=None, identity=None, passphrase=None, wal_job=None,
                          target=None, database=None, data_dir=None, scratch_dir=None, bin_dir=None,
                          run_as=None, user="postgres", timeout=3600, check_mode=False, log=None,
                          restore_point=None):
    """Restore ``job``'s PostgreSQL to ``point_in_time`` (ISO-8601 or ``latest``), or to the named
    ``restore_point`` (``pg_create_restore_point``; ``point_in_time`` is then an upper bound).

    Deliver either ``database`` of the recovered cluster into ``target`` (a PostgresTarget)
    or the whole recovered data directory at ``data_dir`` (which must not exist). Returns a
    report with the plan, the LSN and commit time recovered to, and the target's checks.
    """
    log = log or (lambda message: None)
    if (target is None) == (data_dir is None):
        raise ConfigError("point-in-time restore: give a target (with database) or data_dir, exactly one")
    if target is not None and not database:
        raise ConfigError("point-in-time restore: name the database to copy out of the recovered cluster")
    if target is not None and getattr(target, "jobs", 1) != 1:
        # The database is copied from the private server as a pg_dump stream of unknown size:
        # there is nothing to size a spool by, and no gain from one.
        raise ConfigError("point-in-time restore: target.jobs is for restores of postgres backups; a point-in-time "
                          "restore copies the recovered database as a stream (leave jobs at 1)")
    if data_dir is not None and os.path.exists(data_dir):
        raise ConfigError("point-in-time restore: data_dir %s exists; give a path that does not" % data_dir)
    require_psycopg("point-in-time restores")
    bin_dir = bin_dir or os.path.dirname(procutil.find_tool("postgres"))
    procutil.find_tool("postgres", bin_dir)
    account = _account(run_as)
    plan = plan_restore(storage, job, point_in_time, wal_job, restore_point=restore_point)
    report = {"kind": BASE_KIND, "job": job, "plan": plan.describe(), "changed": False}
    # What the target is told it restores: the recovered server's dump of ``database`` (built
    # here, not by mf.build: it is never stored and has no times or sizes).
    synthetic = mf.Manifest({"id": "pitr-" + plan.base.id, "kind": "postgres", "objects": [{"payload": DUMP_PAYLOAD}],
                             "tool_versions": {"pg_dump": plan.base.stats.get("server_version", "0")},
                             "stats": {"database": database}})
    if target is not None:
        target.preflight(synthetic)
    if check_mode:
        report["check_mode"] = True
        if target is not None:
            report["target"] = target.plan(synthetic)
        return report
    keys = Keys(storage, identity, passphrase)
    if account is not None:
        _check_reachable(scratch_dir or tempfile.gettempdir(), account)
    scratch = tempfile.mkdtemp(prefix="pitr-", dir=scratch_dir)
    server = None
    try:
        wal_dir = os.path.join(scratch, "wal")
        pgdata = os.path.join(scratch, "data")
        report["wal_bytes"] = stage_wal(keys, plan, wal_dir, log)
        report["base_bytes"] = unpack_base(keys, plan, pgdata, log)
        stats = plan.base.stats
        server = PrivateServer(bin_dir, scratch, pgdata, wal_dir, account, plan.target_time, int(stats["timeline"]),
                               restore_point=restore_point)
        server.user = user
        server.prepare()
        started = time.monotonic()
        report["target_reached"] = ((plan.target_time is not None or restore_point is not None)
                                    and not plan.no_commit_after_target)
        if plan.no_commit_after_target:
            log("no transaction ended after the target in the stored WAL: recovering to its end (the same state)")
        server.start(with_target=report["target_reached"])
        if not server.wait_promoted(timeout):
            _recover_after_a_missed_target(server, plan, report, timeout, log)
        report["recovery_seconds"] = round(time.monotonic() - started, 3)
        report["recovered_to"] = _recovered_to(server)
        recovered = report["recovered_to"]
        log("recovered to LSN %s, last commit %s" % (recovered["lsn"], recovered["last_commit_time"]))
        if (restore_point is not None and plan.target_time is not None and recovered["last_commit_time"]
                and parse_iso(recovered["last_commit_time"]) > plan.target_time):
            # Nothing was copied yet: the private server is dropped with the scratch directory.
            raise NotFoundError("restore point %r as recovered holds a commit of %s, after point_in_time %s: the "
                                "name was created again after the bound (give an earlier bound, or a unique name)"
                                % (restore_point, recovered["last_commit_time"], to_iso_precise(plan.target_time)))
        if target is not None:
            report["target"] = _copy_database(server, target, synthetic, database, bin_dir)
        else:
            server.stop()
            shutil.move(pgdata, data_dir)
            report["data_dir"] = data_dir
        report["changed"] = True
        return report
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _recover_after_a_missed_target(server, plan, report, timeout, log):
    """The private server stopped before it promoted: recover to the end of the stored WAL when
    that is the target's state, else raise the error that says why it stopped.

    WAL stored without commit times (no pg_waldump) does not tell the planner that no
    transaction ended after the target, so PostgreSQL is given the target and stops with "recovery
    ended before configured recovery target was reached" when none did. It replayed every stored
    file up to the newest without meeting a transaction end after the target; when that WAL is
    known to hold every commit up to the target or later (``stored_until``), nothing committed
    between the target and the end of it, and the end of it is the state at the target. The
    stopped server is started again without a target: it resumes the recovery from its last
    restartpoint, replays to the end and promotes.
    """
    missed = _NOT_REACHED in server.log_text()
    if missed and plan.restore_point is not None:
        raise NotFoundError("recovery from base backup %s replayed the stored WAL without meeting restore "
                            "point %r: it was not created after that base backup (%s)"
                            % (plan.base.id, plan.restore_point, server.log_tail(3)))
    if not missed:
        raise SourceError("the private PostgreSQL stopped during recovery: %s" % server.log_tail())
    if not plan.times_unknown:
        raise IntegrityError("recovery ended before the target %s was reached: the stored WAL is "
                             "incomplete (%s)" % (plan.describe()["target_time"], server.log_tail(3)))
    if not plan.covers_target():
        raise _beyond_stored_wal(plan.wal_job, plan.stored_until, plan.target_time)
    log("no transaction ended after the target in the stored WAL (stored without commit times, up to %s): "
        "recovering to its end (the same state)" % plan.stored_until)
    plan.no_commit_after_target = True
    report["plan"] = plan.describe()
    report["target_reached"] = False
    # The second start resumes from the last restartpoint and may replay no commit at all: keep
    # the last one the first start logged (PostgreSQL logs it just before that FATAL).
    logged = _LAST_COMMIT_RE.findall(server.log_text())
    server.logged_last_commit = pg_log_time(logged[-1]) if logged else None
    server.start(with_target=False)
    if not server.wait_promoted(timeout):
        raise SourceError("the private PostgreSQL stopped during recovery: %s" % server.log_tail())


def pg_log_time(text):
    """A time as PostgreSQL writes it in its log (``2026-01-02 03:04:05.123456+00``) as a
    datetime; None if unreadable."""
    value = (text or "").strip().replace(" ", "T", 1)
    if value[-3:-2] in ("+", "-") and value[-2:].isdigit():
        value += ":00"
    try:
        return parse_iso(value)
    except ValueError:
        return None


def _recovered_to(server):
    with server.connect() as conn:
        lsn, commit = conn.execute("SELECT pg_catalog.pg_last_wal_replay_lsn()::text, "
                                   "pg_catalog.pg_last_xact_replay_timestamp()").fetchone()
    commit = commit or server.logged_last_commit
    result = {"lsn": lsn, "last_commit_time": to_iso_precise(commit) if commit else None,
              "stopped": None}
    match = None
    for match in _STOP_RE.finditer(server.log_text()):
        pass
    if match is not None:
        result["stopped"] = {"where": match.group(1), "xid": int(match.group(2)), "commit_time": match.group(3).strip()}
    return result


def _copy_database(server, target, synthetic, database, bin_dir):
    with server.connect(database) as conn:
        tables = count_rows(conn)
    synthetic = synthetic.with_fields(stats=dict(synthetic.stats, tables=tables))
    env = procutil.tool_env({"PGHOST": server.socket_dir, "PGPORT": server.port, "PGUSER": server.user,
                             "PGDATABASE": database}, drop=("PGPASSWORD", "PGSERVICE", "PGSERVICEFILE"))
    argv = [os.path.join(bin_dir, "pg_dump"), "--format=custom", "--compress=0", "--no-password"]

    def open_payload(manifest, name):
        if name != DUMP_PAYLOAD:
            raise NotFoundError("a point-in-time restore copies one database; %s is not available" % name)
        return _DumpStream(argv, env)

    context = RestoreContext(synthetic, [synthetic], open_payload)
    return target.restore(context)
