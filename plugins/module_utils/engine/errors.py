"""Errors raised by the engine.

Every error carries a one-line message meant for the operator: it names what failed and,
where it helps, what to do. Adapters (modules, lookup, runner) print ``str(err)`` as is.
"""


class BackupError(Exception):
    """Base class of every error the engine raises on purpose."""


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
