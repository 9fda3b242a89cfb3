"""The contract every backup source implements.

A source never touches storage itself: it hands readable streams to ``emit`` and the
engine compresses, encrypts, hashes and stores them. That keeps every kind on the same
verified data path.
"""

from ..errors import ConfigError


class BackupContext:
    """What a source may know about the run: job, storage, the parent backup for incrementals."""

    def __init__(self, job, storage, catalog, parent=None, open_object=None, options=None):
        self.job = job
        self.storage = storage
        self.catalog = catalog
        self.parent = parent            # manifest of the parent backup (incremental chains) or None
        self.open_object = open_object  # open_object(manifest, payload_name) -> readable plaintext
        self.options = options or {}


class Source:
    """Base class. Subclasses set ``kind`` and implement the methods below."""

    kind = None
    #: Sources whose payload always contains secrets (e.g. Kubernetes Secrets) set this so
    #: the engine refuses to store them unencrypted.
    requires_encryption = False

    #: The kind's fields (schema.Schema): checked, and converted to their types, before the
    #: subclass reads any of them.
    SCHEMA = None

    def __init__(self, options):
        if not isinstance(options, dict):
            raise ConfigError("source options for %s must be a mapping, got %s" % (self.kind, type(options).__name__))
        self.options = self.SCHEMA.validate(options) if self.SCHEMA is not None else options

    def describe(self):
        """Where the data comes from, for the manifest: never credentials."""
        return {}

    def preflight(self):
        """Fail with SourceError before anything is written (unreachable, bad credentials)."""

    def wants_parent(self, context):
        """For incremental sources: the manifest this backup builds on, or None for a full."""
        return None

    def produce(self, emit, context):
        """Call ``emit(payload_name, readable)`` for each payload; return the ``stats`` dict."""
        raise NotImplementedError

    def tool_versions(self):
        return {}

    def close(self):
        """Release what the source holds (connections, caches); the engine calls it after a run.
        A closed source opens them again when it is used again."""
