"""Restore a ``files`` backup (a full, or a full plus its incrementals) into a directory.

The tree is rebuilt in a staging directory next to the destination (inside it when the
destination is a mount point, where a rename cannot cross), verified against the backup's
``files.index`` — every entry's type, mode, size, SHA-256, link target and mtime, plus
ownership when running as root — and against the manifest's ``stats`` (file count, bytes,
tree digest), and only then moved into place. A failed check removes the staging
directory and leaves the destination exactly as it was.

Chains are applied oldest first: for each incremental, its ``files.deleted`` paths are
removed, then its tar is extracted. Directory attributes are applied last (children first),
so read-only directories restore too.

One pass (``one_pass_payloads``): the target declares every payload it reads — the last
backup's ``files.index`` and ``files.sha256``, each backup's ``files.tar`` and each
incremental's ``files.deleted``. Each stream is read to its end and finished (size and
SHA-256 checked) before the next step, all of them before ``move_into_place``; until then
only the staging directory (and the spooled index) is written, and any exception removes
the staging directory. So a damaged backup never reaches the destination, ``overwrite``
included: the destination is replaced only by the swap.
"""

import contextlib
import errno
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile

from ...errors import ConfigError, IntegrityError
from ...manifest import Manifest
from ...schema import Field, Schema, parse_bool
from . import archive as fmt
from ..contract import Target

CHUNK = 1 << 20
MAX_EXAMPLES = 10
_SPECIAL = (fmt.TYPE_CHAR, fmt.TYPE_BLOCK)


