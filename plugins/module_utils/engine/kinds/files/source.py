"""``files`` source: walks the tree, streams the tar, the index and the checksums.

Full or incremental: an incremental merges the live walk with its parent's index (both in
walk order, see ``archive.py``) in one streaming pass and stores only what changed, plus
the paths that are gone. The payloads and their format are described in ``archive.py``.
"""

import hashlib
import os
import stat
import tempfile

from ...errors import ConfigError, IntegrityError, NotFoundError, SourceError
from ...pipeline import ProducerStream
from ...schema import Field, Schema
from ...timeutil import parse_iso, utc_now
from ..contract import Source
from .archive import (CHUNK, DELETED_PAYLOAD, INDEX_PAYLOAD, SUMS_PAYLOAD, TAR_PAYLOAD, TYPE_DIR, TYPE_FILE, TYPE_SYMLINK,
                      TarWriter, TreeSummary, changed, copy_to_tempfile, entry_from_stat, file_type, index_header,
                      index_line, read_index, sort_key, sums_line, walk)


MAX_LISTED = 100  # paths listed in stats for warnings (the counts are always complete)


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
            latest = context.latest()
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
            self.full_reason = "latest backup %s has no file index" % latest.id
            return None
        except IntegrityError as exc:
            if latest.encryption_mode == "age" and context.stored_intact(latest, INDEX_PAYLOAD):
                raise ConfigError(
                    "incremental backup of job %s must read the file index of %s, which does not decrypt "
                    "with the identity given (none, or the wrong one): give the job its age identity "
                    "(encryption.identity_file) or set incremental: false" % (context.job, latest.id)) from None
            self.full_reason = "parent %s is damaged (%s)" % (latest.id, exc)
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
        if latest.kind != self.kind:
            return "latest backup %s is of kind %s" % (latest.id, latest.kind)
        if not context.chains_onto(latest):
            # Only archive-format jobs chain (the restic format refuses incremental): a job moved
            # back from restic starts over with a full.
            return "latest backup %s is in the restic format" % latest.id
        if latest.source.get("path") != self.path:
            return "the source path changed since %s" % latest.id
        try:
            chain = context.chain(latest)
        except IntegrityError as exc:
            return "chain of %s is broken (%s)" % (latest.id, exc)
        if self.full_every and len(chain) - 1 >= self.full_every:
            return "full_every=%d reached" % self.full_every
        if self.full_every == 0 and not self.max_chain_age:
            return "full_every=0 without max_chain_age: every backup is a full"
        if self.max_chain_age is not None:
            age = (utc_now() - parse_iso(chain[0].started_at)).total_seconds()
            if age >= self.max_chain_age:
                return "chain base %s is older than max_chain_age" % chain[0].id
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
        root = context.storage_directory()
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
        archive = TarWriter(out)
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
            entry = entry_from_stat(rel, st, target)
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
