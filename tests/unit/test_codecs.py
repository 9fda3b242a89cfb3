"""engine/codecs: compression and age settings, streaming round trips, key handling.

Stock-tool compatibility (``age -d``, ``zstd -d``, ``gzip -d``) is proven in
tests/integration/test_pipeline_stock_tools.py.
"""

import gzip
import io
import os
import zlib

import pyrage
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, DecryptionError


class Sink:
    """A writable that records every write call (the codecs must not close it)."""

    def __init__(self):
        self.buffer = io.BytesIO()
        self.writes = 0
        self.closed = False

    def write(self, data):
        self.writes += 1
        return self.buffer.write(data)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def compress(data, settings_, chunk=65536):
    sink = Sink()
    writer = codecs.compressing_writer(sink, settings_)
    for start in range(0, len(data), chunk):
        writer.write(data[start:start + chunk])
    writer.close()
    assert not sink.closed
    return sink.buffer.getvalue()


def decompress(blob, algorithm, size=65536):
    reader = codecs.decompressing_reader(io.BytesIO(blob), algorithm)
    out = bytearray()
    while True:
        chunk = reader.read(size)
        if not chunk:
            return bytes(out)
        assert len(chunk) <= size
        out += chunk


def mixed_data(size, seed=1):
    """Half random, half repetitive: compressible but not trivially."""
    rnd = os.urandom(size // 2) if seed is None else bytes((i * 7919 + seed) % 251 for i in range(size // 2))
    text = (b"template,%d,2024-01-15T02:00:00Z,{\"quality\": 0.97}\n" * (size // 40 + 1))[: size - len(rnd)]
    return rnd + text


# -- settings -------------------------------------------------------------------------

def test_compression_defaults():
    assert codecs.compression_settings(None) == {"algorithm": "zstd", "level": 3, "threads": -1}
    assert codecs.compression_settings({"algorithm": "gzip"}) == {"algorithm": "gzip", "level": 6, "threads": 0}
    assert codecs.compression_settings({"algorithm": "none", "level": 7}) == {"algorithm": "none", "level": 0, "threads": 0}


def test_seed_style_compression_options_are_accepted():
    assert codecs.compression_settings({"enabled": False, "algorithm": "gzip"})["algorithm"] == "none"
    assert codecs.compression_settings({"enabled": True, "algorithm": "gzip"})["algorithm"] == "gzip"


def test_unset_options_mean_defaults():
    # What an Ansible sub-option or an empty job-file key looks like.
    assert codecs.compression_settings({"algorithm": "zstd", "level": None, "threads": None}) == \
        {"algorithm": "zstd", "level": 3, "threads": -1}
    assert codecs.compression_settings({"algorithm": "zstd", "threads": "2"})["threads"] == 2


def test_an_empty_string_is_not_an_unset_number():
    # `level: ""` is a value, and not a number: it must not silently mean the default.
    with pytest.raises(ConfigError, match="compression.level must be a whole number, got ''"):
        codecs.compression_settings({"algorithm": "zstd", "level": ""})


@pytest.mark.parametrize("options, message", [
    ({"algorithm": "bzip2"}, "compression.algorithm must be one of none, gzip, zstd, got 'bzip2'"),
    ({"algorithm": "zstd", "level": 0}, "level 0 is outside 1..19 for zstd"),
    ({"algorithm": "zstd", "level": 20}, "compression.level must be at most 19, got 20"),
    ({"algorithm": "gzip", "level": 10}, "level 10 is outside 1..9 for gzip"),
    ({"algorithm": "gzip", "level": "fast"}, "compression.level must be a whole number, got 'fast'"),
    ({"algorithm": "zstd", "threads": "many"}, "compression.threads must be a whole number, got 'many'"),
    ({"algorithm": "zstd", "threads": 100000}, "compression.threads must be at most 256, got 100000"),
    ({"algorithm": "zstd", "threads": -2}, "compression.threads must be at least -1, got -2"),
    ({"algorithm": "zstd", "level": True}, "compression.level must be a whole number, got True"),
    ({"enabled": "perhaps"}, "compression.enabled must be a boolean"),
    ({"algorithm": "zstd", "speed": 3}, "compression: unknown option\\(s\\) speed"),
])
def test_bad_compression_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        codecs.compression_settings(options)


# -- compression round trips ----------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"algorithm": "none"},
    {"algorithm": "gzip", "level": 1}, {"algorithm": "gzip", "level": 6}, {"algorithm": "gzip", "level": 9},
    {"algorithm": "zstd", "level": 1, "threads": 0}, {"algorithm": "zstd", "level": 3},
    {"algorithm": "zstd", "level": 9, "threads": 2}, {"algorithm": "zstd", "level": 19, "threads": 1},
])
def test_round_trip_every_algorithm_and_level(options):
    data = mixed_data(3 << 20)
    settings_ = codecs.compression_settings(options)
    blob = compress(data, settings_)
    if settings_["algorithm"] == "none":
        assert blob == data
    else:
        assert len(blob) < len(data)
    assert decompress(blob, settings_["algorithm"]) == data


def test_zstd_levels_trade_size():
    data = mixed_data(2 << 20)
    low = compress(data, codecs.compression_settings({"algorithm": "zstd", "level": 1}))
    high = compress(data, codecs.compression_settings({"algorithm": "zstd", "level": 19}))
    assert len(high) < len(low)


def test_zstd_frames_carry_a_checksum_and_are_standard():
    data = mixed_data(1 << 20)
    blob = compress(data, codecs.compression_settings({"algorithm": "zstd", "threads": 2}))
    params = zstandard.get_frame_parameters(blob)
    assert params.has_checksum
    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == data


def test_gzip_output_is_rfc1952():
    data = mixed_data(1 << 20)
    blob = compress(data, codecs.compression_settings({"algorithm": "gzip"}))
    assert blob[:2] == b"\x1f\x8b"
    assert zlib.decompress(blob, 31) == data


def test_empty_input_round_trips():
    for algorithm in codecs.ALGORITHMS:
        settings_ = codecs.compression_settings({"algorithm": algorithm})
        assert decompress(compress(b"", settings_), algorithm) == b""


@settings(max_examples=40)
@given(data=st.binary(max_size=200000), chunk=st.integers(min_value=1, max_value=70000),
       read_size=st.integers(min_value=1, max_value=300000),
       algorithm=st.sampled_from(codecs.ALGORITHMS))
def test_round_trip_property(data, chunk, read_size, algorithm):
    settings_ = codecs.compression_settings({"algorithm": algorithm, "level": 1})
    assert decompress(compress(data, settings_, chunk), algorithm, read_size) == data


def test_truncated_gzip_is_an_error_not_short_data():
    blob = compress(mixed_data(1 << 20), codecs.compression_settings({"algorithm": "gzip"}))
    with pytest.raises(zlib.error, match="truncated"):
        decompress(blob[: len(blob) // 2], "gzip")


def test_multi_member_gzip_is_read_whole_like_gzip_d():
    """`cat a.gz b.gz` is a valid gzip file; reading only its first member was silent data loss."""
    first, second = mixed_data(300000, seed=3), mixed_data(200000, seed=4)
    blob = gzip.compress(first) + gzip.compress(second) + gzip.compress(b"")
    for read_size in (1, 4096, 1 << 20):
        assert decompress(blob, "gzip", read_size) == first + second


@pytest.mark.parametrize("tail", [b"garbage!", b"\n", b"\x1f", b"\x00" * 512])
def test_bytes_after_a_gzip_member_are_an_error(tail):
    blob = gzip.compress(mixed_data(100000)) + tail
    with pytest.raises(zlib.error):
        decompress(blob, "gzip")


def test_truncated_zstd_is_an_error_not_short_data():
    # zstandard's own stream_reader returns short or empty output here without complaint.
    blob = compress(mixed_data(1 << 20), codecs.compression_settings({"algorithm": "zstd"}))
    for cut in (0, 3, 4, 5, 12, len(blob) // 2, len(blob) - 4, len(blob) - 1):
        with pytest.raises(codecs.TruncatedStreamError, match="zstd stream is truncated"):
            decompress(blob[:cut], "zstd")


def zstd_frames():
    """Frames of every header shape: content size or not, single segment, checksum or not,
    RLE/raw/compressed blocks, a skippable frame, several frames in a row."""
    data = mixed_data(300000)
    plain = zstandard.ZstdCompressor(write_checksum=True)
    return [
        plain.compress(data),
        zstandard.ZstdCompressor(write_content_size=False, write_checksum=False).compress(data),
        zstandard.ZstdCompressor(level=1).compress(b"x"),                      # single segment
        zstandard.ZstdCompressor().compress(b"\0" * 1000000),                  # RLE blocks
        zstandard.ZstdCompressor(level=1).compress(os.urandom(200000)),        # raw blocks
        b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"skip!",           # skippable
        zstandard.ZstdCompressor(threads=2, write_checksum=True).compress(data * 4),
        plain.compress(b""),
    ]


def test_zstd_reader_follows_every_frame_shape_and_concatenation():
    frames = zstd_frames()
    expected = b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(f) if not f.startswith(b"\x50\x2a")
                        else b"" for f in frames)
    assert decompress(b"".join(frames), "zstd", 100000) == expected
    for frame in frames:
        if frame.startswith(b"\x50\x2a"):
            continue
        assert decompress(frame, "zstd") == zstandard.ZstdDecompressor().decompressobj().decompress(frame)


@settings(max_examples=60)
@given(st.data())
def test_zstd_cut_anywhere_but_a_frame_boundary_is_detected(data):
    frames = zstd_frames()[2:6]
    blob = b"".join(frames)
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(1, len(frames) + 1)}
    cut = data.draw(st.integers(min_value=0, max_value=len(blob)))
    if cut in boundaries:
        decompress(blob[:cut], "zstd")  # a whole number of frames is a valid stream
    else:
        with pytest.raises((codecs.TruncatedStreamError, zstandard.ZstdError)):
            decompress(blob[:cut], "zstd")


def test_unknown_algorithm_in_a_manifest():
    with pytest.raises(ConfigError, match="unknown compression algorithm 'lz4' in manifest"):
        codecs.decompressing_reader(io.BytesIO(b""), "lz4")


# -- age ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keypair():
    identity = pyrage.x25519.Identity.generate()
    return identity, str(identity.to_public())


def test_no_encryption_by_default_or_when_disabled(keypair):
    assert codecs.encryption_settings(None) == {"mode": "none"}
    assert codecs.encryption_settings({}) == {"mode": "none"}
    assert codecs.encryption_settings({"enabled": False, "recipients": [keypair[1]]}) == {"mode": "none"}


def test_enabled_without_keys_is_an_error():
    # The seed's {enabled: true, keySecret: ...} must not quietly store plaintext.
    with pytest.raises(ConfigError, match="enabled but neither recipients nor a passphrase"):
        codecs.encryption_settings({"enabled": True, "keySecret": "backup-encryption-key"})


def test_recipients_settings_and_public_info(keypair):
    other = str(pyrage.x25519.Identity.generate().to_public())
    settings_ = codecs.encryption_settings({"recipients": [keypair[1], " %s " % other]})
    assert settings_["mode"] == "age" and settings_["recipients"] == [keypair[1], other]
    public = codecs.public_encryption_info(settings_)
    assert public == {"mode": "age", "recipients": [keypair[1], other]}


def test_recipients_as_text_with_comments(keypair):
    text = "# ops team\n\n%s\n  # old key removed\n" % keypair[1]
    assert codecs.encryption_settings({"recipients": text})["recipients"] == [keypair[1]]


def test_recipients_file_is_read(tmp_path, keypair):
    path = tmp_path / "recipients.txt"
    other = str(pyrage.x25519.Identity.generate().to_public())
    path.write_text("# created by age-keygen\n%s\n" % other)
    settings_ = codecs.encryption_settings({"recipients": [keypair[1]], "recipients_file": str(path)})
    assert settings_["recipients"] == [keypair[1], other]


def test_only_comments_is_an_error(tmp_path):
    path = tmp_path / "recipients.txt"
    path.write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="lists no age recipient"):
        codecs.encryption_settings({"recipients_file": str(path)})


def test_unresolved_passphrase_refs_still_encrypt(tmp_path, monkeypatch, passphrase_settings):
    """A caller that forgot resolve_secret_refs must not end up with plaintext backups."""
    path = tmp_path / "pp"
    path.write_text("correct horse\n")
    from_file = codecs.encryption_settings({"passphrase_file": str(path)})
    assert from_file["mode"] == "age" and from_file["key_object"] == codecs.ENVELOPE_OBJECT
    assert pyrage.passphrase.decrypt(from_file["_envelope"], "correct horse").startswith(b"AGE-SECRET-KEY-1")
    # A fresh data key per run: two runs never share it.
    assert from_file["recipients"] != passphrase_settings["recipients"]
    monkeypatch.setenv("BB_TEST_PP", "from env")
    from_env = codecs.encryption_settings({"passphrase_env": "BB_TEST_PP"})
    assert from_env["mode"] == "age" and b"-> scrypt " in from_env["_envelope"]


def test_missing_recipients_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="encryption.recipients_file"):
        codecs.encryption_settings({"recipients_file": str(tmp_path / "missing")})


