# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offsite copies (engine/offsite.py) between real locations: two SeaweedFS instances with
different credentials, and a filesystem directory.

Encrypted incremental chains of the ``files`` kind are copied without any key; at the
destination they verify (with the key) and restore to the very tree that was backed up.
A second copy changes nothing; a destination object deleted, truncated or corrupted is
found (by the listing, by a failed verification recorded at the destination, or by
``recheck: full``) and copied again.
"""

import os
import shutil
import time

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import offsite
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.sources.files import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.targets.files import FilesTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.verify import verify


from .files_helpers import age_key, flip_byte, snapshot, write
from .offsite_helpers import offsite_s3  # noqa: F401  pylint: disable=unused-import  # a fixture

JOB = "offsite"


def make_backups(storage, source_dir, key, count=3):
    """A full and ``count - 1`` incrementals of a small tree; the tree's snapshot at each."""
    write(os.path.join(source_dir, "a.txt"), "alpha\n")
    write(os.path.join(source_dir, "sub", "b.bin"), os.urandom(300000).hex())
    options = {"path": source_dir, "incremental": True}
    made = []
    for step in range(count):
        if step:
            write(os.path.join(source_dir, "step-%d.txt" % step), "step %d\n" % step * 1000)
        manifest = BackupRun(JOB, FilesSource(options), storage, encryption={"recipients": [key[1]]},
                             identities=codecs.parse_identities(key[2])).run()
        made.append((manifest, snapshot(source_dir)))
        time.sleep(1.05)  # whole-second manifest times: keep the backups apart
    return made


def restore_tree(storage, backup_id, identity, tmp_path, name):
    target_dir = str(tmp_path / name)
    rs.restore(storage, JOB, FilesTarget({"path": target_dir}), backup=backup_id, identity=identity)
    return snapshot(target_dir)


def listed(storage):
    return [m["id"] for m in Catalog(storage).scan(JOB, with_orphans=False)]


@pytest.fixture(params=["s3-to-s3", "s3-to-filesystem"])
def locations(request, s3_server, offsite_s3, tmp_path):
    source = open_storage(s3_server.storage_options())
    if request.param == "s3-to-s3":
        options = offsite_s3.storage_options()
        assert options["access_key"] != s3_server.access_key
    else:
        options = {"backend": "filesystem", "path": str(tmp_path / "offsite")}
    return source, open_storage(options), options


def test_copy_verify_restore_repair(locations, tmp_path):
    source, destination, options = locations
    key = age_key(tmp_path)
    identity = key[2]
    made = make_backups(source, str(tmp_path / "tree"), key)
    ids = [manifest["id"] for manifest, dummy in made]

    plan = offsite.copy_backups(source, destination, JOB, check_mode=True)
    assert [step["id"] for step in plan["planned"]] == ids  # oldest (the full) first
    assert plan["changed"] and not plan["copied"] and plan["lag_seconds"] > 0
    if options["backend"] == "filesystem":
        assert not os.path.exists(options["path"])  # check mode wrote nothing

    first = offsite.copy_backups(source, destination, JOB)
    assert first["ok"] and [item["id"] for item in first["copied"]] == ids
    assert first["bytes_copied"] == sum(m["size_bytes"] for m, dummy in made)
    assert first["lag_seconds"] == 0
    index = "%s/index.json" % JOB
    good_index = destination.get_bytes(index)
    destination.put_bytes(index, b"damaged")
    offsite.copy_backups(source, destination, JOB, check_mode=True)
    assert destination.get_bytes(index) == b"damaged"  # check mode writes nothing, not even the cache
    destination.put_bytes(index, good_index)
    assert sorted(listed(destination)) == sorted(ids)
    copied = Catalog(destination).get(JOB, ids[-1])
    assert copied["copied_from"]["storage"] == source.describe()
    assert "secret" not in str(copied["copied_from"]).lower()

    # At the destination, with the key the copy never had: verifies, restores the same tree.
    outcome = verify(destination, JOB, backup="all", identity=identity)
    assert outcome["ok"] and outcome["verified"] == len(ids)
    assert restore_tree(destination, ids[-1], identity, tmp_path, "restored-last") == made[-1][1]
    assert restore_tree(destination, ids[0], identity, tmp_path, "restored-first") == made[0][1]

    again = offsite.copy_backups(source, destination, JOB)
    assert not again["changed"] and not again["planned"] and again["in_sync"] == ids
    assert again["bytes_copied"] == 0

    # Damage at the destination: a deleted object is seen in the listing.
    victim = Catalog(destination).get(JOB, ids[1])
    payload = [obj for obj in victim["objects"] if obj.get("payload")][0]
    key = "%s/%s/%s" % (JOB, ids[1], payload["name"])
    destination.delete(key)
    repaired = offsite.copy_backups(source, destination, JOB)
    assert [item["id"] for item in repaired["copied"]] == [ids[1]]
    assert repaired["copied"][0]["action"] == "repair"
    assert repaired["bytes_copied"] == payload["size"]  # only what was missing went again

    # A same-size corruption: invisible to the listing, found by verification at the destination
    # (recorded there), then repaired by the next copy.
    corrupt(destination, options, key)
    assert offsite.copy_backups(source, destination, JOB)["planned"] == []
    assert not verify(destination, JOB, backup=ids[1], identity=identity)["ok"]
    fixed = offsite.copy_backups(source, destination, JOB)
    assert [item["id"] for item in fixed["copied"]] == [ids[1]]
    assert verify(destination, JOB, backup="all", identity=identity)["ok"]

    # ... or by recheck=full, with no key at all.
    corrupt(destination, options, key)
    found = offsite.copy_backups(source, destination, JOB, recheck="full")
    assert [item["id"] for item in found["copied"]] == [ids[1]]
    assert "SHA-256" in found["copied"][0]["reason"]
    assert verify(destination, JOB, backup="all", identity=identity)["ok"]
    assert restore_tree(destination, ids[1], identity, tmp_path, "restored-middle") == made[1][1]


