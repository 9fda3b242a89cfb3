"""Errors raised by the engine.

Every error carries a one-line message meant for the operator: it names what failed and,
where it helps, what to do. Adapters (modules, lookup, runner) print ``str(err)`` as is.
"""


class BackupError(Exception):
    """Base class of every error the engine raises on purpose."""

    result = None
    """What the operation had done or planned when it stopped, for the errors that report it
    (prune's refusal and its partial deletions); None for every other error."""


class ConfigError(BackupError):
    """Invalid options or job configuration, detected before anything changes."""


class StorageError(BackupError):
    """A storage location could not be read or written."""


class NotFoundError(StorageError):
    """An object or backup does not exist."""


class SourceError(BackupError):
    """The backup source (database, directory, API...) failed or could not be reached."""


class IntegrityError(BackupError):
    """Stored bytes do not match their manifest: corrupted, truncated, swapped or foreign."""


class ObjectMismatchError(IntegrityError):
    """A stored object's size or SHA-256 differs from its manifest entry.

    ``key`` (the object), ``field`` (``"size"`` or ``"sha256"``), ``expected`` (the manifest's
    value) and ``actual`` (what storage holds); ``note`` adds to the message.
    """

    def __init__(self, key, field, expected, actual, note=None):
        self.key = key
        self.field = field
        self.expected = expected
        self.actual = actual
        self.note = note
        if field == "size":
            message = "%s is %d bytes, the manifest says %d (truncated or replaced)" % (key, actual, expected)
        elif field == "sha256":
            message = "%s has SHA-256 %s, the manifest says %s (corrupted or swapped)" % (key, actual, expected)
        else:
            raise ValueError("ObjectMismatchError field must be 'size' or 'sha256', got %r" % (field,))
        super().__init__(message + ("; %s" % note if note else ""))


class DecryptionError(IntegrityError):
    """The payload could not be decrypted with the given key."""


class MissingDependencyError(BackupError):
    """A Python library the requested feature needs is not installed."""

    def __init__(self, library, purpose):
        self.library = library
        self.purpose = purpose
        super().__init__(
            "the Python library '%s' is required for %s but is not installed" % (library, purpose)
        )
