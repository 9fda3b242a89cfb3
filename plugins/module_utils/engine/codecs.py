"""Compression and age encryption settings, shared by the write and the read side.

Stored bytes are ``age(compress(payload))`` so that ``age -d | zstd -d`` (or ``gzip -d``)
recovers a payload without this collection.
"""

import zlib

from .config import read_secret_file, resolve_secret_refs
from .errors import ConfigError, DecryptionError, MissingDependencyError
from .schema import Field, Schema

try:
    import zstandard
    HAS_ZSTD = True
except ImportError:
    HAS_ZSTD = False

try:
    import pyrage
    from pyrage import x25519 as age_x25519
    HAS_PYRAGE = True
except ImportError:
    HAS_PYRAGE = False

ALGORITHMS = ("none", "gzip", "zstd")
SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst"}
DEFAULT_LEVEL = {"none": 0, "gzip": 6, "zstd": 3}
LEVEL_RANGE = {"none": (0, 0), "gzip": (1, 9), "zstd": (1, 19)}
ENVELOPE_OBJECT = "key.age"
ENCRYPTED_SUFFIX = ".age"


def stored_name(payload_name, algorithm, encryption_mode):
    """The name a payload is stored under: ``<payload><compression suffix>[.age]``.

    The one rule for it: a backup names its objects with it, restore and verify check
    manifests against it. ``algorithm`` is one of ALGORITHMS (ValueError otherwise),
    ``encryption_mode`` the manifest's ``encryption.mode`` (``age`` adds ``.age``).
    """
    if algorithm not in SUFFIX:
        raise ValueError("unknown compression algorithm %r" % (algorithm,))
    return payload_name + SUFFIX[algorithm] + (ENCRYPTED_SUFFIX if encryption_mode == "age" else "")


# zstd worker threads: -1 lets zstandard use every core, 0 compresses in the calling thread.
MAX_THREADS = 256
SCHEMA = Schema("compression", {
    "enabled": Field("bool", "false stores payloads uncompressed (the seed's spelling of algorithm: none)"),
    "algorithm": Field("enum", "compression algorithm (default zstd)", choices=ALGORITHMS),
    "level": Field("int", "compression level: gzip 1-9 (default 6), zstd 1-19 (default 3)", minimum=0, maximum=19),
    "threads": Field("int", "zstd worker threads: -1 all cores (default), 0 none", minimum=-1, maximum=MAX_THREADS),
})


def compression_settings(options):
    """Normalise ``{algorithm, level, threads}``; the seed's ``{enabled, algorithm}`` is accepted."""
    options = SCHEMA.validate(options)
    if options.get("enabled") is False:
        return {"algorithm": "none", "level": 0, "threads": 0}
    algorithm = options.get("algorithm", "zstd")
    level = options.get("level", DEFAULT_LEVEL[algorithm])
    low, high = LEVEL_RANGE[algorithm]
    if algorithm == "none":
        level = 0
    elif not low <= level <= high:
        raise ConfigError("compression.level %d is outside %d..%d for %s" % (level, low, high, algorithm))
    threads = options.get("threads", -1 if algorithm == "zstd" else 0)
    if algorithm == "zstd" and not HAS_ZSTD:
        raise MissingDependencyError("zstandard", "zstd compression")
    return {"algorithm": algorithm, "level": level, "threads": threads}


class _GzipWriter:
    """Streaming gzip (RFC 1952) into ``sink``; ``gzip -d`` reads it."""

    def __init__(self, sink, level):
        self._sink = sink
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31)

    def write(self, data):
        out = self._zlib.compress(data)
        if out:
            self._sink.write(out)

    def close(self):
        self._sink.write(self._zlib.flush())


class _PlainWriter:
    def __init__(self, sink):
        self._sink = sink

    def write(self, data):
        self._sink.write(data)

    def close(self):
        pass


class _ZstdWriter:
    def __init__(self, sink, level, threads):
        compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        self._writer = compressor.stream_writer(sink, closefd=False, write_return_read=True)

    def write(self, data):
        self._writer.write(data)

    def close(self):
        self._writer.flush(zstandard.FLUSH_FRAME)
        self._writer.close()


def compressing_writer(sink, settings):
    """A writer with write()/close() that compresses into ``sink`` (close does not close sink)."""
    algorithm = settings["algorithm"]
    if algorithm == "zstd":
        return _ZstdWriter(sink, settings["level"], settings["threads"])
    if algorithm == "gzip":
        return _GzipWriter(sink, settings["level"])
    return _PlainWriter(sink)


