"""Filesystem backend: a local directory, a PVC mount or an NFS mount.

Objects are written under a hidden temporary name, fsynced and renamed into place, and
the directory is fsynced too, so a crash leaves either the whole object or a ``.tmp-``
leftover that listings ignore and prune removes.
"""

import datetime
import errno
import os
import secrets
import stat

from ..errors import NotFoundError, StorageError
from .base import MissingLocationError, ObjectInfo, ObjectWriter, Storage, unfinished_name


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain NFS setups) refuse fsync on directories
    finally:
        os.close(fd)


class _FileWriter(ObjectWriter):
    def __init__(self, final_path):
        self._final = final_path
        directory, name = os.path.split(final_path)
        # Directories this writer creates: their entries in their parents must be made
        # durable too, or a crash can lose a whole new backup directory after commit.
        self._created = []
        missing = directory
        while missing and not os.path.isdir(missing):
            self._created.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StorageError("cannot create directory %s: %s" % (directory, exc.strerror)) from None
        self._tmp = os.path.join(directory, unfinished_name(name, secrets.token_hex(4)))
        try:
            self._file = open(self._tmp, "xb")
        except OSError as exc:
            raise StorageError("cannot write %s: %s" % (self._tmp, exc.strerror)) from None
        self._size = 0

    def write(self, data):
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise StorageError("writing %s failed: %s" % (self._final, reason)) from None
        self._size += len(data)

    def commit(self):
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self._tmp, self._final)
        except OSError as exc:
            self.abort()
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise StorageError("publishing %s failed: %s" % (self._final, reason)) from None
        _fsync_dir(os.path.dirname(self._final))
        for created in self._created:
            _fsync_dir(os.path.dirname(created))
        return self._size

    def abort(self):
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


class FilesystemStorage(Storage):
    backend = "filesystem"

    def __init__(self, path, backend="filesystem"):
        if not path or not os.path.isabs(path):
            raise StorageError("storage path must be an absolute directory, got %r" % (path,))
        self.root = os.path.normpath(path)
        self.backend = backend

    def _path(self, key):
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise StorageError("invalid object key %r" % (key,))
        return os.path.join(self.root, *parts)

    def ensure_ready(self):
        """Create the root directory and prove it is writable before any backup starts.

        The only place the location is created: every read (listing, catalog, verify,
        restore, prune) requires it to exist already (``check_location``).
        """
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            # A regular file, or a symlink to nowhere (an unmounted volume): never write
            # around it into whatever lies beneath.
            self.check_location()
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StorageError("cannot create storage directory %s: %s" % (self.root, exc.strerror)) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError("storage directory %s is not writable" % self.root)

    def check_location(self):
        """Raise MissingLocationError unless the root is an existing directory.

        A mistyped path or an unmounted volume must not read as "no backups": backup_info
        would report nothing, prune would succeed, verify would blame the job.
        """
        try:
            mode = os.stat(self.root).st_mode
        except FileNotFoundError:
            if os.path.islink(self.root):
                raise MissingLocationError(
                    "storage path %s is a symbolic link to %s, which does not exist: check storage.path"
                    % (self.root, os.readlink(self.root))) from None
            raise MissingLocationError(
                "storage directory %s does not exist (only a backup run creates it): check storage.path"
                % self.root) from None
        except OSError as exc:
            raise StorageError("cannot reach storage directory %s: %s" % (self.root, exc.strerror)) from None
        if not stat.S_ISDIR(mode):
            raise MissingLocationError("storage path %s is not a directory: check storage.path" % self.root)

    def open_writer(self, key):
        return _FileWriter(self._path(key))

    def open_reader(self, key):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError("object %s not found in %s" % (key, self.root)) from None
        except OSError as exc:
            raise StorageError("cannot read %s: %s" % (key, exc.strerror)) from None

    def list(self, prefix=""):
        base = self.root
        found = []
        # Walk only below the prefix's directory part ('job/' -> <root>/job), not the whole
        # location: listing one job must not cost a walk over every job's backups.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        parts = [p for p in head.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StorageError("invalid listing prefix %r" % (prefix,))
        start = os.path.join(base, *parts) if parts else base
        self.check_location()

        def unreadable(exc):
            # The directory listed (the root, or a job's directory) must be readable: an
            # unreadable one is not an empty one. A job directory that does not exist yet has
            # no objects. Deeper down, as before, unreadable entries are skipped (a PVC's
            # root-only lost+found must not break every listing of a non-root runner).
            if exc.filename != start or (start != base and isinstance(exc, (FileNotFoundError, NotADirectoryError))):
                return
            raise StorageError("cannot list storage directory %s: %s" % (start, exc.strerror)) from None

        for directory, subdirs, files in os.walk(start, onerror=unreadable):
            subdirs.sort()
            for name in files:
                full = os.path.join(directory, name)
                key = os.path.relpath(full, base).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    found_stat = os.stat(full)
                except FileNotFoundError:
                    continue  # deleted while we were listing
                modified = datetime.datetime.fromtimestamp(found_stat.st_mtime, datetime.timezone.utc)
                found.append(ObjectInfo(key, found_stat.st_size, modified))
        found.sort(key=lambda info: info.key)
        return found

    def delete(self, key):
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError("cannot delete %s: %s" % (key, exc.strerror)) from None
        # Remove directories the deletion emptied, up to (not including) the root.
        directory = os.path.dirname(path)
        while directory != self.root and directory.startswith(self.root):
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)

    def exists(self, key):
        return os.path.isfile(self._path(key))

    def describe(self):
        return {"backend": self.backend, "path": self.root}

    def local_directory(self):
        return self.root