@pytest.mark.parametrize("bad", ["age1notakey", "ssh-ed25519 AAAA", "AGE-SECRET-KEY-1ABC", ""])
def test_invalid_recipient_is_a_config_error_without_echoing_secrets(bad):
    with pytest.raises(ConfigError, match="invalid age recipient|lists no age recipient"):
        codecs.encryption_settings({"recipients": [bad, "age1qqqq"]} if bad else {"recipients": [" "]})


def test_recipients_and_passphrase_together_is_an_error(keypair):
    with pytest.raises(ConfigError, match="not both"):
        codecs.encryption_settings({"recipients": [keypair[1]], "passphrase": "x"})


@pytest.fixture(scope="module")
def passphrase_settings():
    # scrypt makes every passphrase operation take seconds here: share one envelope.
    return codecs.encryption_settings({"passphrase": "hunter2"})


def test_passphrase_envelope_never_leaks_the_identity_into_public_info(passphrase_settings):
    public = codecs.public_encryption_info(passphrase_settings)
    assert public["key_object"] == "key.age" and len(public["recipients"]) == 1
    assert "AGE-SECRET-KEY" not in repr(public) and "hunter2" not in repr(public)
    assert b"AGE-SECRET-KEY" not in passphrase_settings["_envelope"]
    # The envelope is real age passphrase encryption of the identity of the recipient.
    found = codecs.identities_for(public, passphrase="hunter2", envelope_bytes=passphrase_settings["_envelope"])
    assert [str(i.to_public()) for i in found] == public["recipients"]