class _GzipReader:
    """Streaming gzip reader: every member of a multi-member file (as ``gzip -d`` does), and an
    error, never short data, for a stream cut inside a member or followed by non-gzip bytes."""

    def __init__(self, source):
        self._source = source
        self._zlib = zlib.decompressobj(31)

    def read(self, size=-1):
        size = 1 << 20 if size is None or size < 0 else size
        while True:
            if self._zlib.eof:
                # A member ended: what follows is another member, or nothing at all. (After
                # the end, unused_data holds every byte past it, unconsumed_tail included.)
                data = self._zlib.unused_data or self._source.read(1 << 16)
                if not data:
                    return b""
                self._zlib = zlib.decompressobj(31)  # a non-gzip header raises below
            else:
                data = self._zlib.unconsumed_tail or self._source.read(1 << 16)
                if not data:
                    raise zlib.error("gzip stream is truncated")
            chunk = self._zlib.decompress(data, size)
            if chunk:
                return chunk


class TruncatedStreamError(ValueError):
    """The compressed stream ended inside a frame."""


_ZSTD_MAGIC = 0xFD2FB528
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)


class _ZstdFrameTracker:
    """Follows zstd frame and block boundaries (RFC 8878) in the compressed bytes read.

    zstandard's stream_reader returns short (even empty) output without an error when its
    input stops in the middle of a frame, so a cut-off payload would decompress "fine".
    The tracker only reads headers and skips block bodies, so it costs next to nothing;
    ``at_boundary`` tells whether the input ended cleanly after at least one frame.
    """

    def __init__(self, source):
        self._source = source
        self._need = 4          # bytes still wanted for the current field or body
        self._field = bytearray()
        self._state = "magic"   # magic, descriptor, header, block, body, checksum, skip_size, skip
        self._checksum = False
        self._last_block = False
        self.frames = 0

    def read(self, size=-1):
        data = self._source.read(size)
        if data:
            self._feed(memoryview(data))
        return data

    @property
    def at_boundary(self):
        return self._state == "magic" and not self._field and self.frames > 0

    def _feed(self, view):
        while len(view):
            if self._state in ("body", "skip"):
                take = min(self._need, len(view))
                view = view[take:]
                self._need -= take
                if not self._need:
                    self._end_of_body()
                continue
            take = min(self._need - len(self._field), len(view))
            self._field += view[:take]
            view = view[take:]
            if len(self._field) == self._need:
                field, self._field = bytes(self._field), bytearray()
                self._field_done(field)

    def _field_done(self, field):
        state = self._state
        if state == "magic":
            magic = int.from_bytes(field, "little")
            if magic == _ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skip_size", 4
            else:
                raise ValueError("not a zstd frame (magic %08x)" % magic)
        elif state == "descriptor":
            descriptor = field[0]
            single_segment = bool(descriptor & 0x20)
            self._checksum = bool(descriptor & 0x04)
            fcs = _FCS_SIZES[descriptor >> 6] or (1 if single_segment else 0)
            rest = (0 if single_segment else 1) + _DICT_ID_SIZES[descriptor & 0x03] + fcs
            self._state, self._need = ("header", rest) if rest else ("block", 3)
        elif state == "header":
            self._state, self._need = "block", 3
        elif state == "block":
            header = int.from_bytes(field, "little")
            self._last_block = bool(header & 1)
            block_type, block_size = (header >> 1) & 3, header >> 3
            if block_type == 3:
                raise ValueError("corrupt zstd block header")
            self._state, self._need = "body", (1 if block_type == 1 else block_size)
            if not self._need:
                self._end_of_body()
        elif state == "checksum":
            self._frame_done()
        elif state == "skip_size":
            self._state, self._need = "skip", int.from_bytes(field, "little")
            if not self._need:
                self._frame_done()

    def _end_of_body(self):
        if self._state == "skip":
            self._frame_done()
        elif not self._last_block:
            self._state, self._need = "block", 3
        elif self._checksum:
            self._state, self._need = "checksum", 4
        else:
            self._frame_done()

    def _frame_done(self):
        self.frames += 1
        self._state, self._need = "magic", 4


class _ZstdReader:
    """zstd decompression that fails on a cut-off stream instead of returning short data."""

    def __init__(self, source):
        self._tracker = _ZstdFrameTracker(source)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._tracker, read_across_frames=True, closefd=False)

    def read(self, size=-1):
        data = self._reader.read(size)
        if not data and not self._tracker.at_boundary:
            raise TruncatedStreamError("zstd stream is truncated (it ends inside a frame)")
        return data

    def readable(self):
        return True

    def close(self):
        self._reader.close()


