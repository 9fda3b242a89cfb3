"""engine/catalog on a real directory (FilesystemStorage): listing, selection, the index cache.

The same catalog against real S3 (and its request count) is in
tests/integration/test_storage_s3.py.
"""

import datetime
import hashlib
import json
import os
import threading

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import INDEX_NAME, Catalog, upload_summary
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, NotFoundError, StorageError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import plan as prune_plan
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.base import MissingLocationError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import UTC, new_backup_id, to_iso

T0 = datetime.datetime(2024, 1, 15, 2, 0, 0, tzinfo=UTC)


class CountingStorage:
    """A real storage whose list/get calls are counted (instrumentation, not a fake)."""

    def __init__(self, inner):
        self._inner = inner
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def list(self, prefix=""):
        self.calls.append(("list", prefix))
        return self._inner.list(prefix)

    def get_bytes(self, key):
        self.calls.append(("get", key))
        return self._inner.get_bytes(key)

    def put_bytes(self, key, data):
        self.calls.append(("put", key))
        return self._inner.put_bytes(key, data)

    def reset(self):
        self.calls = []

    def count(self, op):
        return sum(1 for call in self.calls if call[0] == op)


@pytest.fixture
def storage(tmp_path):
    (tmp_path / "backups").mkdir()  # an existing, empty location (a missing one is an error)
    return FilesystemStorage(str(tmp_path / "backups"))


def make_backup(catalog, job, started, kind="files", parent=None, payload=b"payload", duration=60, backup_id=None):
    """Store one payload object and publish its manifest, like BackupRun does."""
    backup_id = backup_id or new_backup_id(started)
    name = "data.tar"
    catalog.storage.put_bytes(mf.object_key(job, backup_id, name), payload)
    manifest = mf.build(
        backup_id=backup_id, job=job, kind=kind, started_at=to_iso(started),
        finished_at=to_iso(started + datetime.timedelta(seconds=duration)),
        objects=[{"name": name, "payload": name, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}],
        compression={"algorithm": "none", "level": 0}, encryption={"mode": "none"},
        tool_versions={}, stats={"files": 1}, parent=parent)
    catalog.publish(manifest)
    return manifest


def ids(manifests):
    return [m["id"] for m in manifests]


def test_scan_lists_complete_backups_newest_first_with_verification(storage):
    catalog = Catalog(storage)
    made = [make_backup(catalog, "web", T0 + datetime.timedelta(hours=h)) for h in (0, 2, 1)]
    other = make_backup(catalog, "db", T0, kind="postgres")
    found = catalog.scan("web")
    assert ids(found) == [made[1]["id"], made[2]["id"], made[0]["id"]]
    assert all(m["verification"] is None for m in found)
    assert found[0]["objects"] == made[1]["objects"]
    # All jobs: the same order by time (db's backup started with web's oldest, at T0).
    assert set(ids(catalog.scan())) == set(ids(made) + [other["id"]])
    assert ids(catalog.scan())[:2] == [made[1]["id"], made[2]["id"]]
    assert catalog.jobs() == ["db", "web"]
    assert catalog.junk == [] and catalog.orphans == []


def test_all_jobs_scan_is_ordered_by_time_across_jobs(storage):
    catalog = Catalog(storage)
    a = make_backup(catalog, "a", T0 + datetime.timedelta(hours=1))
    b = make_backup(catalog, "b", T0 + datetime.timedelta(hours=2))
    c = make_backup(catalog, "a", T0)
    assert ids(catalog.scan()) == [b["id"], a["id"], c["id"]]


def test_backups_of_the_same_second_keep_start_order(storage):
    catalog = Catalog(storage)
    first = make_backup(catalog, "fast", T0.replace(microsecond=100000))
    second = make_backup(catalog, "fast", T0.replace(microsecond=900000))
    assert first["started_at"] == second["started_at"]
    assert catalog.latest("fast")["id"] == second["id"]


