"""One interface for every place backups are kept.

Keys are '/'-separated paths relative to the location's root (a directory, or a bucket
plus prefix). Large payloads go through ``open_writer`` (streamed, never whole in memory);
small documents (manifests, the catalog index) through ``put_bytes``. Both become visible
atomically: a reader never sees half an object under its final key.
"""

import collections

from ..errors import StorageError

ObjectInfo = collections.namedtuple("ObjectInfo", "key size modified")
"""One stored object: key relative to the location, size in bytes, modification time (aware UTC datetime)."""

IncompleteUpload = collections.namedtuple("IncompleteUpload", "key upload_id initiated")
"""An upload never completed: key relative to the location, the backend's upload id, when it started (aware UTC)."""


class MissingLocationError(StorageError):
    """The location itself is not there: a filesystem root that does not exist or is not a
    directory (an S3 bucket that does not exist is reported the same way by S3Storage).

    Reading never treats this as an empty catalog: only an operation that creates the
    location (a backup run, through ``ensure_ready``) may catch it, and then means "nothing
    stored yet".
    """


class ObjectWriter:
    """Streams one object. ``write`` many times, then ``commit`` (publish) or ``abort`` (discard)."""

    def write(self, data):
        raise NotImplementedError

    def commit(self):
        """Make the object visible under its key; returns the number of bytes stored."""
        raise NotImplementedError

    def abort(self):
        """Discard everything written; never raises."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class Storage:
    """Abstract storage location. Subclasses: FilesystemStorage, S3Storage."""

    backend = None

    def open_writer(self, key):
        raise NotImplementedError

    def open_reader(self, key):
        """A binary file-like object with ``read(n)`` and ``close()``."""
        raise NotImplementedError

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

    def list(self, prefix=""):
        """Every object whose key starts with ``prefix``, in key order (one paginated listing).

        A location that does not exist raises :class:`MissingLocationError` naming it, never an
        empty list; a prefix with nothing below it inside an existing location is empty.
        """
        raise NotImplementedError

    def delete(self, key):
        """Remove one object; deleting a missing object is not an error."""
        raise NotImplementedError

    def exists(self, key):
        raise NotImplementedError

    def ensure_ready(self):
        """Before a backup writes: create the location where the backend can (a directory),
        else prove it exists and is writable; raises StorageError naming it."""

    def list_incomplete_uploads(self, prefix=""):
        """Uploads started but never completed or aborted (S3 multipart uploads of a killed run),
        as ``IncompleteUpload`` tuples; backends without such a thing have none."""
        return []

    def describe(self):
        """Where this location is, for manifests and messages; never credentials."""
        raise NotImplementedError
