"""engine/pipeline and engine/backup on a real directory: streaming, integrity, bounded memory.

Everything here runs the real stages (zstandard, zlib, pyrage/age, OS pipes, threads) and
stores into FilesystemStorage under tmp_path. S3 and stock-tool compatibility are in
tests/integration/.
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pyrage
import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun, open_payload
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    BackupError, ConfigError, DecryptionError, IntegrityError, SourceError, StorageError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import (
    PlaintextStream, ProducerStream, Progress, check_object, store_stream)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage

MiB = 1 << 20


class GeneratedSource:
    """A readable of ``size`` deterministic, moderately compressible bytes (never all in memory)."""

    def __init__(self, size, seed=0, fail_at=None, block=None):
        self.size = size
        self.fail_at = fail_at
        self.pos = 0
        self.sha256 = hashlib.sha256()
        self.reads = []  # (thread name, offset) of every read
        self._block = block or (hashlib.sha256(b"%d" % seed).digest() * 2048 + b"biometric template row\n" * 8192)

    def read(self, size=-1):
        self.reads.append((threading.current_thread().name, self.pos))
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError(5, "Input/output error")
        size = self.size - self.pos if size is None or size < 0 else min(size, self.size - self.pos)
        start = self.pos % len(self._block)
        chunk = (self._block[start:] + self._block)[:size] if size else b""
        # Vary the data so that no two chunks are identical (position stamp).
        chunk = (b"%016x" % self.pos + chunk[16:]) if len(chunk) > 16 else chunk
        self.pos += len(chunk)
        self.sha256.update(chunk)
        return chunk


def read_all(stream, size=MiB):
    digest, total = hashlib.sha256(), 0
    while True:
        chunk = stream.read(size)
        if not chunk:
            return digest.hexdigest(), total
        digest.update(chunk)
        total += len(chunk)


@pytest.fixture
def storage(tmp_path):
    return FilesystemStorage(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def identity():
    return pyrage.x25519.Identity.generate()


@pytest.fixture(scope="module")
def passphrase_encryption():
    # scrypt takes seconds on these machines: one envelope for the module.
    settings = codecs.encryption_settings({"passphrase": "correct horse battery"})
    identities = codecs.identities_for(codecs.public_encryption_info(settings), passphrase="correct horse battery",
                                       envelope_bytes=settings["_envelope"])
    return settings, identities


def encryption_for(mode, identity, passphrase_encryption):
    if mode == "none":
        return codecs.encryption_settings(None), None
    if mode == "recipients":
        return codecs.encryption_settings({"recipients": [str(identity.to_public())]}), [identity]
    return passphrase_encryption


def stored_bytes(tmp_path, key):
    return (tmp_path / "store" / key).read_bytes()


# -- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("mode", ["none", "recipients", "passphrase"])
def test_store_then_read_back(storage, tmp_path, identity, passphrase_encryption, algorithm, mode):
    compression = codecs.compression_settings({"algorithm": algorithm, "level": 1 if algorithm != "none" else None})
    encryption, identities = encryption_for(mode, identity, passphrase_encryption)
    source = GeneratedSource(5 * MiB + 123)
    result = store_stream(source, storage, "job/b/payload", compression, encryption)
    data = stored_bytes(tmp_path, "job/b/payload")
    assert result["size"] == len(data) and result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["raw_bytes"] == source.size
    if mode != "none":
        assert data.startswith(b"age-encryption.org/v1\n")
    elif algorithm == "zstd":
        assert data[:4] == b"\x28\xb5\x2f\xfd"
    elif algorithm == "gzip":
        assert data[:2] == b"\x1f\x8b"
    stream = PlaintextStream(storage, "job/b/payload", dict(result, name="payload"), algorithm, identities)
    try:
        assert read_all(stream) == (source.sha256.hexdigest(), source.size)
        summary = stream.finish()
    finally:
        stream.close()
    assert summary == {"name": "payload", "size": result["size"], "sha256": result["sha256"], "plain_bytes": source.size}
    assert storage.list("job/") == [info for info in storage.list("job/") if info.key == "job/b/payload"]


def test_empty_payload_round_trips(storage, identity):
    for algorithm in codecs.ALGORITHMS:
        encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]})
        result = store_stream(io.BytesIO(b""), storage, "j/e/" + algorithm, codecs.compression_settings({"algorithm": algorithm}), encryption)
        summary = check_object(storage, "j/e/" + algorithm, dict(result, name=algorithm), algorithm, [identity])
        assert summary["plain_bytes"] == 0


def test_raw_bytes_are_per_payload_when_a_progress_spans_a_run(storage):
    progress = Progress()
    settings = codecs.compression_settings({"algorithm": "zstd", "level": 1})
    first = store_stream(GeneratedSource(3 * MiB), storage, "j/x/a", settings, {"mode": "none"}, progress)
    second = store_stream(GeneratedSource(2 * MiB), storage, "j/x/b", settings, {"mode": "none"}, progress)
    assert (first["raw_bytes"], second["raw_bytes"]) == (3 * MiB, 2 * MiB)
    assert progress.raw_bytes == 5 * MiB
    assert progress.stored_bytes == first["size"] + second["size"]


def test_progress_reports_while_streaming(storage):
    reports = []
    progress = Progress(lambda raw, stored, elapsed: reports.append((raw, stored, elapsed)), interval=0)
    store_stream(GeneratedSource(4 * MiB), storage, "j/x/p", codecs.compression_settings({"algorithm": "gzip", "level": 1}),
                 {"mode": "none"}, progress)
    assert len(reports) >= 3
    raws = [r[0] for r in reports]
    assert raws == sorted(raws) and raws[-1] == 4 * MiB


# -- integrity ---------------------------------------------------------------------------

def stored_backup(storage, identity, algorithm="zstd", encrypted=True, size=3 * MiB, key="j/b/payload", seed=0):
    encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]} if encrypted else None)
    result = store_stream(GeneratedSource(size, seed=seed), storage, key, codecs.compression_settings({"algorithm": algorithm, "level": 1}), encryption)
    return dict(result, name=key.rsplit("/", 1)[-1])


def check(storage, key, expected, algorithm, identities):
    return check_object(storage, key, expected, algorithm, identities)


@pytest.mark.parametrize("algorithm", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "appended", "swapped", "emptied"])
def test_damaged_objects_are_integrity_errors(storage, tmp_path, identity, algorithm, encrypted, damage):
    expected = stored_backup(storage, identity, algorithm, encrypted)
    path = tmp_path / "store" / "j" / "b" / "payload"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "flipped byte":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1:])
    elif damage == "appended":
        path.write_bytes(data + b"\n")
    elif damage == "swapped":
        # A valid object of the same shape from another backup put in its place.
        other = stored_backup(storage, identity, algorithm, encrypted, key="j/other/payload", seed=7)
        assert other["sha256"] != expected["sha256"]
        path.write_bytes((tmp_path / "store" / "j" / "other" / "payload").read_bytes())
    elif damage == "emptied":
        path.write_bytes(b"")
    identities = [identity] if encrypted else None
    with pytest.raises(IntegrityError) as info:
        check(storage, "j/b/payload", expected, algorithm, identities)
    assert "j/b/payload" in str(info.value)


def test_finish_names_size_and_hash_mismatches(storage, tmp_path, identity):
    expected = stored_backup(storage, identity, "none", encrypted=False)
    with pytest.raises(IntegrityError, match=r"j/b/payload is \d+ bytes, the manifest says %d \(truncated or replaced\)" % (expected["size"] + 1)):
        check(storage, "j/b/payload", dict(expected, size=expected["size"] + 1), "none", None)
    with pytest.raises(IntegrityError, match=r"has SHA-256 %s, the manifest says 0{64} \(corrupted or swapped\)" % expected["sha256"]):
        check(storage, "j/b/payload", dict(expected, sha256="0" * 64), "none", None)


def test_finish_hashes_trailing_bytes_the_reader_never_needed(storage, tmp_path, identity):
    """Bytes after the end of the zstd/age stream must still count (an appended object)."""
    expected = stored_backup(storage, identity, "zstd", encrypted=False)
    path = tmp_path / "store" / "j" / "b" / "payload"
    path.write_bytes(path.read_bytes() + b"\x00" * 10)
    stream = PlaintextStream(storage, "j/b/payload", expected, "zstd")
    try:
        with pytest.raises(IntegrityError):
            read_all(stream)
            stream.finish()
    finally:
        stream.close()


def test_wrong_key_is_a_clear_decryption_error(storage, identity):
    expected = stored_backup(storage, identity)
    stranger = pyrage.x25519.Identity.generate()
    with pytest.raises(DecryptionError, match="j/b/payload does not decrypt with the given key"):
        check(storage, "j/b/payload", expected, "zstd", [stranger])


def test_wrong_passphrase_key_is_a_clear_decryption_error(storage, passphrase_encryption, identity):
    settings, _identities = passphrase_encryption
    result = store_stream(GeneratedSource(MiB), storage, "j/p/payload", codecs.compression_settings({"algorithm": "zstd"}), settings)
    with pytest.raises(DecryptionError, match="does not decrypt with the given key"):
        check(storage, "j/p/payload", dict(result, name="payload"), "zstd", [identity])


def test_missing_object_is_not_found(storage):
    with pytest.raises(StorageError, match="object j/none/payload not found"):
        check(storage, "j/none/payload", {"name": "payload", "size": 0, "sha256": "0" * 64}, "none", None)


# -- failures leave nothing behind --------------------------------------------------------

@pytest.mark.parametrize("encrypted", [False, True])
def test_a_failing_source_publishes_nothing(storage, tmp_path, identity, encrypted):
    encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]} if encrypted else None)
    source = GeneratedSource(20 * MiB, fail_at=6 * MiB)
    with pytest.raises(SourceError, match="reading the backup source failed: .*Input/output error"):
        store_stream(source, storage, "j/b/payload", codecs.compression_settings({"algorithm": "zstd", "level": 1}), encryption)
    assert storage.list("") == []
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []


def test_a_source_raising_a_backup_error_keeps_its_message(storage, identity):
    class Broken:
        def __init__(self):
            self.calls = 0

        def read(self, size=-1):
            self.calls += 1
            if self.calls > 3:
                raise SourceError("pg_dump exited with status 1: permission denied for table secrets")
            return b"x" * size

    encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]})
    with pytest.raises(SourceError, match="^pg_dump exited with status 1"):
        store_stream(Broken(), storage, "j/b/payload", codecs.compression_settings({"algorithm": "gzip"}), encryption)
    assert storage.list("") == []


# -- streaming behaviour -------------------------------------------------------------------

class RecordingStorage(FilesystemStorage):
    """The real filesystem backend, recording which thread writes stored bytes and when."""

    def __init__(self, path, events):
        super().__init__(path)
        self.events = events

    def open_writer(self, key):
        writer = super().open_writer(key)
        events = self.events
        original = writer.write

        def write(data):
            events.append(("store", threading.current_thread().name, len(data)))
            return original(data)

        writer.write = write
        return writer


def test_compression_and_encryption_run_in_separate_overlapping_stages(tmp_path, identity):
    events = []
    storage = RecordingStorage(str(tmp_path / "store"), events)
    source = GeneratedSource(64 * MiB)
    original_read = source.read

    def read(size=-1):
        events.append(("read", threading.current_thread().name, size))
        return original_read(size)

    source.read = read
    encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]})
    store_stream(source, storage, "j/b/p", codecs.compression_settings({"algorithm": "none"}), encryption)
    readers = {name for kind, name, dummy in events if kind == "read"}
    storers = {name for kind, name, dummy in events if kind == "store"}
    # The source is read (and compressed) in the 'compress' thread, age encrypts in the
    # caller's thread, and the 'store' thread hashes and stores: three stages.
    assert readers == {"compress"} and storers == {"store"}
    kinds = [kind for kind, dummy_name, dummy_size in events]
    first_store, last_read = kinds.index("store"), len(kinds) - 1 - kinds[::-1].index("read")
    # Streaming, not staging: bytes reach storage long before the source is exhausted, and
    # reads and stores interleave all the way through.
    assert first_store < kinds.index("read") + 20
    assert first_store < last_read
    switches = sum(1 for a, b in zip(kinds, kinds[1:]) if a != b)
    assert switches > 50


def test_signals_during_streaming_lose_no_bytes(storage, identity):
    """A signal interrupting a pipe write must not drop data (short writes are retried)."""
    previous = signal.signal(signal.SIGUSR1, lambda *args: None)
    stop = threading.Event()

    def pester():
        while not stop.is_set():
            for thread in threading.enumerate():
                if thread.name in ("compress", "decrypt", "store") and thread.ident is not None:
                    try:
                        signal.pthread_kill(thread.ident, signal.SIGUSR1)
                    except (ProcessLookupError, OSError):
                        pass
            time.sleep(0.0002)

    pest = threading.Thread(target=pester, daemon=True)
    pest.start()
    try:
        for algorithm in ("none", "zstd"):
            source = GeneratedSource(24 * MiB)
            encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]})
            key = "j/sig/" + algorithm
            result = store_stream(source, storage, key, codecs.compression_settings({"algorithm": algorithm, "level": 1}), encryption)
            stream = PlaintextStream(storage, key, dict(result, name=algorithm), algorithm, [identity])
            try:
                assert read_all(stream) == (source.sha256.hexdigest(), source.size)
                stream.finish()
            finally:
                stream.close()
    finally:
        stop.set()
        pest.join()
        signal.signal(signal.SIGUSR1, previous)


MEMORY_PROBE = textwrap.dedent("""
    import hashlib, json, resource, sys, tempfile
    import pyrage
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import check_object, store_stream
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage

    size, algorithm, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    block = hashlib.sha256(b"x").digest() * (1 << 15)  # 1 MiB

    class Source:
        pos = 0
        def read(self, n=-1):
            n = min(n, size - self.pos)
            self.pos += n
            return (b"%016x" % self.pos + block[16:n]) if n > 16 else block[:n]

    identity = pyrage.x25519.Identity.generate()
    storage = FilesystemStorage(directory)
    encryption = codecs.encryption_settings({"recipients": [str(identity.to_public())]})
    compression = codecs.compression_settings({"algorithm": algorithm, "level": 3})
    result = store_stream(Source(), storage, "j/b/p", compression, encryption)
    check_object(storage, "j/b/p", dict(result, name="p"), algorithm, [identity])
    storage.delete("j/b/p")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so the child would report
    # the parent's (pytest's) peak instead of its own.
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss_kib": hwm, "stored": result["size"],
                      "raw": result["raw_bytes"]}))