def decompressing_reader(source, algorithm):
    """A readable yielding the decompressed bytes of ``source``; a cut-off stream raises."""
    if algorithm == "zstd":
        if not HAS_ZSTD:
            raise MissingDependencyError("zstandard", "zstd decompression")
        return _ZstdReader(source)
    if algorithm == "gzip":
        return _GzipReader(source)
    if algorithm == "none":
        return source
    raise ConfigError("unknown compression algorithm %r in manifest" % (algorithm,))


def _require_pyrage(purpose):
    if not HAS_PYRAGE:
        raise MissingDependencyError("pyrage", purpose)


def parse_recipient(text):
    _require_pyrage("age encryption")
    try:
        return age_x25519.Recipient.from_str(text.strip())
    except Exception:  # pylint: disable=broad-except  # pyrage raises its own types
        raise ConfigError("invalid age recipient %r: expected an X25519 public key starting with 'age1'"
                          % (text.strip()[:80],)) from None


def parse_identities(text):
    """AGE-SECRET-KEY-... lines (comments allowed), as written by ``age-keygen``."""
    _require_pyrage("age decryption")
    identities = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(age_x25519.Identity.from_str(line))
        except Exception:  # pylint: disable=broad-except
            raise ConfigError("the age identity is not a valid X25519 secret key (AGE-SECRET-KEY-...)") from None
    if not identities:
        raise ConfigError("the age identity file holds no AGE-SECRET-KEY line")
    return identities


def encryption_settings(options):
    """Normalise encryption options.

    ``{recipients: [age1...]}`` encrypts to those public keys. ``{passphrase: ...}`` (or
    ``passphrase_file``, resolved earlier) uses an envelope: the payload is encrypted to a
    fresh X25519 key whose identity is stored beside it, itself age-encrypted with the
    passphrase — because age's passphrase mode in pyrage works on whole buffers only and
    would break the memory bound. Both layers decrypt with the stock ``age`` CLI.
    """
    # ``passphrase_file``/``passphrase_env`` and ``recipients_file`` are accepted here too:
    # a caller that did not resolve them must not end up silently unencrypted.
    options = dict(options or {})
    if options.get("enabled") is False:
        return {"mode": "none"}
    options = resolve_secret_refs(options, "encryption")
    if options.get("recipients_file"):
        recipients = options.get("recipients") or []
        recipients = recipients.splitlines() if isinstance(recipients, str) else list(recipients)
        options["recipients"] = recipients + read_secret_file(
            options.pop("recipients_file"), "encryption.recipients_file").splitlines()
    if options.get("enabled") is False or not (options.get("recipients") or options.get("passphrase")):
        if options.get("enabled") is True:
            raise ConfigError("encryption is enabled but neither recipients nor a passphrase was given")
        return {"mode": "none"}
    _require_pyrage("age encryption")
    if options.get("recipients") and options.get("passphrase"):
        raise ConfigError("encryption: give recipients or a passphrase, not both")
    if options.get("recipients"):
        recipients = options["recipients"]
        if isinstance(recipients, str):
            recipients = recipients.splitlines()
        recipients = [line for line in recipients if line.strip() and not line.strip().startswith("#")]
        if not recipients:
            raise ConfigError("encryption.recipients lists no age recipient")
        parsed = [parse_recipient(text) for text in recipients]
        return {"mode": "age", "recipients": [str(r) for r in parsed], "_recipients": parsed}
    identity = age_x25519.Identity.generate()
    envelope = pyrage.passphrase.encrypt(str(identity).encode("ascii") + b"\n", options["passphrase"])
    return {"mode": "age", "recipients": [str(identity.to_public())], "key_object": ENVELOPE_OBJECT,
            "_recipients": [identity.to_public()], "_envelope": envelope}


def public_encryption_info(settings):
    """What the manifest records: recipients and the envelope object name, never keys."""
    return {key: value for key, value in settings.items() if not key.startswith("_")}


def identities_for(manifest_encryption, identity_text=None, passphrase=None, envelope_bytes=None):
    """Identities able to decrypt a backup, from an identity file's text or the passphrase envelope."""
    _require_pyrage("age decryption")
    if identity_text:
        return parse_identities(identity_text)
    if passphrase is not None:
        if not manifest_encryption.get("key_object") or envelope_bytes is None:
            raise DecryptionError("this backup was encrypted to recipients, not a passphrase: give an identity file")
        try:
            text = pyrage.passphrase.decrypt(envelope_bytes, passphrase).decode("ascii")
        except Exception:  # pylint: disable=broad-except
            raise DecryptionError("the passphrase does not decrypt this backup's key envelope (wrong passphrase?)") from None
        return parse_identities(text)
    raise DecryptionError("this backup is encrypted: give encryption.identity_file (or identity) or a passphrase")
