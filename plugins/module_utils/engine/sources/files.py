"""``files``: a directory tree as a POSIX (pax) tar, full or incremental.

Payloads of one backup (see docs/formats.md, section files):

``files.tar``
    pax tar of the tree (a full) or of what changed since the parent (an incremental).
``files.index``
    JSON lines describing the *whole* tree at backup time (type, mode, owner, size, mtime,
    ctime, inode, SHA-256 or link target), in walk order. The next incremental compares the
    live tree against it; restores verify against it.
``files.sha256``
    ``sha256sum`` listing of every regular file of the whole tree (relative paths), so that
    ``sha256sum -c`` works after a restore made with stock tools.
``files.deleted``
    incrementals only: NUL-terminated paths present in the parent but gone (or changed
    type) now; apply with ``xargs -0 rm -rf --`` *before* extracting that incremental's tar.

The tar is written here rather than by ``tarfile`` so that big files stream in 1 MiB
chunks with no extra copies, and every file is hashed while it is read. Hard links are
stored as independent copies (like ``rsync -a`` without ``-H``) so that every archive, and
every subpath of it, restores on its own.

Walk order is depth first with the entries of each directory sorted by their byte names,
i.e. the lexicographic order of the path's components. The index is written in that order,
which lets an incremental merge the live walk with its parent's index in one streaming pass.
"""

import fnmatch
import grp
import hashlib
import json
import os
import pwd
import stat
import tarfile
import tempfile

from .. import manifest as mf
from .. import resticstore
from ..errors import ConfigError, IntegrityError, NotFoundError, SourceError
from ..pipeline import ProducerStream
from ..schema import Field, Schema
from ..timeutil import parse_iso, utc_now
from .base import Source

TAR_PAYLOAD = "files.tar"
INDEX_PAYLOAD = "files.index"
SUMS_PAYLOAD = "files.sha256"
DELETED_PAYLOAD = "files.deleted"
INDEX_FORMAT = "biometrics.backup/files-index"
INDEX_VERSION = 1

BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 1 << 20
MAX_LISTED = 100  # paths listed in stats for warnings (the counts are always complete)

TYPE_FILE, TYPE_DIR, TYPE_SYMLINK = "file", "dir", "symlink"
TYPE_FIFO, TYPE_CHAR, TYPE_BLOCK = "fifo", "chardev", "blockdev"
_TAR_TYPES = {TYPE_FILE: tarfile.REGTYPE, TYPE_DIR: tarfile.DIRTYPE, TYPE_SYMLINK: tarfile.SYMTYPE,
              TYPE_FIFO: tarfile.FIFOTYPE, TYPE_CHAR: tarfile.CHRTYPE, TYPE_BLOCK: tarfile.BLKTYPE}
# What makes an entry "changed" for an incremental (GNU tar compares mtime/ctime/inode too).
_CHANGE_FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "ctime", "ino", "target", "rdev")


# -- helpers shared with targets/files.py --------------------------------------------------
def sort_key(path):
    """Walk order: the byte strings of the path's components ('.' is the root, first)."""
    if path == ".":
        return ()
    return tuple(os.fsencode(part) for part in path.split("/"))


def file_type(mode):
    if stat.S_ISREG(mode):
        return TYPE_FILE
    if stat.S_ISDIR(mode):
        return TYPE_DIR
    if stat.S_ISLNK(mode):
        return TYPE_SYMLINK
    if stat.S_ISFIFO(mode):
        return TYPE_FIFO
    if stat.S_ISCHR(mode):
        return TYPE_CHAR
    if stat.S_ISBLK(mode):
        return TYPE_BLOCK
    return None  # sockets and unknown kinds are not archived


def walk(root, exclude=(), one_file_system=False, skip=None):
    """Yield ``(relative_path, lstat)`` depth first, children sorted by byte name.

    The root itself comes first as ``'.'``. Entries that vanish while walking are skipped.
    ``skip`` is a set of ``(st_dev, st_ino)`` directories not to enter or list (e.g. the
    backup storage when it sits inside the tree).
    """
    root_stat = os.lstat(root)
    yield ".", root_stat

    def listing(directory):
        try:
            with os.scandir(directory) as entries:
                return sorted(entries, key=lambda e: os.fsencode(e.name))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SourceError("cannot list directory %s: %s" % (directory, exc.strerror)) from None

    stack = [("", root, iter(listing(root)))]
    while stack:
        prefix, directory, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        rel = prefix + entry.name
        if excluded(rel, exclude):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SourceError("cannot stat %s: %s" % (entry.path, exc.strerror)) from None
        if skip and (st.st_dev, st.st_ino) in skip:
            continue
        yield rel, st
        if stat.S_ISDIR(st.st_mode) and not (one_file_system and st.st_dev != root_stat.st_dev):
            stack.append((rel + "/", entry.path, iter(listing(entry.path))))


