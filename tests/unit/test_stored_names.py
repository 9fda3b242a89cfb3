"""How a payload's stored object is named has one owner: engine/codecs.py ``stored_name``.

A real BackupRun names its objects with it and restore's verification checks manifests
against it, for every compression and with and without age encryption; a manifest whose
object name breaks the rule is refused.
"""

import io

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import keys as backup_keys
from ansible_collections.biometrics.backup.plugins.module_utils.engine import integrity
from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun, open_payload
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage


class BytesSource(Source):
    kind = "files"

    def produce(self, emit, context):
        emit("data.tar", io.BytesIO(b"stored names " * 4096))
        return {"files": 1}


def test_the_rule():
    assert codecs.stored_name("data.tar", "none", "none") == "data.tar"
    assert codecs.stored_name("data.tar", "gzip", "none") == "data.tar.gz"
    assert codecs.stored_name("data.tar", "zstd", "age") == "data.tar.zst.age"
    assert codecs.stored_name("dump", "none", "age") == "dump.age"
    assert codecs.stored_name("dump", "gzip", None) == "dump.gz"
    with pytest.raises(ValueError, match="unknown compression algorithm 'lz4'"):
        codecs.stored_name("dump", "lz4", "none")


@pytest.mark.parametrize("algorithm", codecs.ALGORITHMS)
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_backup_names_and_restore_checks_by_the_same_rule(tmp_path, algorithm, encrypted):
    storage = FilesystemStorage(str(tmp_path / "store"))
    identity = x25519.Identity.generate()
    encryption = {"recipients": [str(identity.to_public())]} if encrypted else None
    manifest = BackupRun("names", BytesSource({}), storage, {"algorithm": algorithm}, encryption).run()
    mode = "age" if encrypted else "none"
    assert [obj["name"] for obj in manifest["objects"] if obj.get("payload")] == [
        codecs.stored_name("data.tar", algorithm, mode)]
    ids = backup_keys.identities(storage, manifest, identity=str(identity) if encrypted else None)
    assert [entry["name"] for entry in integrity.verify_objects(storage, manifest, ids)] == [
        codecs.stored_name("data.tar", algorithm, mode)]
    # The same manifest claiming the other encryption mode breaks the rule: refused.
    forged = dict(manifest, encryption={"mode": "none" if encrypted else "age"})
    with pytest.raises(IntegrityError, match="does not carry payload data.tar as its name"):
        integrity.verify_objects(storage, forged, ids)


class CountingStorage(FilesystemStorage):
    """A real filesystem location that counts the objects opened for reading."""

    opened = 0

    def open_reader(self, key):
        CountingStorage.opened += 1
        return super().open_reader(key)


@pytest.mark.parametrize("compression", [None, {}, "zstd", {"algorithm": "lz4"}])
def test_a_payload_of_a_manifest_with_unknown_compression_is_refused_before_it_is_opened(tmp_path, compression):
    storage = CountingStorage(str(tmp_path / "store"))
    manifest = BackupRun("names", BytesSource({}), storage, {"algorithm": "zstd"}).run()
    forged = dict(manifest, compression=compression)
    CountingStorage.opened = 0
    with pytest.raises(IntegrityError, match="records unknown compression"):
        open_payload(storage, forged, "data.tar")
    with pytest.raises(IntegrityError, match="records unknown compression"):
        integrity.verify_objects(storage, forged, None)
    payload = [obj for obj in manifest["objects"] if obj.get("payload")][0]
    with pytest.raises(IntegrityError, match="records unknown compression"):
        pitr.Keys(storage).open(forged, payload)  # how a point-in-time restore reads each object
    assert CountingStorage.opened == 0
    stream = pitr.Keys(storage).open(manifest, payload)
    try:
        assert stream.read(13) == b"stored names "
    finally:
        stream.close()
    assert open_payload(storage, manifest, "data.tar").read(13) == b"stored names "
