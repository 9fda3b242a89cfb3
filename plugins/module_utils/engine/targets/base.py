"""The contract every restore target implements (the restore side of ``sources``).

The engine (``restore.py``) resolves the backup, verifies every object (checksum, decrypt,
decompress) and only then hands the target a ``RestoreContext``, and a target's ``restore``
must itself leave the destination as it was when it fails (restore next to it, then swap).

A target that restores next to the live data may instead take the one-pass path (see
:meth:`Target.one_pass_payloads`): the engine then checks everything that does not need the
declared payloads' bytes, and those payloads are verified while the target consumes them.
"""

from ..errors import ConfigError


class RestoreContext:
    """What a target gets: the chain of manifests and a way to read their payloads."""

    def __init__(self, manifest, chain, open_payload, check_mode=False, options=None, note_progress=None):
        self.manifest = manifest        # the backup being restored
        self.chain = chain              # [full, incr1, ..., manifest] oldest first (just [manifest] for fulls)
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
        """Fail with ConfigError/SourceError before anything is written (unreachable, would clobber)."""

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