def excluded(rel, patterns):
    """A pattern with a '/' matches the relative path, one without matches any path component."""
    if not patterns:
        return False
    base = rel.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(rel, pattern.strip("/")):
                return True
        elif fnmatch.fnmatchcase(base, pattern.strip("/")):
            return True
    return False


def tree_record(entry):
    """The bytes an entry contributes to ``tree_sha256`` (content and shape, not times or owners)."""
    if entry["type"] == TYPE_FILE:
        content = entry["sha256"]
    elif entry["type"] == TYPE_SYMLINK:
        content = entry["target"]
    elif entry["type"] in (TYPE_CHAR, TYPE_BLOCK):
        content = "%d,%d" % tuple(entry["rdev"])
    else:
        content = ""
    return b"\0".join((entry["type"].encode("ascii"), os.fsencode(entry["path"]),
                       ("%o" % entry["mode"]).encode("ascii"), str(entry.get("size", 0)).encode("ascii"),
                       os.fsencode(content))) + b"\n"


class TreeSummary:
    """Counts and the tree digest of a set of index entries (the root '.' excluded)."""

    def __init__(self):
        self.files = self.directories = self.symlinks = self.other = self.bytes = 0
        self._digest = hashlib.sha256()

    def add(self, entry):
        if entry["path"] == ".":
            return
        kind = entry["type"]
        if kind == TYPE_FILE:
            self.files += 1
            self.bytes += entry["size"]
        elif kind == TYPE_DIR:
            self.directories += 1
        elif kind == TYPE_SYMLINK:
            self.symlinks += 1
        else:
            self.other += 1
        self._digest.update(tree_record(entry))

    @property
    def tree_sha256(self):
        return self._digest.hexdigest()

    def as_dict(self):
        return {"files": self.files, "directories": self.directories, "symlinks": self.symlinks,
                "other": self.other, "bytes": self.bytes, "tree_sha256": self.tree_sha256}


def sums_line(entry):
    """One ``sha256sum`` line (GNU coreutils escaping for backslash, newline and CR)."""
    name = os.fsencode(entry["path"])
    if any(ch in name for ch in (b"\\", b"\n", b"\r")):
        name = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + entry["sha256"].encode("ascii") + b"  " + name + b"\n"
    return entry["sha256"].encode("ascii") + b"  " + name + b"\n"


def index_header():
    return (json.dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION}, sort_keys=True) + "\n").encode("ascii")