def normalize_subpath(subpath):
    """``a/b`` from ``/a/b/`` or ``./a//b``; '' for the whole tree. Refuses '..'."""
    if subpath in (None, "", ".", "/"):
        return ""
    if not isinstance(subpath, str):
        raise ConfigError("files target subpath must be a string")
    parts = [part for part in subpath.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise ConfigError("files target subpath %r must not contain '..'" % subpath)
    return "/".join(parts)


def selector(subpath):
    """Predicate: is a path part of the restore (the subtree, its ancestors and the root)?"""
    if not subpath:
        return lambda path: True
    prefix = subpath + "/"
    return lambda path: path == "." or path == subpath or path.startswith(prefix) or prefix.startswith(path + "/")


def safe_member_name(name):
    """A tar member name as a relative path; IntegrityError for absolute or '..' names."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or any(part == ".." for part in parts) or not parts:
        raise IntegrityError("the archive holds an unsafe entry name %r" % name)
    return "/".join(parts)


def force_rmtree(path):
    """Remove a tree even when restored directories are read-only."""
    def retry(function, failed, _exc_info):
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(OSError):
            if not os.path.islink(failed) and os.path.isdir(failed):
                os.chmod(failed, 0o700)
        function(failed)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=retry)


def _remove(path):
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        force_rmtree(path)
    else:
        os.unlink(path)


def _make_directory(path, replace):
    """Make ``path`` a directory (mode 0700 until its attributes are applied). Something else
    there (never followed) is replaced by one when ``replace``; else False is returned."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        return True
    if stat.S_ISDIR(info.st_mode):
        return True
    if not replace:
        return False
    os.unlink(path)
    os.mkdir(path, 0o700)
    return True


def _prefixes(path):
    """``a``, ``a/b``, ``a/b/c`` for ``a/b/c`` (nothing for '')."""
    parts = path.split("/") if path else []
    for end in range(1, len(parts) + 1):
        yield "/".join(parts[:end])


class _RawStream(io.RawIOBase):
    """io.RawIOBase over a payload stream so that tarfile's small reads are buffered."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Tree:
    """The staging directory: safe creation of entries below it."""

    def __init__(self, root, ownership):
        self.root = root
        self.ownership = ownership
        self.known_dirs = {""}

    def path(self, rel):
        return os.path.join(self.root, rel) if rel != "." else self.root

    def ensure_parent(self, rel):
        """Create missing parent directories; refuse to write through a symlink or a file."""
        parent = rel.rpartition("/")[0]
        if parent in self.known_dirs:
            return
        for current in _prefixes(parent):
            if current in self.known_dirs:
                continue
            if not _make_directory(os.path.join(self.root, current), replace=False):
                raise IntegrityError("archive entry %r would be written through %r, which is not a directory"
                                     % (rel, current))
            self.known_dirs.add(current)

    def forget(self):
        self.known_dirs = {""}

    def delete(self, rel):
        """Apply one ``files.deleted`` path (never following a symlink on the way)."""
        rel = safe_member_name(rel)
        for current in _prefixes(rel.rpartition("/")[0]):
            try:
                info = os.lstat(os.path.join(self.root, current))
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(info.st_mode):
                return  # not there as a directory: nothing of ours lives below it
        _remove(os.path.join(self.root, rel))

    def add(self, tar, member, rel):
        """Create one entry; directories get their attributes later (see finalize_dir)."""
        self.ensure_parent(rel)
        full = os.path.join(self.root, rel)
        if member.isdir():
            _make_directory(full, replace=True)
            self.known_dirs.add(rel)
            return
        if rel in self.known_dirs:
            self.forget()
        _remove(full)
        mtime = fmt.mtime_ns_of(member)
        if member.isreg():
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                source = tar.extractfile(member)
                remaining = member.size
                while remaining:
                    data = source.read(min(CHUNK, remaining))
                    if not data:
                        raise IntegrityError("the archive ends inside %r" % rel)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    remaining -= len(data)
                if self.ownership:
                    os.fchown(fd, member.uid, member.gid)
                os.fchmod(fd, member.mode & 0o7777)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
            return
        if member.issym():
            os.symlink(member.linkname, full)
        elif member.isfifo():
            os.mkfifo(full, 0o600)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        else:
            raise IntegrityError("the archive holds %r of an unsupported type %r" % (rel, member.type))
        if self.ownership:
            os.chown(full, member.uid, member.gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(full, member.mode & 0o7777)
        os.utime(full, ns=(mtime, mtime), follow_symlinks=False)

    def finalize_dir(self, entry, path=None):
        """Owner, mode and mtime of a directory whose children are all in place."""
        full = path or self.path(entry["path"])
        if self.ownership:
            os.chown(full, entry["uid"], entry["gid"], follow_symlinks=False)
        os.chmod(full, entry["mode"])
        os.utime(full, ns=(entry["mtime"], entry["mtime"]), follow_symlinks=False)


def destination_schema(**fields):
    """The ``target`` schema of a kind that restores into a directory: ``path`` and
    ``overwrite``, then the kind's own ``fields``."""
    return Schema("target", dict(
        path=Field("path", "destination directory", absolute=True),
        overwrite=Field("bool", "replace a non-empty destination (default false)"),
        **fields))


class DirectoryTarget(Target):
    """A target that restores into a directory (files, config_git, directory_sync): its
    ``path`` and ``overwrite`` options (:func:`destination_schema`) as a
    :class:`StagedDestination`. Its plan is computed in check mode too."""

    plans_in_check_mode = True

    def __init__(self, options):
        super().__init__(options)
        self.overwrite = self.options.get("overwrite", False)
        self.destination = StagedDestination(self.options.get("path"), self.overwrite, "target.path")
        self.path = self.destination.path

    @classmethod
    @contextlib.contextmanager
    def scratch(cls, manifest, options):
        """A throwaway destination for test restores; removed afterwards."""
        options = dict(options or {})
        base = tempfile.mkdtemp(prefix="%s-scratch-" % cls.kind.replace("_", "-"), dir=cls._scratch_parent(options))
        try:
            yield cls(dict(options, path=os.path.join(base, "restore"), overwrite=False))
        finally:
            force_rmtree(base)

    @classmethod
    def _scratch_parent(cls, options):
        """Where the scratch directory is made (None: the system's temporary directory)."""
        return None


class StagedDestination:
    """A restore destination that is only touched once the restored data is verified.

    ``make_staging()`` creates the staging directory next to the destination (inside it
    when the destination is a mount point, where a rename cannot cross filesystems);
    ``move_into_place()`` swaps it in. A non-empty destination is refused unless
    ``overwrite`` is set, and then replaced as a whole.
    """

    def __init__(self, path, overwrite, what="restore destination"):
        if not path or not isinstance(path, str) or not os.path.isabs(path):
            raise ConfigError("%s must be an absolute directory path, got %r" % (what, path))
        self.path = os.path.normpath(path)
        if self.path == "/":
            raise ConfigError("%s must not be / (restore into a directory below it)" % what)
        self.overwrite = overwrite
        self.what = what

    def stage_inside(self):
        return os.path.isdir(self.path) and not os.path.islink(self.path) and os.path.ismount(self.path)

    def existing_entries(self, ignore=()):
        """None when the destination does not exist, else its entries (lost+found of a volume ignored)."""
        if not os.path.lexists(self.path):
            return None
        if os.path.islink(self.path) or not os.path.isdir(self.path):
            raise ConfigError("%s %s exists and is not a directory" % (self.what, self.path))
        ignore = set(ignore) | ({"lost+found"} if self.stage_inside() else set())
        return sorted(name for name in os.listdir(self.path) if name not in ignore)

    def preflight(self, ignore=()):
        entries = self.existing_entries(ignore)
        if entries and not self.overwrite:
            raise ConfigError("%s %s is not empty (%d entries): set overwrite: true to replace it, or "
                              "choose an empty or new directory" % (self.what, self.path, len(entries)))
        probe = self.path if entries is not None else os.path.dirname(self.path)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError("%s %s: %s is not writable" % (self.what, self.path, probe))

    def make_staging(self):
        """``(staging directory, inside)``; ConfigError when it cannot be created."""
        try:
            if self.stage_inside():
                return tempfile.mkdtemp(prefix=".restore-", dir=self.path), True
            parent = os.path.dirname(self.path)
            os.makedirs(parent, exist_ok=True)
            return tempfile.mkdtemp(prefix=".%s.restore-" % os.path.basename(self.path), dir=parent), False
        except OSError as exc:
            raise ConfigError("cannot create a staging directory for %s: %s" % (self.path, exc.strerror)) from None

    def move_into_place(self, staging, inside, finalize_root=None):
        """Swap the verified staging tree in; ``finalize_root(path)`` sets the root's attributes."""
        self.preflight(ignore=[os.path.basename(staging)])  # it may have changed while we restored
        if inside:
            keep = {os.path.basename(staging), "lost+found"}
            if self.overwrite:
                for name in os.listdir(self.path):
                    if name not in keep:
                        _remove(os.path.join(self.path, name))
            for name in os.listdir(staging):
                os.rename(os.path.join(staging, name), os.path.join(self.path, name))
            os.rmdir(staging)
            if finalize_root is not None:
                finalize_root(self.path)
            return
        if finalize_root is not None:
            finalize_root(staging)
        if self.existing_entries():
            old = tempfile.mkdtemp(prefix=".%s.old-" % os.path.basename(self.path), dir=os.path.dirname(self.path))
            os.rmdir(old)
            os.rename(self.path, old)
            try:
                os.rename(staging, self.path)
            except OSError:
                os.rename(old, self.path)
                raise
            force_rmtree(old)
        else:
            os.rename(staging, self.path)  # replaces an empty directory, or creates the destination


class FilesTarget(DirectoryTarget):
    """Options: ``path`` (absolute destination directory), ``subpath`` (restore only this
    part of the tree, kept at its relative location), ``overwrite`` (replace a non-empty
    destination), ``ownership`` (``auto``: restore owners when running as root; ``true``;
    ``false``), ``tmpdir`` (where the index is spooled)."""

    kind = "files"
    SCHEMA = destination_schema(
        subpath=Field("str", "restore only this part of the tree, kept at its relative location", nonempty=True),
        ownership=Field("any", "restore owners: auto (when running as root; default), or a boolean"),
        tmpdir=Field("path", "where the index is spooled (default: system temp)"),
    )

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.subpath = normalize_subpath(options.get("subpath"))
        ownership = options.get("ownership", "auto")
        if ownership == "auto":
            ownership = os.geteuid() == 0
        else:
            ownership = parse_bool(ownership, "target.ownership (auto or a boolean)")
        self.ownership = ownership
        self.tmpdir = options.get("tmpdir")

    def describe(self):
        desc = {"path": self.path, "overwrite": self.overwrite}
        if self.subpath:
            desc["subpath"] = self.subpath
        return desc

    # -- restore -------------------------------------------------------------------------
    def one_pass_payloads(self, manifest, chain):
        """Every payload ``restore`` reads (see the module docstring): all finished before the swap."""
        backup_id = Manifest.wrap(manifest).id
        declared = {(backup_id, fmt.INDEX_PAYLOAD), (backup_id, fmt.SUMS_PAYLOAD)}
        for position, item in enumerate(chain):
            declared.add((Manifest.wrap(item).id, fmt.TAR_PAYLOAD))
            if position:
                declared.add((Manifest.wrap(item).id, fmt.DELETED_PAYLOAD))
        return declared

    def restore(self, context):
        chain = context.chain or [context.manifest]
        _check_chain(chain, context.manifest)
        final = chain[-1]
        selected = selector(self.subpath)
        with self._spooled_index(context, final) as index:
            expected, index_checks = self._expected(context, final, index, selected)
            if context.check_mode:
                return {"changed": True, "destination": self.path, "subpath": self.subpath or None,
                        "chain": [m.id for m in chain], "checks": index_checks,
                        "plan": "would restore %d files (%d bytes) into %s" % (expected.files, expected.bytes, self.path)}
            staging, inside = self.destination.make_staging()
            try:
                tree = _Tree(staging, self.ownership)
                for position, manifest in enumerate(chain):
                    if position:
                        self._apply_deleted(context, manifest, tree)
                    self._extract(context, manifest, tree, selected)
                index.seek(0)
                actual, root_entry, tree_checks = self._verify_tree(tree, index, selected)
                checks = index_checks + _count_checks(expected, actual) + tree_checks
                failed = [check for check in checks if not check["ok"]]
                if failed:
                    raise IntegrityError("restored tree of backup %s does not match it: %s" % (
                        final.id, "; ".join("%s: expected %s, got %s" % (c["what"], c["expected"], c["actual"])
                                            for c in failed[:5])))
                self.destination.move_into_place(staging, inside, _root_finalizer(tree, root_entry))
            except BaseException:
                force_rmtree(staging)
                raise
        return {"changed": True, "destination": self.path, "subpath": self.subpath or None,
                "chain": [m.id for m in chain], "files": actual.files, "bytes": actual.bytes,
                "directories": actual.directories, "symlinks": actual.symlinks,
                "ownership_restored": self.ownership, "checks": checks}

    @contextlib.contextmanager
    def _spooled_index(self, context, manifest):
        stream = context.open_payload(manifest, fmt.INDEX_PAYLOAD)
        try:
            spool = fmt.copy_to_tempfile(stream, self.tmpdir)
            stream.finish()
        finally:
            stream.close()
        try:
            yield spool
        finally:
            spool.close()

    def _expected(self, context, final, index, selected):
        """Summary of what the restore must produce, and the index's own consistency checks."""
        whole = fmt.TreeSummary()
        part = fmt.TreeSummary()
        checked = _SumsCheck(context, final)
        try:
            for entry in fmt.read_index(index):
                whole.add(entry)
                if entry["type"] == fmt.TYPE_FILE:
                    checked.expect(entry)
                if selected(entry["path"]) and self._restorable(entry):
                    part.add(entry)
            sums_check = checked.result()
        finally:
            checked.close()
        stats = final.stats
        checks = [{
            "what": "files.index agrees with the manifest stats (files, bytes, tree_sha256)",
            "expected": [stats.get("files"), stats.get("bytes"), stats.get("tree_sha256")],
            "actual": [whole.files, whole.bytes, whole.tree_sha256],
            "ok": [stats.get("files"), stats.get("bytes"), stats.get("tree_sha256")]
            == [whole.files, whole.bytes, whole.tree_sha256],
        }, sums_check]
        index.seek(0)
        return part, checks

    def _restorable(self, entry):
        return entry["type"] not in _SPECIAL or os.geteuid() == 0

    def _apply_deleted(self, context, manifest, tree):
        stream = context.open_payload(manifest, fmt.DELETED_PAYLOAD)
        try:
            for rel in fmt.read_deleted(stream):
                tree.delete(rel)
            stream.finish()
        finally:
            stream.close()
        tree.forget()

    def _extract(self, context, manifest, tree, selected):
        stream = context.open_payload(manifest, fmt.TAR_PAYLOAD)
        try:
            buffered = io.BufferedReader(_RawStream(stream), CHUNK)
            try:
                tar = tarfile.open(fileobj=buffered, mode="r|", encoding="utf-8", errors="surrogateescape")
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    tar.members = []  # stream mode keeps every member otherwise
                    rel = safe_member_name(member.name)
                    if not selected(rel) or ((member.ischr() or member.isblk()) and os.geteuid() != 0):
                        continue
                    tree.add(tar, member, rel)
            except tarfile.TarError as exc:
                raise IntegrityError("the tar of backup %s is damaged: %s" % (manifest.id, exc)) from None
            while buffered.read(CHUNK):
                pass
            stream.finish()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError("restoring into %s ran out of space" % self.path) from None
            raise
        finally:
            stream.close()

    def _verify_tree(self, tree, index, selected):
        """Walk the staging tree against the index; set directory attributes children first."""
        actual = fmt.TreeSummary()
        mismatches = _Problems()
        compared = 0
        dirs = []  # directories along the current path, finalized when the walk leaves them
        root_entry = None
        expected_iter = (e for e in fmt.read_index(index) if selected(e["path"]) and self._restorable(e))
        want = next(expected_iter, None)
        inside_root = tree.root

        def leave(upto):
            while dirs and (upto is None or not upto.startswith(dirs[-1]["path"] + "/")):
                entry = dirs.pop()
                if entry["path"] == ".":
                    continue  # the root is finalized where it ends up
                tree.finalize_dir(entry)
                _compare_attrs(entry, os.lstat(tree.path(entry["path"])), self.ownership, mismatches)

        for rel, info in fmt.walk(inside_root):
            key = fmt.sort_key(rel)
            while want is not None and fmt.sort_key(want["path"]) < key:
                mismatches.add(want["path"], "%s: missing" % want["path"])
                compared += 1
                want = next(expected_iter, None)
            if want is None or fmt.sort_key(want["path"]) != key:
                mismatches.add(rel, "%s: not in the backup" % rel)
                continue
            entry, want = want, next(expected_iter, None)
            compared += 1
            leave(rel)
            found = self._describe(tree, rel, info)
            if found is None or found["type"] != entry["type"]:
                mismatches.add(rel, "%s: is %s, expected %s" % (rel, found and found["type"], entry["type"]))
                continue
            if entry["type"] == fmt.TYPE_FILE and (found["size"] != entry["size"] or found["sha256"] != entry["sha256"]):
                mismatches.add(rel, "%s: content differs (size %d, expected %d)" % (rel, found["size"], entry["size"]))
            if entry["type"] == fmt.TYPE_SYMLINK and found["target"] != entry["target"]:
                mismatches.add(rel, "%s: link target differs" % rel)
            if entry["type"] in _SPECIAL and found.get("rdev") != entry.get("rdev"):
                mismatches.add(rel, "%s: device number differs" % rel)
            if entry["type"] == fmt.TYPE_DIR:
                # Its mode is set (and compared) when the walk leaves it: see leave().
                found["mode"] = entry["mode"]
                dirs.append(entry)
                if rel == ".":
                    root_entry = entry
            else:
                _compare_attrs(entry, info, self.ownership, mismatches)
            actual.add(found)
        while want is not None:
            mismatches.add(want["path"], "%s: missing" % want["path"])
            compared += 1
            want = next(expected_iter, None)
        leave(None)
        checks = [{"what": "entries matching files.index (type, content, link target, mode, mtime%s)"
                           % (", owner" if self.ownership else ""),
                   "expected": compared, "actual": compared - mismatches.paths,
                   "ok": not mismatches.paths}]
        if mismatches.paths:
            checks[0]["examples"] = mismatches.examples
        return actual, root_entry, checks

    @staticmethod
    def _describe(tree, rel, info):
        kind = fmt.file_type(info.st_mode)
        if kind is None:
            return None
        entry = {"path": rel, "type": kind, "mode": stat.S_IMODE(info.st_mode),
                 "size": info.st_size if kind == fmt.TYPE_FILE else 0}
        full = tree.path(rel)
        if kind == fmt.TYPE_FILE:
            entry["sha256"] = _sha256_file(full)
        elif kind == fmt.TYPE_SYMLINK:
            entry["target"] = os.readlink(full)
        elif kind in _SPECIAL:
            entry["rdev"] = [os.major(info.st_rdev), os.minor(info.st_rdev)]
        return entry

    @classmethod
    def _scratch_parent(cls, options):
        return options.get("tmpdir")


class _Problems:
    """Entries that differ: a count of distinct paths and the first few explanations."""

    def __init__(self):
        self.paths = 0
        self.examples = []
        self._last = None

    def add(self, path, text):
        if path != self._last:
            self.paths += 1
            self._last = path
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)