def test_parse_identities_reads_age_keygen_files(keypair):
    identity, dummy = keypair
    text = "# created: 2024-01-15\n# public key: age1...\n%s\n" % identity
    parsed = codecs.parse_identities(text)
    assert [str(i) for i in parsed] == [str(identity)]


@pytest.mark.parametrize("text, message", [
    ("", "holds no AGE-SECRET-KEY line"),
    ("# only a comment\n", "holds no AGE-SECRET-KEY line"),
    ("AGE-SECRET-KEY-1NOTVALID\n", "not a valid X25519 secret key"),
])
def test_bad_identity_text(text, message):
    with pytest.raises(ConfigError, match=message):
        codecs.parse_identities(text)


def test_bad_identity_error_does_not_echo_the_line():
    with pytest.raises(ConfigError) as info:
        codecs.parse_identities("AGE-SECRET-KEY-1SOMETHINGSECRETISH\n")
    assert "SOMETHINGSECRETISH" not in str(info.value)


def test_identities_for_identity_text(keypair):
    identity, public = keypair
    settings_ = codecs.encryption_settings({"recipients": [public]})
    found = codecs.identities_for(codecs.public_encryption_info(settings_), identity_text=str(identity))
    assert [str(i) for i in found] == [str(identity)]


def test_wrong_passphrase_is_a_clear_decryption_error(passphrase_settings):
    with pytest.raises(DecryptionError, match="passphrase does not decrypt this backup's key envelope"):
        codecs.identities_for(codecs.public_encryption_info(passphrase_settings), passphrase="hunter3",
                              envelope_bytes=passphrase_settings["_envelope"])


def test_passphrase_for_a_recipients_backup_is_refused(keypair):
    info = codecs.public_encryption_info(codecs.encryption_settings({"recipients": [keypair[1]]}))
    with pytest.raises(DecryptionError, match="encrypted to recipients, not a passphrase"):
        codecs.identities_for(info, passphrase="x", envelope_bytes=b"")


def test_no_key_at_all_is_a_clear_error(keypair):
    info = codecs.public_encryption_info(codecs.encryption_settings({"recipients": [keypair[1]]}))
    with pytest.raises(DecryptionError, match="give encryption.identity_file"):
        codecs.identities_for(info)