def index_line(entry):
    # ensure_ascii keeps non-UTF-8 names (surrogate escapes) round-tripping exactly.
    return (json.dumps(entry, sort_keys=True, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def read_index(readable, where="files.index"):
    """Yield the entries of an index stream (its header checked), in walk order."""
    lines = split_stream(readable, b"\n")
    try:
        header = json.loads(next(lines).decode("ascii"))
    except (StopIteration, ValueError, UnicodeDecodeError):
        raise IntegrityError("%s is not a files index" % where) from None
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise IntegrityError("%s is not a files index" % where)
    if header.get("version") != INDEX_VERSION:
        raise IntegrityError("%s has index version %r; this engine reads %d"
                             % (where, header.get("version"), INDEX_VERSION))
    for line in lines:
        try:
            entry = json.loads(line.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError("%s holds a malformed line" % where) from None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or "type" not in entry:
            raise IntegrityError("%s holds a malformed entry" % where)
        yield entry


def read_deleted(readable):
    """Yield the paths of a ``files.deleted`` stream (NUL-terminated)."""
    for raw in split_stream(readable, b"\0"):
        yield os.fsdecode(raw)


def split_stream(readable, separator):
    """Yield the ``separator``-terminated records of a stream (bounded by the longest record)."""
    pending = b""
    while True:
        chunk = readable.read(CHUNK)
        if not chunk:
            break
        pending += chunk
        parts = pending.split(separator)
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def copy_to_tempfile(readable, directory=None):
    """Spool a stream to an anonymous temporary file (rewound), in chunks."""
    spool = tempfile.TemporaryFile(dir=directory)
    try:
        while True:
            chunk = readable.read(CHUNK)
            if not chunk:
                break
            spool.write(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


def mtime_ns_of(member):
    """Exact mtime of a tar member in nanoseconds (the pax header keeps the digits)."""
    text = member.pax_headers.get("mtime")
    if text:
        whole, frac = text.partition(".")[::2]
        if whole.lstrip("-").isdigit() and (not frac or frac.isdigit()) and not whole.startswith("-"):
            return int(whole) * 10 ** 9 + int((frac + "000000000")[:9])
    return int(member.mtime) * 10 ** 9


# -- tar writing ---------------------------------------------------------------------------
_NAMES = {}


def _user(uid, table=pwd.getpwuid, field="pw_name"):
    key = (field, uid)
    if key not in _NAMES:
        try:
            _NAMES[key] = getattr(table(uid), field)
        except (KeyError, OverflowError):
            _NAMES[key] = ""
    return _NAMES[key]


def _group(gid):
    return _user(gid, grp.getgrgid, "gr_name")


def tar_header(entry):
    """The pax header block(s) of an index entry (content, if any, follows)."""
    info = tarfile.TarInfo(entry["path"])
    info.type = _TAR_TYPES[entry["type"]]
    info.mode = entry["mode"]
    info.uid, info.gid = entry["uid"], entry["gid"]
    info.uname, info.gname = entry.get("user", ""), entry.get("group", "")
    seconds, nanos = divmod(entry["mtime"], 10 ** 9)
    info.mtime = seconds
    if nanos and seconds >= 0:
        info.pax_headers["mtime"] = "%d.%09d" % (seconds, nanos)
    if entry["type"] == TYPE_FILE:
        info.size = entry["size"]
    elif entry["type"] == TYPE_SYMLINK:
        info.linkname = entry["target"]
    elif entry["type"] in (TYPE_CHAR, TYPE_BLOCK):
        info.devmajor, info.devminor = entry["rdev"]
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_end(written):
    """Two zero blocks, then padding to a whole 10 KiB record (as GNU tar writes)."""
    end = 2 * BLOCK
    total = written + end
    return b"\0" * (end + (-total) % RECORD)


class _Archive:
    """Writes tar blocks to ``out`` and counts them."""

    def __init__(self, out):
        self.out = out
        self.written = 0
        self.entries = 0
        self.content_bytes = 0

    def write(self, data):
        self.out.write(data)
        self.written += len(data)

    def add(self, entry, content=None):
        self.write(tar_header(entry))
        self.entries += 1
        if content is not None:
            content(self)
            self.content_bytes += entry["size"]
            pad = (-entry["size"]) % BLOCK
            if pad:
                self.write(b"\0" * pad)

    def close(self):
        self.write(tar_end(self.written))


def _entry_from_stat(rel, st, target=None):
    kind = file_type(st.st_mode)
    entry = {"path": rel, "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
             "gid": st.st_gid, "user": _user(st.st_uid), "group": _group(st.st_gid),
             "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns, "ino": st.st_ino,
             "size": st.st_size if kind == TYPE_FILE else 0}
    if kind == TYPE_SYMLINK:
        entry["target"] = target
    if kind in (TYPE_CHAR, TYPE_BLOCK):
        entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return entry


def changed(old, new):
    return any(old.get(field) != new.get(field) for field in _CHANGE_FIELDS)


class _ParentIndex:
    """Cursor over the parent's index (spooled locally), in walk order."""

    def __init__(self, spool):
        self._entries = read_index(spool, "the parent's files.index") if spool is not None else iter(())
        self.current = None
        self.key = None
        self.advance()

    def advance(self):
        self.current = next(self._entries, None)
        self.key = sort_key(self.current["path"]) if self.current is not None else None


def parse_age(value):
    """``max_chain_age``: seconds (int) or a duration like ``36h``, ``7d``, ``2w``."""
    if value in (None, "", 0):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    text = str(value).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if text.isdigit():
        return float(text)
    if len(text) > 1 and text[:-1].isdigit() and text[-1] in units:
        return float(int(text[:-1]) * units[text[-1]])
    raise ConfigError("source.max_chain_age %r is not a duration: use seconds or a number with "
                      "s, m, h, d or w (e.g. 36h, 7d)" % (value,))


class FilesSource(Source):
    """Options: ``path`` (absolute directory), ``exclude`` (glob list), ``one_file_system``,
    ``incremental`` (bool), ``full_every`` (incrementals between fulls, default 6),
    ``max_chain_age`` (e.g. ``7d``: start a new full when the chain's full is older),
    ``tmpdir`` (where the index is spooled while the tar streams)."""

    kind = "files"
    SCHEMA = Schema("source", {
        "path": Field("path", "directory to back up", absolute=True),
        "exclude": Field("list", "glob patterns of paths to leave out"),
        "one_file_system": Field("bool", "stay on the file system of path (default false)"),
        "incremental": Field("bool", "store only what changed since the previous backup of the chain (default false)"),
        "full_every": Field("int", "incrementals between two fulls (default 6; 0: only max_chain_age starts a full)",
                            minimum=0, maximum=100000),
        "max_chain_age": Field("any", "start a new full when the chain's full is older (seconds, or 36h, 7d, 2w)"),
        "tmpdir": Field("path", "where the index is spooled while the tar streams (default: system temp)"),
    })

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        path = options.get("path")
        if not path:
            raise ConfigError("source.path is required: the absolute directory to back up")
        self.path = os.path.normpath(path)
        exclude = options.get("exclude") or []
        if not all(p.strip("/") for p in exclude):
            raise ConfigError("source.exclude must be a list of non-empty glob patterns")
        self.exclude = list(exclude)
        self.one_file_system = options.get("one_file_system", False)
        self.incremental = options.get("incremental", False)
        self.full_every = options.get("full_every", 6)
        self.max_chain_age = parse_age(options.get("max_chain_age"))
        self.tmpdir = options.get("tmpdir")
        self._parent_spool = None
        self.full_reason = None
        self.chain_length = 1

    def describe(self):
        desc = {"path": self.path, "incremental": self.incremental}
        if self.exclude:
            desc["exclude"] = self.exclude
        if self.one_file_system:
            desc["one_file_system"] = True
        if self.incremental:
            desc["full_every"] = self.full_every
            if self.max_chain_age:
                desc["max_chain_age_seconds"] = int(self.max_chain_age)
        return desc

    def preflight(self):
        if not os.path.isdir(self.path):
            raise SourceError("files source %s is not a directory (or does not exist)" % self.path)
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise SourceError("files source %s is not readable" % self.path)

    def tool_versions(self):
        return {"tar_format": "pax"}

    # -- incremental chains ------------------------------------------------------------
    def wants_parent(self, context):
        """The job's latest backup when an incremental is due; None (a full) otherwise."""
        self.full_reason = None
        self.chain_length = 1
        if not self.incremental:
            return None
        try:
            latest = context.catalog.latest(context.job)
        except NotFoundError:
            self.full_reason = "first backup of the job"
            return None
        reason = self._full_due(context, latest)
        if reason:
            self.full_reason = reason
            return None
        # Read the parent's index now: it must be intact before anything is stored.
        try:
            self._parent_spool = self._fetch_index(context, latest)
        except NotFoundError:
            self.full_reason = "latest backup %s has no file index" % latest["id"]
            return None
        except IntegrityError as exc:
            if (latest.get("encryption") or {}).get("mode") == "age" and _stored_intact(context, latest):
                raise ConfigError(
                    "incremental backup of job %s must read the file index of %s, which does not decrypt "
                    "with the identity given (none, or the wrong one): give the job its age identity "
                    "(encryption.identity_file) or set incremental: false" % (context.job, latest["id"])) from None
            self.full_reason = "parent %s is damaged (%s)" % (latest["id"], exc)
            return None
        return latest

    def _fetch_index(self, context, manifest):
        stream = context.open_object(manifest, INDEX_PAYLOAD)
        try:
            spool = copy_to_tempfile(stream, self.tmpdir)
            try:
                stream.finish()
            except BaseException:
                spool.close()
                raise
            return spool
        finally:
            stream.close()

    def _full_due(self, context, latest):
        if latest.get("kind") != self.kind:
            return "latest backup %s is of kind %s" % (latest["id"], latest.get("kind"))
        if resticstore.is_restic(latest):
            # Only archive-format jobs chain (the restic format refuses incremental): a job moved
            # back from restic starts over with a full, so that a chain never needs the
            # repository password or mixes the two formats.
            return "latest backup %s is in the restic format" % latest["id"]
        if (latest.get("source") or {}).get("path") != self.path:
            return "the source path changed since %s" % latest["id"]
        try:
            chain = context.catalog.chain(latest)
        except IntegrityError as exc:
            return "chain of %s is broken (%s)" % (latest["id"], exc)
        if self.full_every and len(chain) - 1 >= self.full_every:
            return "full_every=%d reached" % self.full_every
        if self.full_every == 0 and not self.max_chain_age:
            return "full_every=0 without max_chain_age: every backup is a full"
        if self.max_chain_age is not None:
            age = (utc_now() - parse_iso(chain[0]["started_at"])).total_seconds()
            if age >= self.max_chain_age:
                return "chain base %s is older than max_chain_age" % chain[0]["id"]
        self.chain_length = len(chain) + 1
        return None

    # -- producing -----------------------------------------------------------------------
    def produce(self, emit, context):
        parent = context.parent
        spool, self._parent_spool = self._parent_spool, None
        if parent is not None and spool is None:
            raise SourceError("internal: parent %s selected but its index was not read" % parent["id"])
        index_out = tempfile.TemporaryFile(dir=self.tmpdir)
        sums_out = tempfile.TemporaryFile(dir=self.tmpdir)
        deleted_out = tempfile.TemporaryFile(dir=self.tmpdir) if parent is not None else None
        try:
            skip = self._storage_inside(context)
            state = {}

            def run(out):
                state.update(self._write(out, spool, index_out, sums_out, deleted_out, skip))

            stream = ProducerStream(run, "files-tar")
            try:
                emit(TAR_PAYLOAD, stream)
            finally:
                stream.close()
            for name, spooled in ((INDEX_PAYLOAD, index_out), (SUMS_PAYLOAD, sums_out),
                                  (DELETED_PAYLOAD, deleted_out)):
                if spooled is not None:
                    spooled.seek(0)
                    emit(name, spooled)
        finally:
            for handle in (index_out, sums_out, deleted_out, spool):
                if handle is not None:
                    handle.close()
        stats = state["stats"]
        stats["type"] = "incremental" if parent is not None else "full"
        stats["chain_length"] = self.chain_length if parent is not None else 1
        if self.full_reason and parent is None:
            stats["full_reason"] = self.full_reason
        return stats

    def _storage_inside(self, context):
        """Never archive the backup storage itself when it lives inside the tree."""
        root = context.storage.local_directory()
        if not root:
            return set()
        real = os.path.realpath(root)
        if real == self.path or real.startswith(self.path.rstrip("/") + "/"):
            try:
                st = os.stat(real)
            except OSError:
                return set()
            return {(st.st_dev, st.st_ino)}
        return set()

    def _write(self, out, spool, index_out, sums_out, deleted_out, skip):
        archive = _Archive(out)
        parent = _ParentIndex(spool)
        summary = TreeSummary()
        pending_dirs = []  # [(entry, emitted)] ancestors of the current path, for incrementals
        counters = {"deleted": 0, "skipped": _Bucket(), "changed_while_read": _Bucket(), "vanished": _Bucket()}
        last_deleted_dir = [None]
        incremental = deleted_out is not None
        index_out.write(index_header())

        def record_deleted(old):
            path = old["path"]
            covered = last_deleted_dir[0]
            if covered is not None and path.startswith(covered + "/"):
                return
            if old["type"] == TYPE_DIR:
                last_deleted_dir[0] = path
            deleted_out.write(os.fsencode(path) + b"\0")
            counters["deleted"] += 1

        def emit_entry(entry, content=None):
            for index, (ancestor, emitted) in enumerate(pending_dirs):
                if not emitted:
                    archive.add(ancestor)
                    pending_dirs[index] = (ancestor, True)
            archive.add(entry, content)

        for rel, st in walk(self.path, self.exclude, self.one_file_system, skip):
            key = sort_key(rel)
            while parent.current is not None and parent.key < key:
                if incremental:
                    record_deleted(parent.current)
                parent.advance()
            old = None
            if parent.current is not None and parent.key == key:
                old = parent.current
                parent.advance()
            kind = file_type(st.st_mode)
            if kind is None:
                _note(counters["skipped"], rel)
                continue
            while pending_dirs and not rel.startswith(pending_dirs[-1][0]["path"] + "/"):
                pending_dirs.pop()
            abspath = os.path.join(self.path, rel) if rel != "." else self.path
            target = None
            if kind == TYPE_SYMLINK:
                try:
                    target = os.readlink(abspath)
                except FileNotFoundError:
                    _note(counters["vanished"], rel)
                    continue
            entry = _entry_from_stat(rel, st, target)
            if old is not None and old["type"] != kind and incremental:
                record_deleted(old)
                old = None
            if rel == ".":
                index_out.write(index_line(entry))
                continue
            is_new = old is None or changed(old, entry)
            if kind == TYPE_FILE:
                if is_new or not incremental or not old.get("sha256"):
                    if not self._add_file(abspath, rel, entry, emit_entry, counters):
                        continue
                else:
                    entry["sha256"] = old["sha256"]
                sums_out.write(sums_line(entry))
            elif is_new or not incremental:
                emit_entry(entry)
            if kind == TYPE_DIR:
                pending_dirs.append((entry, is_new or not incremental))
            summary.add(entry)
            index_out.write(index_line(entry))
        while parent.current is not None:
            if incremental:
                record_deleted(parent.current)
            parent.advance()
        archive.close()
        stats = summary.as_dict()
        stats.update({
            "archive_entries": archive.entries, "archive_bytes": archive.content_bytes,
            "deleted": counters["deleted"],
        })
        for name in ("skipped", "vanished", "changed_while_read"):
            stats[name] = counters[name].count
            if counters[name].count:
                stats["%s_paths" % name] = counters[name].paths
        return {"stats": stats}

    @staticmethod
    def _add_file(abspath, rel, entry, emit_entry, counters):
        """Archive one regular file, hashing it; False when it vanished meanwhile."""
        try:
            fd = os.open(abspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            _note(counters["vanished"], rel)
            return False
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", -1):
                _note(counters["vanished"], rel)  # replaced by a symlink since it was listed
                return False
            raise SourceError("cannot read %s: %s" % (abspath, exc.strerror)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                _note(counters["vanished"], rel)
                return False
            # What we read is what we describe: take size and times from the open file.
            entry.update(size=st.st_size, mtime=st.st_mtime_ns, ctime=st.st_ctime_ns, ino=st.st_ino,
                         mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
            digest = hashlib.sha256()
            size = st.st_size

            def content(archive):
                remaining = size
                short = False
                while remaining:
                    data = os.read(fd, min(CHUNK, remaining)) if not short else b""
                    if not data:
                        short = True  # the file shrank while we read it: pad, and say so
                        data = b"\0" * min(CHUNK, remaining)
                    digest.update(data)
                    archive.write(data)
                    remaining -= len(data)
                if short or os.read(fd, 1) or _moved(fd, st):
                    _note(counters["changed_while_read"], rel)

            try:
                emit_entry(entry, content)
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                raise SourceError("reading %s failed: %s" % (abspath, exc.strerror)) from None
            entry["sha256"] = digest.hexdigest()
            return True
        finally:
            os.close(fd)


def _stored_intact(context, manifest):
    """Whether the stored bytes of the manifest's index match its SHA-256 (no key needed)."""
    for obj in manifest["objects"]:
        if obj.get("payload") == INDEX_PAYLOAD:
            digest = hashlib.sha256()
            try:
                reader = context.storage.open_reader(mf.object_key(manifest["job"], manifest["id"], obj["name"]))
            except NotFoundError:
                return False
            try:
                while True:
                    chunk = reader.read(CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
            finally:
                reader.close()
            return digest.hexdigest() == obj["sha256"]
    return False


def _moved(fd, before):
    after = os.fstat(fd)
    return after.st_mtime_ns != before.st_mtime_ns or after.st_size != before.st_size


class _Bucket:
    """A complete count and the first MAX_LISTED paths of one kind of warning."""

    def __init__(self):
        self.count = 0
        self.paths = []


def _note(bucket, path):
    bucket.count += 1
    if len(bucket.paths) < MAX_LISTED:
        bucket.paths.append(path)
