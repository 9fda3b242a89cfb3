"""Errors that callers tell apart carry fields; nobody searches their messages.

* ObjectMismatchError (an IntegrityError): a stored object's size or SHA-256 differs from its
  manifest entry, with ``key``, ``field``, ``expected``, ``actual``. Restore decides with it
  whether a decode failure is better reported as damaged stored bytes.
* PartialPruneError (a StorageError): deleting backups stopped midway, with ``result``.
* Every BackupError has ``result`` (None unless the error reports one).

Real FilesystemStorage and real payloads throughout; one storage subclass injects a failing
delete. The messages users see are pinned to their exact text.
"""

import datetime
import gzip
import hashlib
import os

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import prune as pr
from ansible_collections.biometrics.backup.plugins.module_utils.engine import integrity
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    BackupError, ConfigError, IntegrityError, ObjectMismatchError, StorageError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import check_object
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import UTC, new_backup_id, to_iso

T0 = datetime.datetime(2024, 1, 15, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
def storage(tmp_path):
    (tmp_path / "backups").mkdir()
    return FilesystemStorage(str(tmp_path / "backups"))


def test_object_mismatch_messages_are_the_ones_users_saw():
    size = ObjectMismatchError("j/b/data.tar", "size", 10, 7)
    assert isinstance(size, IntegrityError)
    assert str(size) == "j/b/data.tar is 7 bytes, the manifest says 10 (truncated or replaced)"
    assert (size.key, size.field, size.expected, size.actual, size.note) == ("j/b/data.tar", "size", 10, 7, None)
    digest = ObjectMismatchError("j/b/data.tar", "sha256", "a" * 64, "b" * 64, note="it does not decode either")
    assert str(digest) == ("j/b/data.tar has SHA-256 %s, the manifest says %s (corrupted or swapped); "
                           "it does not decode either" % ("b" * 64, "a" * 64))
    with pytest.raises(ValueError):
        raise ObjectMismatchError("k", "colour", 1, 2)


def test_every_engine_error_has_a_result_none_by_default():
    assert BackupError("x").result is None and StorageError("x").result is None
    assert ObjectMismatchError("k", "size", 1, 2).result is None
    refused = pr.PruneRefusedError("too many", {"prune": []})
    assert isinstance(refused, ConfigError) and refused.result == {"prune": []}


def _stored(storage, key, data):
    storage.put_bytes(key, data)
    return {"name": key.rsplit("/", 1)[-1], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("field", ["size", "sha256"])
def test_check_object_raises_the_mismatch_with_its_fields(storage, field):
    entry = _stored(storage, "j/b/data.tar", b"0123456789")
    wrong = dict(entry, size=11) if field == "size" else dict(entry, sha256="0" * 64)
    with pytest.raises(ObjectMismatchError) as caught:
        check_object(storage, "j/b/data.tar", wrong, "none")
    error = caught.value
    assert (error.key, error.field) == ("j/b/data.tar", field)
    assert (error.expected, error.actual) == ((11, 10) if field == "size" else ("0" * 64, entry["sha256"]))


def _gzip_backup(storage, payload):
    backup_id = new_backup_id(T0)
    key = mf.object_key("j", backup_id, "data.tar.gz")
    obj = dict(_stored(storage, key, payload), payload="data.tar")
    manifest = mf.build(
        backup_id=backup_id, job="j", kind="files", started_at=to_iso(T0),
        finished_at=to_iso(T0 + datetime.timedelta(seconds=5)), objects=[obj],
        compression={"algorithm": "gzip", "level": 6}, encryption={"mode": "none"},
        tool_versions={}, stats={"files": 1})
    Catalog(storage).publish(manifest)
    return manifest, key


def test_a_damaged_payload_is_reported_as_damaged_bytes_not_as_a_decode_error(storage):
    plain = os.urandom(1 << 16)
    manifest, key = _gzip_backup(storage, gzip.compress(plain))
    assert integrity.verify_objects(storage, manifest, None)  # intact: verifies
    path = os.path.join(storage.root, *key.split("/"))
    with open(path, "r+b") as handle:  # flip one byte in the middle: gzip fails before the hash ends
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ObjectMismatchError) as caught:
        integrity.verify_objects(storage, manifest, None)
    error = caught.value
    assert (error.key, error.field, error.note) == (key, "sha256", "it does not decode either")
    assert error.expected == manifest["objects"][0]["sha256"] and error.actual != error.expected
    assert str(error).endswith("(corrupted or swapped); it does not decode either")


def test_a_truncated_payload_is_reported_once(storage):
    plain = os.urandom(1 << 16)
    manifest, key = _gzip_backup(storage, gzip.compress(plain))
    path = os.path.join(storage.root, *key.split("/"))
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 100)
    with pytest.raises(IntegrityError) as caught:
        integrity.verify_objects(storage, manifest, None)
    error = caught.value
    # Decoding fails first (the stream ends early); the plain check names the size.
    assert isinstance(error, ObjectMismatchError) and error.field == "size"
    assert error.expected - error.actual == 100


class FailingDelete(FilesystemStorage):
    """A real directory whose deletes under one backup fail (an injected storage fault)."""

    failing = None

    def delete(self, key):
        if self.failing and key.startswith(self.failing):
            raise StorageError("cannot delete %s: injected fault" % key)
        return super().delete(key)


def test_a_prune_stopped_midway_carries_its_result(tmp_path):
    (tmp_path / "backups").mkdir()
    storage = FailingDelete(str(tmp_path / "backups"))
    catalog = Catalog(storage)
    made = []
    for day in range(4):
        started = T0 + datetime.timedelta(days=day)
        backup_id = new_backup_id(started)
        obj = _stored(storage, mf.object_key("j", backup_id, "data.tar"), b"x%d" % day)
        obj["payload"] = "data.tar"
        manifest = mf.build(
            backup_id=backup_id, job="j", kind="files", started_at=to_iso(started),
            finished_at=to_iso(started + datetime.timedelta(seconds=5)), objects=[obj],
            compression={"algorithm": "none", "level": 0}, encryption={"mode": "none"},
            tool_versions={}, stats={"files": 1})
        catalog.publish(manifest)
        made.append(backup_id)
    # keep_last 1: the three older go, newest first; the second deletion fails.
    storage.failing = "j/%s/" % made[1]
    with pytest.raises(pr.PartialPruneError) as caught:
        pr.prune(storage, "j", {"keep_last": 1}, min_keep=1, now=T0 + datetime.timedelta(days=5))
    error = caught.value
    assert isinstance(error, StorageError)
    assert error.backup_id == made[1]
    assert error.result["deleted"] == [made[2]] and error.result["changed"] is True
    assert str(error) == ("job j: deleting backup %s failed after 1 deletions: cannot delete j/%s/%s: "
                          "injected fault" % (made[1], made[1], mf.MANIFEST_NAME))