def corrupt(storage, options, key):
    if options["backend"] == "filesystem":
        flip_byte(os.path.join(options["path"], *key.split("/")))
        return
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))


def test_damaged_source_object_is_not_copied(s3_server, tmp_path):
    source = open_storage({"backend": "filesystem", "path": str(tmp_path / "primary")})
    destination = open_storage(s3_server.storage_options())
    made = make_backups(source, str(tmp_path / "tree"), age_key(tmp_path), count=2)
    full = made[0][0]
    payload = [obj for obj in full["objects"] if obj.get("payload")][0]
    flip_byte(os.path.join(str(tmp_path / "primary"), JOB, full["id"], payload["name"]))
    outcome = offsite.copy_backups(source, destination, JOB)
    assert not outcome["ok"] and [item["id"] for item in outcome["failed"]] == [full["id"]]
    assert "at the source" in outcome["failed"][0]["error"]
    # The incremental built on it is not published either: its chain would be broken there.
    assert [item["id"] for item in outcome["skipped"]] == [made[1][0]["id"]]
    assert listed(destination) == []
    assert outcome["lag_seconds"] > 0
    shutil.rmtree(str(tmp_path / "primary"))


def test_an_interrupted_copy_resumes_with_what_reads_back_right(s3_server, offsite_s3, tmp_path):
    """What a killed copy leaves - objects without a manifest, one of them cut short - is taken
    over: the good object is read back and kept, the short one copied again, the backup listed
    only at the end."""
    source = open_storage(s3_server.storage_options())
    destination = open_storage(offsite_s3.storage_options())
    made = make_backups(source, str(tmp_path / "tree"), age_key(tmp_path), count=1)
    manifest = made[0][0]
    objects = sorted(manifest["objects"], key=lambda obj: obj["size"])
    keys = ["%s/%s/%s" % (JOB, manifest["id"], obj["name"]) for obj in objects]
    offsite.stream_object(source, destination, keys[0], objects[0])  # finished before the kill
    destination.put_bytes(keys[-1], source.get_bytes(keys[-1])[:1000])  # as if cut short
    assert listed(destination) == []
    outcome = offsite.copy_backups(source, destination, JOB)
    assert outcome["ok"] and [item["id"] for item in outcome["copied"]] == [manifest["id"]]
    assert outcome["bytes_reused"] == objects[0]["size"]
    assert outcome["bytes_copied"] == manifest["size_bytes"] - objects[0]["size"]
    assert listed(destination) == [manifest["id"]]
