"""The contract every kind implements: a ``Source`` backs up, a ``Target`` restores.

A source never touches storage itself: it hands readable streams to ``emit`` and the
engine compresses, encrypts, hashes and stores them. That keeps every kind on the same
verified data path.

The engine (``restore.py``, with ``selection.py`` and ``integrity.py``) resolves the backup,
verifies every object (checksum, decrypt, decompress) and only then hands the target a
``RestoreContext``, and a target's ``restore`` must itself leave the destination as it was
when it fails (restore next to it, then swap).

A target that restores next to the live data may instead take the one-pass path (see
:meth:`Target.one_pass_payloads`): the engine then checks everything that does not need the
declared payloads' bytes, and those payloads are verified while the target consumes them.
"""

from ..errors import ConfigError
from ..manifest import Manifest


class BackupContext:
    """What a source may know about the run, and what it may ask the engine.

    A source never reaches the storage or the catalog itself: the engine (``backup.py``)
    answers these questions for it, so that every read of a stored backup goes through the
    verified data path.
    """

    def __init__(self, job, options=None):
        self.job = job
        self.options = options or {}
        self.parent = None  # manifest of the parent backup (incremental chains) or None

    def latest(self):
        """The job's newest complete backup (its ``manifest.Manifest``); NotFoundError when it has none."""
        raise NotImplementedError

    def chain(self, manifest):
        """``[full, incr1, ..., manifest]``: the backups ``manifest`` builds on, oldest first;
        IntegrityError when one of them is missing."""
        raise NotImplementedError

    def chains_onto(self, manifest):
        """Whether an incremental may build on ``manifest`` (only the archive format chains)."""
        raise NotImplementedError

    def open_object(self, manifest, payload_name):
        """The checked plaintext stream of a payload of an earlier backup (``PlaintextStream``:
        read to the end, then ``finish()``)."""
        raise NotImplementedError

    def stored_intact(self, manifest, payload_name):
        """Whether the stored object of that payload still matches its SHA-256 (needs no key:
        tells a wrong key from a damaged object). False for a restic-format backup, whose
        payloads are snapshots rather than objects."""
        raise NotImplementedError

    def storage_directory(self):
        """The local directory backups are stored in, or None: a source must not archive it."""
        raise NotImplementedError


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


class RestoreContext:
    """What a target gets: the chain of manifests and a way to read their payloads."""

    def __init__(self, manifest, chain, open_payload, check_mode=False, options=None, note_progress=None):
        # Manifests: a plain mapping with the fields is wrapped (tests, the point-in-time copy).
        self.manifest = Manifest.wrap(manifest)  # the backup being restored
        # [full, incr1, ..., manifest] oldest first (just [manifest] for fulls)
        self.chain = [Manifest.wrap(item) for item in chain] if chain is not None else None
        self.open_payload = open_payload  # open_payload(manifest, payload_name) -> PlaintextStream
        self.check_mode = check_mode
        self.options = options or {}
        self._note_progress = note_progress

    def note_progress(self, what, done, total=None):
        """Progress in the target's own units (``what`` such as ``tables``: ``done`` of
        ``total``), reported with the byte progress; safe to call from a reader thread."""
        if self._note_progress is not None:
            self._note_progress(what, done, total)


class Target:
    """Base class. Subclasses set ``kind`` (the source kind they restore) and implement below."""

    kind = None
    # True when ``restore`` honours ``context.check_mode``: it then reads what it needs (an
    # index, a bundle, the API server's dry run) and returns a plan without writing. Only
    # then does the engine's check mode hand the target the verified chain.
    plans_in_check_mode = False

    #: The kind's fields (schema.Schema): checked, and converted to their types, before the
    #: subclass reads any of them.
    SCHEMA = None

    def __init__(self, options):
        if not isinstance(options, dict):
            raise ConfigError("target options for %s must be a mapping, got %s" % (self.kind, type(options).__name__))
        self.options = self.SCHEMA.validate(options) if self.SCHEMA is not None else options

    def describe(self):
        """Where data would go, for reports and check mode: never credentials."""
        return {}

    def preflight(self, manifest):
        """Fail with ConfigError/SourceError before anything is written (unreachable, would clobber).

        ``manifest`` here and in the other methods: a Manifest, or a plain mapping with its fields
        that the method wraps (``Manifest.wrap``) before it reads them."""

    def _backup_of_kind(self, manifest, payload_name):
        """``manifest`` as a Manifest, after checking that it is a backup of this target's kind
        holding ``payload_name`` (a preflight's first step: ConfigError otherwise)."""
        manifest = Manifest.wrap(manifest)
        if manifest.kind != self.kind:
            raise ConfigError("%s target cannot restore a %s backup" % (self.kind, manifest.kind))
        if manifest.payload_object(payload_name) is None:
            raise ConfigError("backup %s has no %s payload" % (manifest.id, payload_name))
        return manifest

    def one_pass_payloads(self, manifest, chain):
        """Payloads this target may read unverified: a set of ``(backup_id, payload_name)``, or None.

        None (the default) keeps the two-pass restore: every object is read and verified in
        full before ``restore`` is called. A set is a promise, for this ``manifest`` and
        ``chain``: ``restore`` reads each of those payload streams to its end and calls its
        ``finish()`` (which raises IntegrityError when size or SHA-256 differ) before it
        changes anything outside its own staging (a new database, a staging directory, a
        private server), and on any exception it discards that staging. The engine verifies
        every other object in full first, and checks the declared ones' presence and sizes.
        """
        return None

    def restore(self, context):
        """Restore ``context.manifest`` (with its chain); return the verification report dict.

        The report holds at least ``changed`` (bool) and ``checks``: a list of
        ``{what, expected, actual, ok}`` comparing the manifest's ``stats`` with the result.
        Raise IntegrityError when a check fails.
        """
        raise NotImplementedError

    def close(self):
        """Release what the target holds (connections, caches); the engine calls it after a
        restore. A closed target opens them again when it is used again."""

    @classmethod
    def scratch(cls, manifest, options):
        """Context manager yielding a throwaway Target for test restores (``backup_verify``)."""
        raise NotImplementedError("%s has no scratch target" % cls.kind)
