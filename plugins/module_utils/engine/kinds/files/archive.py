"""The ``files`` format: tree walk, index, checksum list and pax tar writer, written by the
files source and read by the files, directory_sync and config_git targets.

Payloads of one ``files`` backup, full or incremental (see docs/formats.md, section files):

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
chunks with no extra copies (the source hashes every file while it reads it). Hard links are
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

from ...errors import IntegrityError, SourceError

TAR_PAYLOAD = "files.tar"
INDEX_PAYLOAD = "files.index"
SUMS_PAYLOAD = "files.sha256"
DELETED_PAYLOAD = "files.deleted"
INDEX_FORMAT = "biometrics.backup/files-index"
INDEX_VERSION = 1

BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 1 << 20

TYPE_FILE, TYPE_DIR, TYPE_SYMLINK = "file", "dir", "symlink"
TYPE_FIFO, TYPE_CHAR, TYPE_BLOCK = "fifo", "chardev", "blockdev"
_TAR_TYPES = {TYPE_FILE: tarfile.REGTYPE, TYPE_DIR: tarfile.DIRTYPE, TYPE_SYMLINK: tarfile.SYMTYPE,
              TYPE_FIFO: tarfile.FIFOTYPE, TYPE_CHAR: tarfile.CHRTYPE, TYPE_BLOCK: tarfile.BLKTYPE}
# What makes an entry "changed" for an incremental (GNU tar compares mtime/ctime/inode too).
_CHANGE_FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "ctime", "ino", "target", "rdev")


def sort_key(path):
    """Walk order: the byte strings of the path's components ('.' is the root, first)."""
    if path == ".":
        return ()
    return tuple(os.fsencode(part) for part in path.split("/"))


_TYPE_TESTS = ((stat.S_ISREG, TYPE_FILE), (stat.S_ISDIR, TYPE_DIR), (stat.S_ISLNK, TYPE_SYMLINK),
               (stat.S_ISFIFO, TYPE_FIFO), (stat.S_ISCHR, TYPE_CHAR), (stat.S_ISBLK, TYPE_BLOCK))


def file_type(mode):
    """The archive's type letter for a ``st_mode``; None for sockets and unknown kinds (not archived)."""
    return next((entry_type for is_type, entry_type in _TYPE_TESTS if is_type(mode)), None)


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


class TarWriter:
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


def entry_from_stat(rel, st, target=None):
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
