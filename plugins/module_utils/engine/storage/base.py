"""One interface for every place backups are kept.

Keys are '/'-separated paths relative to the location's root (a directory, or a bucket
plus prefix). Large payloads go through ``open_writer`` (streamed, never whole in memory);
small documents (manifests, the catalog index) through ``put_bytes``. Both become visible
atomically: a reader never sees half an object under its final key.

:class:`Storage` is the whole contract: callers use only its methods, never probe a backend
for optional ones. What a backend lacks has a documented default here (no location to
prepare, no unfinished uploads, no local directory).
"""

import abc
import collections

from ..errors import StorageError

ObjectInfo = collections.namedtuple("ObjectInfo", "key size modified")
"""One stored object: key relative to the location, size in bytes, modification time (aware UTC datetime)."""

TMP_MARKER = ".tmp-"
"""What the name of an unfinished object contains: a writer that publishes by renaming writes
``.<name>.tmp-<token>`` next to ``<name>``; after a crash that file is left over. Listings
show it, the catalog and restore skip it, prune removes it (see :func:`is_unfinished`)."""


def unfinished_name(name, token):
    """The hidden name an object called ``name`` has while it is written (``token``: random)."""
    return ".%s%s%s" % (name, TMP_MARKER, token)


def is_unfinished(key):
    """Whether ``key`` (a key or a bare name) is an object still being written or left over by
    an interrupted write, judged by its last path component."""
    return TMP_MARKER in key.rsplit("/", 1)[-1]


IncompleteUpload = collections.namedtuple("IncompleteUpload", "key upload_id initiated")
"""An upload never completed: key relative to the location, the backend's upload id, when it started (aware UTC)."""


class MissingLocationError(StorageError):
    """The location itself is not there: a filesystem root that does not exist or is not a
    directory (an S3 bucket that does not exist is reported the same way by S3Storage).

    Reading never treats this as an empty catalog: only an operation that creates the
    location (a backup run, through ``ensure_ready``) may catch it, and then means "nothing
    stored yet".
    """


class ObjectWriter(abc.ABC):
    """Streams one object. ``write`` many times, then ``commit`` (publish) or ``abort`` (discard)."""

    @abc.abstractmethod
    def write(self, data):
        """Append ``data`` (bytes) to the object."""

    @abc.abstractmethod
    def commit(self):
        """Make the object visible under its key; returns the number of bytes stored."""

    @abc.abstractmethod
    def abort(self):
        """Discard everything written; never raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class Storage(abc.ABC):
    """Abstract storage location. Subclasses: FilesystemStorage (backends filesystem and nfs),
    S3Storage. The abstract methods are what every backend must provide; the others have a
    default that is right for a backend without the feature."""

    backend = None
    # The checked ``storage`` options this location was opened from, secrets read
    # (storage.location.build_storage sets them; None for a Storage built directly). The restic
    # format takes a job's repository and its password from them (engine/resticstore.py).
    location_options = None

    @abc.abstractmethod
    def open_writer(self, key):
        """An :class:`ObjectWriter` for ``key``; nothing is visible under ``key`` before ``commit``."""

    @abc.abstractmethod
    def open_reader(self, key):
        """A binary file-like object with ``read(n)`` and ``close()``; NotFoundError when missing."""

    def put_bytes(self, key, data):
        with self.open_writer(key) as writer:
            writer.write(data)
            writer.commit()

    def get_bytes(self, key):
        reader = self.open_reader(key)
        try:
            return reader.read()
        finally:
            reader.close()

    @abc.abstractmethod
    def list(self, prefix=""):
        """Every object whose key starts with ``prefix``, in key order (one paginated listing).

        A location that does not exist raises :class:`MissingLocationError` naming it, never an
        empty list; a prefix with nothing below it inside an existing location is empty.
        """

    @abc.abstractmethod
    def delete(self, key):
        """Remove one object; deleting a missing object is not an error."""

    @abc.abstractmethod
    def exists(self, key):
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def describe(self):
        """Where this location is, for manifests and messages; never credentials."""

    def ensure_ready(self):
        """Before a backup writes: create the location where the backend can (a directory),
        else prove it exists and is writable; raises StorageError naming it.

        Default: nothing to prepare."""

    def list_incomplete_uploads(self, prefix=""):
        """Uploads started but never completed or aborted (S3 multipart uploads of a killed run),
        as ``IncompleteUpload`` tuples.

        Default: an empty list (a backend without multipart uploads has none)."""
        return []

    def incomplete_upload_size(self, key, upload_id):
        """``(parts, bytes)`` an unfinished upload holds, or None when it is gone or the
        backend cannot tell.

        Default: None (a backend without multipart uploads has nothing to measure)."""
        return None

    def abort_incomplete_upload(self, key, upload_id):
        """Discard an upload returned by :meth:`list_incomplete_uploads`.

        Default: refused, since a backend without multipart uploads never lists one."""
        raise StorageError("backend %s has no incomplete uploads; cannot abort %s (upload %s)"
                           % (self.backend, key, upload_id))

    def local_directory(self):
        """The directory on this machine that holds the location, or None when it is not a
        local directory (``BackupContext.storage_directory`` answers the files source with it, which
        leaves the storage out of a tree it archives).

        Default: None."""
        return None