def test_times_with_offsets_sort_as_instants(storage):
    catalog = Catalog(storage)
    a = make_backup(catalog, "j", T0)
    b = make_backup(catalog, "j", T0 + datetime.timedelta(minutes=30))
    # Rewrite b's manifest with an equivalent offset spelling: '...+01:00' sorts after 'Z' as text.
    raw = json.loads(storage.get_bytes(mf.object_key("j", a["id"], mf.MANIFEST_NAME)))
    raw["started_at"] = (T0 + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00")  # == T0
    storage.put_bytes(mf.object_key("j", a["id"], mf.MANIFEST_NAME), mf.dumps(raw))
    assert ids(catalog.scan("j")) == [b["id"], a["id"]]


def test_latest_get_resolve(storage):
    catalog = Catalog(storage)
    old = make_backup(catalog, "pg", T0, kind="postgres")
    new = make_backup(catalog, "pg", T0 + datetime.timedelta(days=1), kind="postgres")
    assert catalog.latest("pg")["id"] == new["id"]
    assert catalog.get("pg", old["id"])["id"] == old["id"]
    assert catalog.resolve("pg", None)["id"] == new["id"]
    assert catalog.resolve("pg", "")["id"] == new["id"]
    assert catalog.resolve("pg", "latest")["id"] == new["id"]
    assert catalog.resolve("pg", old["id"])["id"] == old["id"]
    # An ISO time: newest finished at or before it (old finished at T0+60 s).
    assert catalog.resolve("pg", "2024-01-15T03:00:00Z")["id"] == old["id"]
    assert catalog.resolve("pg", "2024-01-15T04:00:00+01:00")["id"] == old["id"]
    assert catalog.resolve("pg", "2024-01-17")["id"] == new["id"]


def test_latest_by_kind(storage):
    catalog = Catalog(storage)
    files = make_backup(catalog, "mixed", T0, kind="files")
    make_backup(catalog, "mixed", T0 + datetime.timedelta(hours=1), kind="directory_sync")
    assert catalog.latest("mixed", kind="files")["id"] == files["id"]
    with pytest.raises(NotFoundError, match="job mixed has no complete backup yet"):
        catalog.latest("mixed", kind="postgres")


def test_at_or_before_uses_finish_time_and_boundaries(storage):
    catalog = Catalog(storage)
    a = make_backup(catalog, "j", T0, duration=600)                                   # done 02:10
    b = make_backup(catalog, "j", T0 + datetime.timedelta(hours=1), duration=600)     # done 03:10
    assert catalog.at_or_before("j", "2024-01-15T02:10:00Z")["id"] == a["id"]  # exactly at: included
    assert catalog.at_or_before("j", "2024-01-15T03:09:59Z")["id"] == a["id"]  # b not finished yet
    assert catalog.at_or_before("j", "2024-01-15T03:10:00Z")["id"] == b["id"]
    assert catalog.at_or_before("j", T0 + datetime.timedelta(days=3))["id"] == b["id"]
    with pytest.raises(NotFoundError, match="no complete backup at or before 2024-01-15T02:09:59Z"):
        catalog.at_or_before("j", "2024-01-15T02:09:59Z")


def test_not_found_messages(storage):
    catalog = Catalog(storage)
    with pytest.raises(NotFoundError, match="job none has no complete backup yet"):
        catalog.resolve("none", "latest")
    make_backup(catalog, "j", T0)
    with pytest.raises(NotFoundError, match="has no complete backup with id 20200101T000000Z-000000"):
        catalog.resolve("j", "20200101T000000Z-000000")
    with pytest.raises(NotFoundError, match="neither 'latest', a backup id nor an ISO-8601 time"):
        catalog.resolve("j", "last-tuesday")
    with pytest.raises(ConfigError, match="invalid job name"):
        catalog.scan("../etc")


def test_chain_full_to_incremental(storage):
    catalog = Catalog(storage)
    full = make_backup(catalog, "home", T0)
    inc1 = make_backup(catalog, "home", T0 + datetime.timedelta(hours=1), parent=full["id"])
    inc2 = make_backup(catalog, "home", T0 + datetime.timedelta(hours=2), parent=inc1["id"])
    make_backup(catalog, "home", T0 + datetime.timedelta(hours=3))  # a new full: not in the chain
    assert ids(catalog.chain(catalog.get("home", inc2["id"]))) == [full["id"], inc1["id"], inc2["id"]]
    assert ids(catalog.chain(full)) == [full["id"]]


def test_broken_chain_is_an_integrity_error(storage):
    catalog = Catalog(storage)
    full = make_backup(catalog, "home", T0)
    inc1 = make_backup(catalog, "home", T0 + datetime.timedelta(hours=1), parent=full["id"])
    inc2 = make_backup(catalog, "home", T0 + datetime.timedelta(hours=2), parent=inc1["id"])
    catalog.delete_backup(inc1)
    with pytest.raises(IntegrityError, match="depends on %s, which is missing: the chain is broken" % inc1["id"]):
        catalog.chain(inc2)


def test_chain_loop_is_detected(storage):
    catalog = Catalog(storage)
    id_a, id_b = new_backup_id(T0), new_backup_id(T0 + datetime.timedelta(hours=1))
    make_backup(catalog, "loop", T0, parent=id_b, backup_id=id_a)
    b = make_backup(catalog, "loop", T0 + datetime.timedelta(hours=1), parent=id_a, backup_id=id_b)
    with pytest.raises(IntegrityError, match="loops"):
        catalog.chain(b)


def test_a_backup_without_manifest_is_an_orphan_not_a_backup(storage):
    catalog = Catalog(storage)
    good = make_backup(catalog, "j", T0)
    orphan_id = new_backup_id(T0 + datetime.timedelta(hours=1))
    storage.put_bytes(mf.object_key("j", orphan_id, "data.tar"), b"half a backup")
    storage.put_bytes(mf.object_key("j", orphan_id, "key.age"), b"x")
    assert ids(catalog.scan("j")) == [good["id"]]
    assert sorted(info.key for info in catalog.orphans) == [
        "j/%s/data.tar" % orphan_id, "j/%s/key.age" % orphan_id]
    catalog.scan("j", with_orphans=False)
    assert catalog.orphans == []
    with pytest.raises(NotFoundError):
        catalog.get("j", orphan_id)


def test_junk_is_reported_not_fatal(storage):
    catalog = Catalog(storage)
    good = make_backup(catalog, "j", T0)
    bad_json = new_backup_id(T0 + datetime.timedelta(hours=1))
    storage.put_bytes(mf.object_key("j", bad_json, mf.MANIFEST_NAME), b"{not json")
    misplaced = make_backup(catalog, "j", T0 + datetime.timedelta(hours=2))
    moved = new_backup_id(T0 + datetime.timedelta(hours=3))
    storage.put_bytes(mf.object_key("j", moved, mf.MANIFEST_NAME),
                      storage.get_bytes(mf.object_key("j", misplaced["id"], mf.MANIFEST_NAME)))
    no_objects = new_backup_id(T0 + datetime.timedelta(hours=4))
    raw = json.loads(mf.dumps(good))
    raw.update(id=no_objects, objects=[])
    storage.put_bytes(mf.object_key("j", no_objects, mf.MANIFEST_NAME), json.dumps(raw).encode())
    storage.put_bytes("README.txt", b"hello")
    storage.put_bytes("j/notes.txt", b"hello")
    storage.put_bytes("j/not-a-backup-id/file", b"hello")
    found = catalog.scan()
    assert ids(found) == [misplaced["id"], good["id"]]
    reasons = {item["key"]: item["reason"] for item in catalog.junk}
    assert "is not valid JSON" in reasons["j/%s/manifest.json" % bad_json]
    assert reasons["j/%s/manifest.json" % moved] == "manifest id/job do not match its location"
    assert "lists no stored objects" in reasons["j/%s/manifest.json" % no_objects]
    for key in ("README.txt", "j/notes.txt", "j/not-a-backup-id/file"):
        assert reasons[key] == "not inside a backup directory"


def test_temporary_files_are_neither_junk_nor_backups(storage, tmp_path):
    catalog = Catalog(storage)
    good = make_backup(catalog, "j", T0)
    # What a crashed filesystem writer leaves behind.
    (tmp_path / "backups" / "j" / ".index.json.tmp-0a0b0c0d").write_bytes(b"{")
    (tmp_path / "backups" / "j" / good["id"] / ".data2.tar.tmp-01020304").write_bytes(b"x")
    assert ids(catalog.scan("j")) == [good["id"]]
    assert catalog.junk == []


def test_a_nested_manifest_is_not_the_backup_s_manifest(storage):
    catalog = Catalog(storage)
    backup_id = new_backup_id(T0)
    storage.put_bytes("j/%s/sub/manifest.json" % backup_id, mf.dumps(make_backup(Catalog(storage), "x", T0)))
    storage.put_bytes("j/%s/data.tar" % backup_id, b"x")
    assert catalog.scan("j") == []
    assert {info.key for info in catalog.orphans} == {"j/%s/sub/manifest.json" % backup_id, "j/%s/data.tar" % backup_id}


def test_delete_backup_removes_manifest_payload_and_index_entry(storage, tmp_path):
    catalog = Catalog(storage)
    keep = make_backup(catalog, "j", T0)
    gone = make_backup(catalog, "j", T0 + datetime.timedelta(hours=1))
    catalog.delete_backup(gone)
    assert ids(catalog.scan("j")) == [keep["id"]]
    assert [info.key for info in storage.list("j/%s/" % gone["id"])] == []
    assert not (tmp_path / "backups" / "j" / gone["id"]).exists()  # emptied directory removed
    index = json.loads(storage.get_bytes("j/" + INDEX_NAME))
    assert set(index["backups"]) == {keep["id"]}
    catalog.delete_backup("j", keep["id"])
    assert catalog.scan("j") == []


def test_record_verification_is_listed(storage):
    catalog = Catalog(storage)
    backup = make_backup(catalog, "j", T0)
    catalog.record_verification(backup, {"ok": True, "checked_at": "2024-01-16T00:00:00Z"})
    assert catalog.latest("j")["verification"] == {"ok": True, "checked_at": "2024-01-16T00:00:00Z"}
    # Survives the loss of the index (read from verification.json itself).
    storage.delete("j/" + INDEX_NAME)
    assert Catalog(storage).latest("j")["verification"]["ok"] is True


def test_unreadable_verification_record_is_junk(storage):
    catalog = Catalog(storage)
    backup = make_backup(catalog, "j", T0)
    storage.put_bytes(mf.object_key("j", backup["id"], mf.VERIFICATION_NAME), b"\xff garbage")
    assert catalog.latest("j")["verification"] is None
    assert catalog.junk == [{"key": "j/%s/verification.json" % backup["id"], "reason": "unreadable verification record"}]


def test_a_verification_record_that_is_not_an_object_reads_as_never_verified(storage):
    catalog = Catalog(storage)
    backup = make_backup(catalog, "j", T0)
    storage.put_bytes(mf.object_key("j", backup["id"], mf.VERIFICATION_NAME), b'"ok"')
    listed = catalog.latest("j")
    assert isinstance(listed, mf.Manifest) and listed["verification"] == "ok"   # listed as stored
    assert listed.verification is None and listed.verification_result is None
    decided = prune_plan(catalog.scan("j"), {"keep_last": 1})
    assert [entry["verification"] for entry in decided["keep"]] == [None]


# -- the index cache -------------------------------------------------------------------

def test_a_listing_is_one_list_and_one_get(storage):
    catalog = Catalog(storage)
    made = [make_backup(catalog, "j", T0 + datetime.timedelta(hours=h)) for h in range(25)]
    counting = CountingStorage(storage)
    found = Catalog(counting).scan("j")
    assert len(found) == 25 and ids(found)[0] == made[-1]["id"]
    assert counting.calls == [("list", "j/"), ("get", "j/index.json")]


@pytest.mark.parametrize("damage", ["deleted", "not json", "wrong schema", "entries not dicts",
                                    "cached manifest malformed", "cached manifest stale", "entry missing"])
def test_damaged_index_is_ignored_then_repaired(storage, damage):
    catalog = Catalog(storage)
    made = [make_backup(catalog, "j", T0 + datetime.timedelta(hours=h)) for h in range(4)]
    key = "j/" + INDEX_NAME
    index = json.loads(storage.get_bytes(key))
    first = made[0]["id"]
    if damage == "deleted":
        storage.delete(key)
    elif damage == "not json":
        storage.put_bytes(key, b"\x00garbage")
    elif damage == "wrong schema":
        storage.put_bytes(key, json.dumps({"schema": 99, "backups": []}).encode())
    elif damage == "entries not dicts":
        index["backups"] = {first: 5, made[1]["id"]: "x", made[2]["id"]: None}
        storage.put_bytes(key, json.dumps(index).encode())
    elif damage == "cached manifest malformed":
        index["backups"][first]["manifest"] = {"id": first}
        storage.put_bytes(key, json.dumps(index).encode())
    elif damage == "cached manifest stale":
        # Someone rewrote the manifest (different size): the cached copy must not be used.
        raw = json.loads(storage.get_bytes(mf.object_key("j", first, mf.MANIFEST_NAME)))
        raw["stats"] = {"files": 12345}
        storage.put_bytes(mf.object_key("j", first, mf.MANIFEST_NAME), mf.dumps(raw))
    elif damage == "entry missing":
        del index["backups"][first]
        storage.put_bytes(key, json.dumps(index).encode())

    counting = CountingStorage(storage)
    found = Catalog(counting).scan("j")
    assert ids(found) == ids(reversed(made))
    if damage == "deleted":  # the LIST shows there is none: no GET for it
        assert ("get", "j/index.json") not in counting.calls
    if damage == "cached manifest stale":
        assert found[-1]["stats"] == {"files": 12345}
    assert counting.count("list") == 1 and counting.count("put") == 1  # repaired once
    # The next listing is back to one LIST + one GET, with the same answer.
    counting.reset()
    again = Catalog(counting).scan("j")
    assert again == found
    assert counting.calls == [("list", "j/"), ("get", "j/index.json")]


def test_repair_can_be_turned_off(storage):
    catalog = Catalog(storage)
    make_backup(catalog, "j", T0)
    storage.delete("j/" + INDEX_NAME)
    counting = CountingStorage(storage)
    Catalog(counting, repair_index=False).scan("j")
    assert counting.count("put") == 0 and not storage.exists("j/" + INDEX_NAME)


def test_index_entries_of_vanished_backups_are_ignored(storage):
    catalog = Catalog(storage)
    keep = make_backup(catalog, "j", T0)
    gone = make_backup(catalog, "j", T0 + datetime.timedelta(hours=1))
    # Removed behind the catalog's back (manual rm, another tool): the index still lists it.
    for info in storage.list("j/%s/" % gone["id"]):
        storage.delete(info.key)
    assert ids(catalog.scan("j")) == [keep["id"]]
    assert set(json.loads(storage.get_bytes("j/" + INDEX_NAME))["backups"]) == {keep["id"]}


def test_concurrent_writers_lose_no_backup(storage):
    """Many runs publishing at once race on index.json: the index may lose entries, the
    catalog never does, and one scan repairs the index."""
    barrier = threading.Barrier(8)
    made, errors = [], []

    def run(n):
        try:
            barrier.wait()
            for i in range(3):
                made.append(make_backup(Catalog(storage), "busy", T0 + datetime.timedelta(minutes=10 * n + i)))
        except Exception as exc:  # pylint: disable=broad-except
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(ids(Catalog(storage).scan("busy"))) == sorted(ids(made))
    counting = CountingStorage(storage)
    assert len(Catalog(counting).scan("busy")) == 24
    assert counting.calls == [("list", "busy/"), ("get", "busy/index.json")]


# -- a location that is not there is an error, not an empty catalog ---------------------------

@pytest.mark.parametrize("shape", ["missing", "regular file", "dangling symlink"])
def test_a_location_that_is_not_a_directory_is_an_error_naming_it(tmp_path, shape):
    root = tmp_path / "backups"
    if shape == "regular file":
        root.write_bytes(b"not a directory")
    elif shape == "dangling symlink":
        root.symlink_to(tmp_path / "nowhere")
    storage = FilesystemStorage(str(root))
    catalog = Catalog(storage)
    expected = {"missing": "does not exist", "regular file": "is not a directory",
                "dangling symlink": "is a symbolic link to %s, which does not exist" % (tmp_path / "nowhere")}[shape]
    for attempt in (catalog.scan, lambda: catalog.scan("web"), lambda: catalog.latest("web"),
                    lambda: catalog.resolve("web", "2024-01-01T00:00:00Z"), lambda: storage.list("web/")):
        with pytest.raises(MissingLocationError, match="storage (directory|path) %s %s" % (root, expected)):
            attempt()
    # Nothing was created by reading, and the message is one line.
    assert os.path.lexists(str(root)) == (shape != "missing")
    with pytest.raises(StorageError) as caught:
        catalog.scan()
    assert "\n" not in str(caught.value)


def test_a_backup_creates_the_location_and_then_it_lists(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "new" / "backups"))
    storage.ensure_ready()
    assert Catalog(storage).scan() == [] and Catalog(storage).scan("web") == []
    made = make_backup(Catalog(storage), "web", T0)
    assert ids(Catalog(storage).scan("web")) == [made["id"]]
    assert Catalog(storage).scan("db") == []  # a job without backups in an existing location: empty


def test_ensure_ready_refuses_a_regular_file(tmp_path):
    (tmp_path / "backups").write_bytes(b"x")
    with pytest.raises(MissingLocationError, match="storage path %s is not a directory" % (tmp_path / "backups")):
        FilesystemStorage(str(tmp_path / "backups")).ensure_ready()
    assert (tmp_path / "backups").read_bytes() == b"x"


def test_filesystem_locations_have_no_incomplete_uploads(storage):
    make_backup(Catalog(storage), "web", T0)
    assert Catalog(storage).incomplete_uploads() == [] and Catalog(storage).incomplete_uploads("web") == []
    assert upload_summary([]) == {"count": 0, "bytes": 0, "oldest_age_seconds": None}
    with pytest.raises(ConfigError, match="invalid job name"):
        Catalog(storage).incomplete_uploads("../etc")


def test_upload_summary_adds_bytes_and_takes_the_oldest_age():
    uploads = [{"key": "a", "bytes": 10, "age_seconds": 5}, {"key": "b", "bytes": None, "age_seconds": 50},
               {"key": "c", "bytes": 7, "age_seconds": 20}]
    assert upload_summary(uploads) == {"count": 3, "bytes": 17, "oldest_age_seconds": 50}
