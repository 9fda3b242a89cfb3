"""One interface for every place backups are kept.

Keys are '/'-separated paths relative to the location's root (a directory, or a bucket
plus prefix). Large payloads go through ``open_writer`` (streamed, never whole in memory);
small documents (manifests, the catalog index) through ``put_bytes``. Both become visible
atomically: a reader never sees half an object under its final key.
"""

import collections

ObjectInfo = collections.namedtuple("ObjectInfo", "key size modified")
"""One stored object: key relative to the location, size in bytes, modification time (aware UTC datetime)."""


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
        """Every object whose key starts with ``prefix``, in key order (one paginated listing)."""
        raise NotImplementedError

    def delete(self, key):
        """Remove one object; deleting a missing object is not an error."""
        raise NotImplementedError

    def exists(self, key):
        raise NotImplementedError

    def describe(self):
        """Where this location is, for manifests and messages; never credentials."""
        raise NotImplementedError