def _compare_attrs(entry, info, ownership, mismatches):
    ok = True
    if entry["type"] != fmt.TYPE_SYMLINK and stat.S_IMODE(info.st_mode) != entry["mode"]:
        mismatches.add(entry["path"], "%s: mode %o, expected %o" % (entry["path"], stat.S_IMODE(info.st_mode), entry["mode"]))
        ok = False
    if info.st_mtime_ns != entry["mtime"]:
        mismatches.add(entry["path"], "%s: mtime differs" % entry["path"])
        ok = False
    if ownership and (info.st_uid, info.st_gid) != (entry["uid"], entry["gid"]):
        mismatches.add(entry["path"], "%s: owner %d:%d, expected %d:%d" % (
            entry["path"], info.st_uid, info.st_gid, entry["uid"], entry["gid"]))
        ok = False
    return ok


def _sha256_file(path):
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            digest.update(data)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _count_checks(expected, actual):
    checks = []
    for what in ("files", "bytes", "directories", "symlinks", "tree_sha256"):
        want, got = getattr(expected, what), getattr(actual, what)
        checks.append({"what": what, "expected": want, "actual": got, "ok": want == got})
    return checks


def _root_finalizer(tree, root_entry):
    if root_entry is None:
        return None

    def finalize(path):
        tree.finalize_dir(root_entry, path)
    return finalize