""")


def peak_rss_kib(size, algorithm, directory):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(size), algorithm, str(directory)],
                         check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    result = json.loads(out)
    assert result["raw"] == size
    return result["maxrss_kib"]


@pytest.mark.parametrize("algorithm, small, large", [
    ("zstd", 64 * MiB, 1536 * MiB),   # zstd level 3 with worker threads + age
    ("none", 32 * MiB, 384 * MiB),    # every byte through age and onto disk
])
def test_peak_memory_does_not_grow_with_payload_size(tmp_path, algorithm, small, large):
    """Property: store + full read-back of 1.5 GiB peaks at about the same RSS as 64 MiB."""
    low = peak_rss_kib(small, algorithm, tmp_path / "s")
    high = peak_rss_kib(large, algorithm, tmp_path / "l")
    assert high < 256 * 1024, "peak RSS %d KiB for %d bytes" % (high, large)
    assert high - low < 24 * 1024, "peak RSS grew from %d to %d KiB between %d and %d bytes" % (low, high, small, large)


# -- ProducerStream ------------------------------------------------------------------------

def test_producer_stream_delivers_and_reports_the_producer_failure_after_its_data():
    def produce(out):
        out.write(b"a" * 300000)
        raise RuntimeError("tar: /data/x: Cannot open: Permission denied")

    stream = ProducerStream(produce, "tar")
    data = stream.read(1 << 20)
    assert data == b"a" * 300000
    with pytest.raises(SourceError, match="producing the backup stream failed: tar: /data/x: Cannot open"):
        stream.read(1 << 20)
    stream.close()


def test_producer_stream_passes_backup_errors_through():
    def produce(out):
        raise SourceError("redis refused: NOAUTH")

    stream = ProducerStream(produce)
    with pytest.raises(SourceError, match="^redis refused: NOAUTH$"):
        stream.read(10)


def test_producer_stream_close_unblocks_a_producer_when_the_consumer_gives_up():
    finished = threading.Event()

    def produce(out):
        try:
            for dummy in range(1000):
                out.write(b"z" * MiB)  # far more than a pipe holds
        finally:
            finished.set()

    stream = ProducerStream(produce)
    assert stream.read(1000) == b"z" * 1000
    stream.close()
    assert finished.wait(10)


def test_producer_stream_through_store_stream(storage, identity):
    def produce(out):
        for index in range(40):
            out.write((b"%08d " % index) * 20000)

    result = store_stream(ProducerStream(produce), storage, "j/p/x", codecs.compression_settings({"algorithm": "zstd"}),
                          codecs.encryption_settings({"recipients": [str(identity.to_public())]}))
    assert result["raw_bytes"] == 40 * 9 * 20000
    assert check_object(storage, "j/p/x", dict(result, name="x"), "zstd", [identity])["plain_bytes"] == 40 * 9 * 20000


# -- BackupRun end to end ------------------------------------------------------------------

class ChunkSource(Source):
    """A tiny real source: emits generated payloads and records what storage showed meanwhile."""

    kind = "files"

    def __init__(self, options):
        super().__init__(options)
        self.watched_storage = None  # the storage a test lists while the source produces
        self.seen_after_payload = None
        self.payload_sha = {}

    def describe(self):
        return dict(self.options.get("describe", {"path": "/data"}))

    def preflight(self):
        if self.options.get("unreachable"):
            raise SourceError("cannot reach /data: No such file or directory")

    def tool_versions(self):
        return {"generator": "1"}

    def produce(self, emit, context):
        payloads = self.options.get("payloads", {"data.tar": 2 * MiB})
        for index, (name, size) in enumerate(payloads.items()):
            source = GeneratedSource(size, seed=index, fail_at=self.options.get("fail_at") if index else None)
            emit(name, source)
            self.payload_sha[name] = source.sha256.hexdigest()
            # What anyone listing the storage right now would see.
            if self.watched_storage is not None:
                self.seen_after_payload = [info.key for info in self.watched_storage.list("")]
            if self.options.get("fail_after_first"):
                raise SourceError("source died after its first payload")
        if self.options.get("twice"):
            emit(list(payloads)[0], io.BytesIO(b"again"))
        return {"files": 3, "bytes": sum(payloads.values())}


class SecretSource(ChunkSource):
    requires_encryption = True


def test_backup_run_stores_payloads_then_the_manifest_last(storage, identity):
    source = ChunkSource({"payloads": {"data.tar": 3 * MiB, "meta.json": 1000}})
    source.watched_storage = storage
    run = BackupRun("files-main", source, storage, {"algorithm": "zstd", "level": 3},
                    {"recipients": [str(identity.to_public())]})
    manifest = run.run()
    prefix = "files-main/%s/" % manifest["id"]
    # While the source was still producing, the payloads were there and the manifest not.
    assert prefix + "data.tar.zst.age" in source.seen_after_payload
    assert prefix + "manifest.json" not in source.seen_after_payload
    assert Catalog(storage).latest("files-main")["id"] == manifest["id"]
    stored = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert stored == manifest
    assert manifest["job"] == "files-main" and manifest["kind"] == "files" and manifest["status"] == "complete"
    assert manifest["encryption"] == {"mode": "age", "recipients": [str(identity.to_public())]}
    assert manifest["compression"] == {"algorithm": "zstd", "level": 3}
    assert manifest["stats"] == {"files": 3, "bytes": 3 * MiB + 1000}
    assert manifest["tool_versions"]["generator"] == "1" and "engine" in manifest["tool_versions"]
    assert [o["name"] for o in manifest["objects"]] == ["data.tar.zst.age", "meta.json.zst.age"]
    assert [o["raw_bytes"] for o in manifest["objects"]] == [3 * MiB, 1000]
    assert manifest["raw_bytes"] == 3 * MiB + 1000
    for obj in manifest["objects"]:
        data = storage.get_bytes(prefix + obj["name"])
        assert obj["size"] == len(data) and obj["sha256"] == hashlib.sha256(data).hexdigest()
        stream = open_payload(storage, manifest, obj["payload"], [identity])
        try:
            assert read_all(stream)[0] == source.payload_sha[obj["payload"]]
            stream.finish()
        finally:
            stream.close()


def test_backup_run_with_a_passphrase_stores_the_key_envelope(storage, passphrase_encryption):
    source = ChunkSource({})
    run = BackupRun("pp", source, storage, {"algorithm": "gzip"}, {"passphrase": "correct horse battery"})
    manifest = run.run()
    key_entry = [o for o in manifest["objects"] if o.get("role") == "key"]
    assert [o["name"] for o in key_entry] == ["key.age"]
    assert manifest["encryption"]["key_object"] == "key.age"
    envelope = storage.get_bytes("pp/%s/key.age" % manifest["id"])
    assert hashlib.sha256(envelope).hexdigest() == key_entry[0]["sha256"]
    identities = codecs.identities_for(manifest["encryption"], passphrase="correct horse battery", envelope_bytes=envelope)
    stream = open_payload(storage, manifest, "data.tar", identities)
    try:
        assert read_all(stream)[0] == source.payload_sha["data.tar"]
        stream.finish()
    finally:
        stream.close()
    assert "correct horse" not in json.dumps(manifest) and "AGE-SECRET-KEY" not in json.dumps(manifest)


@pytest.mark.parametrize("options, error, message", [
    ({"fail_after_first": True}, SourceError, "source died after its first payload"),
    ({"payloads": {"a": MiB, "b": 4 * MiB}, "fail_at": 2 * MiB}, SourceError, "Input/output error"),
    ({"payloads": {}}, BackupError, "source files produced no data"),
    ({"twice": True}, BackupError, "emitted payload data.tar twice"),
    ({"describe": {"host": "x", "password": "hunter2"}}, ConfigError, "secret-looking field manifest.source.password"),
])
def test_a_failed_run_leaves_nothing_visible(storage, tmp_path, identity, options, error, message):
    run = BackupRun("j", ChunkSource(options), storage, None, {"recipients": [str(identity.to_public())]})
    with pytest.raises(error, match=message):
        run.run()
    assert storage.list("") == []
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
    catalog = Catalog(storage)
    assert catalog.scan() == [] and catalog.orphans == [] and catalog.junk == []


def test_preflight_failure_writes_nothing(storage):
    with pytest.raises(SourceError, match="cannot reach /data"):
        BackupRun("j", ChunkSource({"unreachable": True}), storage).run()
    assert storage.list("") == []


def test_plan_reads_and_writes_nothing(storage, identity):
    run = BackupRun("j", ChunkSource({}), storage, {"algorithm": "gzip", "level": 9},
                    {"recipients": [str(identity.to_public())]})
    plan = run.plan()
    assert plan["kind"] == "files" and plan["compression"]["level"] == 9
    assert plan["encryption"] == {"mode": "age", "recipients": [str(identity.to_public())]}
    assert not os.path.exists(storage.root)  # not even the storage directory was created


def test_sources_holding_secrets_refuse_to_run_unencrypted(storage, identity):
    with pytest.raises(ConfigError, match="stores secrets: refusing to back it up without encryption"):
        BackupRun("k8s", SecretSource({}), storage, None, None)
    with pytest.raises(ConfigError, match="refusing"):
        BackupRun("k8s", SecretSource({}), storage, None, {"enabled": False, "recipients": [str(identity.to_public())]})
    manifest = BackupRun("k8s", SecretSource({}), storage, None, {"recipients": [str(identity.to_public())]}).run()
    assert manifest["encryption"]["mode"] == "age"
    assert all(o["name"].endswith(".age") for o in manifest["objects"])


class InterruptingStorage(FilesystemStorage):
    """Real filesystem storage where writing the catalog index is interrupted (Ctrl-C)."""

    def put_bytes(self, key, data):
        if key.endswith("/index.json"):
            raise KeyboardInterrupt()
        return super().put_bytes(key, data)


def test_an_interrupt_after_the_manifest_keeps_the_complete_backup(tmp_path):
    storage = InterruptingStorage(str(tmp_path / "store"))
    run = BackupRun("j", ChunkSource({}), storage)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    found = Catalog(FilesystemStorage(str(tmp_path / "store")), repair_index=False).scan("j")
    assert [m["id"] for m in found] == [run.backup_id]
    check_object(storage, "j/%s/data.tar.zst" % run.backup_id, found[0]["objects"][0], "zstd")