def _check_chain(chain, manifest):
    """``chain`` (Manifests, oldest first) is a full backup and its incrementals, up to ``manifest``."""
    if chain[-1].id != manifest.id:
        raise IntegrityError("restore chain does not end with backup %s" % manifest.id)
    for position, item in enumerate(chain):
        if item.kind != "files":
            raise IntegrityError("backup %s in the chain is of kind %s" % (item.id, item.kind))
        kind = item.stats.get("type")
        if position == 0 and (item.parent or kind != "full"):
            raise IntegrityError("chain of %s does not start with a full backup" % manifest.id)
        if position and (item.parent != chain[position - 1].id or kind != "incremental"):
            raise IntegrityError("backup %s does not continue the chain at %s" % (item.id, chain[position - 1].id))


class _SumsCheck:
    """Streams ``files.sha256`` alongside the index: both must list the same files and digests."""

    def __init__(self, context, manifest):
        self._stream = context.open_payload(manifest, fmt.SUMS_PAYLOAD)
        self._lines = fmt.split_stream(self._stream, b"\n")
        self.count = 0
        self.agree = 0
        self.first_problem = None

    def expect(self, entry):
        self.count += 1
        line = next(self._lines, None)
        want = fmt.sums_line(entry).rstrip(b"\n")
        if line == want:
            self.agree += 1
        elif self.first_problem is None:
            self.first_problem = entry["path"]

    def close(self):
        self._stream.close()

    def result(self):
        extra = sum(1 for line in self._lines)
        self._stream.finish()
        check = {"what": "files.sha256 agrees with files.index", "expected": self.count,
                 "actual": self.agree - extra if extra else self.agree, "ok": self.agree == self.count and not extra}
        if self.first_problem is not None:
            check["examples"] = [self.first_problem]
        return check
