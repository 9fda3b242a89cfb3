# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offsite copies (engine/offsite.py) between real locations: two SeaweedFS instances with
different credentials, and a filesystem directory.

Encrypted incremental chains of the ``files`` kind are copied without any key; at the
destination they verify (with the key) and restore to the very tree that was backed up.
A second copy changes nothing; a destination object deleted, truncated or corrupted is
found (by the listing, by a failed verification recorded at the destination, or by
``recheck: full``) and copied again.
"""

import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest
import pyrage

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import offsite
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import keys as backup_keys
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.target import FilesTarget
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


# -- re-encryption: a destination held by another team ----------------------------------

def _reencrypt(key, **extra):
    return dict({"recipients": [key[1]]}, **extra)


def test_reencrypted_copy_restores_with_the_destination_key_only(locations, tmp_path):
    """Decrypted with the source's key and encrypted to the destination's recipients on the
    way: at the destination the backups verify and restore with the destination's identity,
    not with the source's; a second run changes nothing; the manifest records the recipients
    and the plaintext's SHA-256, never a key."""
    source, destination, options = locations
    source_key = age_key(tmp_path)
    other = tmp_path / "other-team"
    other.mkdir()
    destination_key = age_key(other)
    made = make_backups(source, str(tmp_path / "tree"), source_key)
    ids = [manifest["id"] for manifest, dummy in made]
    settings = _reencrypt(destination_key, identity=source_key[2])

    plan = offsite.copy_backups(source, destination, JOB, check_mode=True, reencrypt=settings)
    assert [step["id"] for step in plan["planned"]] == ids and plan["changed"] and not plan["copied"]
    assert plan["reencrypt"] == {"recipients": [destination_key[1]]}
    if options["backend"] == "filesystem":
        assert not os.path.exists(options["path"])  # check mode wrote nothing

    first = offsite.copy_backups(source, destination, JOB, reencrypt=settings)
    assert first["ok"] and [item["id"] for item in first["copied"]] == ids
    for manifest, dummy in made:
        copy = Catalog(destination).get(JOB, manifest["id"])
        assert copy["encryption"] == {"mode": "age", "recipients": [destination_key[1]]}
        record = copy["copied_from"]["reencrypted"]
        assert record["recipients"] == [destination_key[1]]
        assert record["source_encryption"]["recipients"] == [source_key[1]]
        assert record["source_objects"] == [{"name": o["name"], "size": o["size"], "sha256": o["sha256"]}
                                            for o in manifest["objects"]]
        assert [o["name"] for o in copy["objects"]] == [o["name"] for o in manifest["objects"]]
        for new, old in zip(copy["objects"], manifest["objects"]):
            assert new["sha256"] != old["sha256"]  # other ciphertext
            stored = destination.get_bytes("%s/%s/%s" % (JOB, copy["id"], new["name"]))
            assert len(stored) == new["size"] and hashlib.sha256(stored).hexdigest() == new["sha256"]
            # The recorded plaintext is what the destination's key decrypts it to.
            plain = pyrage.decrypt(stored, codecs.parse_identities(destination_key[2]))
            entry = [p for p in record["plaintext"] if p["name"] == new["name"]][0]
            assert entry == {"name": new["name"], "size": len(plain), "sha256": hashlib.sha256(plain).hexdigest()}
            assert plain == pyrage.decrypt(source.get_bytes("%s/%s/%s" % (JOB, copy["id"], old["name"])),
                                           codecs.parse_identities(source_key[2]))
        text = json.dumps(copy)
        assert "AGE-SECRET-KEY" not in text.upper() and source_key[2] not in text
    assert first["bytes_copied"] == sum(Catalog(destination).get(JOB, i)["size_bytes"] for i in ids)

    # The other team's key opens the copy; the source's key does not.
    outcome = verify(destination, JOB, backup="all", identity=destination_key[2])
    assert outcome["ok"] and outcome["verified"] == len(ids)
    assert restore_tree(destination, ids[-1], destination_key[2], tmp_path, "restored-last") == made[-1][1]
    assert restore_tree(destination, ids[0], destination_key[2], tmp_path, "restored-first") == made[0][1]
    with pytest.raises(backup_keys.KeyMismatchError):
        restore_tree(destination, ids[-1], source_key[2], tmp_path, "not-with-the-source-key")
    assert not verify(destination, JOB, backup="latest", identity=source_key[2])["ok"]

    again = offsite.copy_backups(source, destination, JOB, reencrypt=settings)
    assert not again["changed"] and again["in_sync"] == ids and again["bytes_copied"] == 0
    assert again["other_recipients"] == []
    # Without the option the re-encrypted copies count as present too (no key needed).
    plain = offsite.copy_backups(source, destination, JOB)
    assert not plain["changed"] and plain["in_sync"] == ids
    assert offsite.copied_ids(destination, JOB, Catalog(source).scan(JOB)) == set(ids)

    # Recipients changed: the copies made before are kept (and named), new backups go to the new ones.
    third = tmp_path / "third"
    third.mkdir()
    new_key = age_key(third)
    changed = offsite.copy_backups(source, destination, JOB, reencrypt=_reencrypt(new_key, identity=source_key[2]))
    assert not changed["changed"] and changed["other_recipients"] == ids

    # A listed object deleted at the destination: repaired, re-encrypted again.
    victim = Catalog(destination).get(JOB, ids[1])
    payload = [obj for obj in victim["objects"] if obj.get("payload")][0]
    destination.delete("%s/%s/%s" % (JOB, ids[1], payload["name"]))
    repaired = offsite.copy_backups(source, destination, JOB, reencrypt=settings)
    assert [item["id"] for item in repaired["copied"]] == [ids[1]] and repaired["copied"][0]["action"] == "repair"
    assert verify(destination, JOB, backup="all", identity=destination_key[2])["ok"]
    # recheck=full reads the re-encrypted objects back against the destination's manifest.
    full = offsite.copy_backups(source, destination, JOB, recheck="full", reencrypt=settings)
    assert not full["changed"] and full["in_sync"] == ids


def test_reencrypt_refuses_a_missing_or_wrong_key_before_writing(s3_server, tmp_path):
    source = open_storage(s3_server.storage_options())
    target = tmp_path / "offsite"
    destination = open_storage({"backend": "filesystem", "path": str(target)})
    source_key = age_key(tmp_path)
    team = tmp_path / "team"
    team.mkdir()
    destination_key = age_key(team)
    made = make_backups(source, str(tmp_path / "tree"), source_key, count=2)

    with pytest.raises(ConfigError, match="source's key must be given explicitly"):
        offsite.copy_backups(source, destination, JOB, reencrypt=_reencrypt(destination_key))
    with pytest.raises(ConfigError, match="secret key"):
        offsite.copy_backups(source, destination, JOB,
                             reencrypt={"recipients": [source_key[2]], "identity": source_key[2]})
    # A valid key that is not a recipient of the source's backups: refused, nothing written.
    for check_mode in (True, False):
        with pytest.raises(backup_keys.KeyMismatchError, match="nothing was written") as caught:
            offsite.copy_backups(source, destination, JOB, check_mode=check_mode,
                                 reencrypt=_reencrypt(destination_key, identity=destination_key[2]))
        assert destination_key[2] not in str(caught.value) and source_key[2] not in str(caught.value)
        assert not target.exists()
    # The recipients list is right but the key does not decrypt (a manifest that names the
    # wrong recipients): the trial decryption refuses it, still before any write.
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    impostor_key = age_key(impostor)
    full = made[0][0]
    edited = dict(full, encryption=dict(full["encryption"], recipients=[impostor_key[1]]))
    source.put_bytes("%s/%s/manifest.json" % (JOB, full["id"]), mf.dumps(edited))
    source.delete("%s/index.json" % JOB)  # the catalog's cache of the manifests
    with pytest.raises(backup_keys.KeyMismatchError, match="does not decrypt"):
        offsite.copy_backups(source, destination, JOB, backup=full["id"],
                             reencrypt=_reencrypt(destination_key, identity=impostor_key[2]))
    assert not target.exists()


def test_reencrypt_passphrase_backups_and_damaged_source(s3_server, offsite_s3, tmp_path):
    """Passphrase (envelope) backups re-encrypted with the passphrase as the source key: the
    envelope is not copied; a damaged source object is not copied, the others are."""
    source = open_storage(s3_server.storage_options())
    destination = open_storage(offsite_s3.storage_options())
    team = tmp_path / "team"
    team.mkdir()
    destination_key = age_key(team)
    tree = str(tmp_path / "tree")
    write(os.path.join(tree, "a.txt"), "alpha\n" * 1000)
    manifests = []
    for step in range(2):
        write(os.path.join(tree, "b-%d.bin" % step), os.urandom(200000).hex())
        manifests.append((BackupRun(JOB, FilesSource({"path": tree}), source,
                                    encryption={"passphrase": "correct horse"}).run(), snapshot(tree)))
        time.sleep(1.05)
    with pytest.raises(backup_keys.KeyMismatchError):
        offsite.copy_backups(source, destination, JOB,
                             reencrypt=_reencrypt(destination_key, passphrase="wrong horse"))
    assert listed(destination) == []

    damaged = manifests[0][0]
    payload = [obj for obj in damaged["objects"] if obj.get("payload")][0]
    key = "%s/%s/%s" % (JOB, damaged["id"], payload["name"])
    good = source.get_bytes(key)
    broken = bytearray(good)
    broken[len(broken) // 2] ^= 0xFF
    source.put_bytes(key, bytes(broken))
    outcome = offsite.copy_backups(source, destination, JOB,
                                   reencrypt=_reencrypt(destination_key, passphrase="correct horse"))
    assert [item["id"] for item in outcome["failed"]] == [damaged["id"]] and not outcome["ok"]
    assert "at the source" in outcome["failed"][0]["error"]
    assert listed(destination) == [manifests[1][0]["id"]]
    source.put_bytes(key, good)
    outcome = offsite.copy_backups(source, destination, JOB,
                                   reencrypt=_reencrypt(destination_key, passphrase="correct horse"))
    assert outcome["ok"] and [item["id"] for item in outcome["copied"]] == [damaged["id"]]
    for manifest, tree_state in manifests:
        copy = Catalog(destination).get(JOB, manifest["id"])
        assert "key_object" not in copy["encryption"]
        assert codecs.ENVELOPE_OBJECT not in [obj["name"] for obj in copy["objects"]]
        assert not destination.exists("%s/%s/%s" % (JOB, manifest["id"], codecs.ENVELOPE_OBJECT))
        assert restore_tree(destination, manifest["id"], destination_key[2], tmp_path, manifest["id"]) == tree_state
    assert verify(destination, JOB, backup="all", identity=destination_key[2])["ok"]


@pytest.mark.skipif(shutil.which("age") is None or shutil.which("zstd") is None,
                    reason="the stock age and zstd CLIs are not installed")
def test_stock_age_decrypts_a_reencrypted_object(tmp_path):
    source = open_storage({"backend": "filesystem", "path": str(tmp_path / "primary")})
    destination = open_storage({"backend": "filesystem", "path": str(tmp_path / "offsite")})
    source_key = age_key(tmp_path)
    team = tmp_path / "team"
    team.mkdir()
    destination_key = age_key(team)
    manifest, dummy = make_backups(source, str(tmp_path / "tree"), source_key, count=1)[0]
    assert offsite.copy_backups(source, destination, JOB,
                                reencrypt=_reencrypt(destination_key, identity=source_key[2]))["ok"]
    copy = Catalog(destination).get(JOB, manifest["id"])
    payload = [obj for obj in copy["objects"] if obj.get("payload")][0]
    path = os.path.join(str(tmp_path / "offsite"), JOB, manifest["id"], payload["name"])
    decrypted = subprocess.run(["age", "-d", "-i", destination_key[0], path], capture_output=True, check=False)
    assert decrypted.returncode == 0, decrypted.stderr
    record = [p for p in copy["copied_from"]["reencrypted"]["plaintext"] if p["name"] == payload["name"]][0]
    assert hashlib.sha256(decrypted.stdout).hexdigest() == record["sha256"]
    tar = subprocess.run(["zstd", "-d", "-c"], input=decrypted.stdout, capture_output=True, check=True).stdout
    assert tar and len(tar) == payload["raw_bytes"]
    refused = subprocess.run(["age", "-d", "-i", source_key[0], path], capture_output=True, check=False)
    assert refused.returncode != 0


def test_reencrypt_encrypts_an_unencrypted_backup(tmp_path):
    source = open_storage({"backend": "filesystem", "path": str(tmp_path / "primary")})
    destination = open_storage({"backend": "filesystem", "path": str(tmp_path / "offsite")})
    source_key = age_key(tmp_path)
    team = tmp_path / "team"
    team.mkdir()
    team_key = age_key(team)
    tree = str(tmp_path / "tree")
    write(os.path.join(tree, "a.txt"), "alpha\n" * 100)
    manifest = BackupRun(JOB, FilesSource({"path": tree}), source, encryption={"enabled": False}).run()
    outcome = offsite.copy_backups(source, destination, JOB, reencrypt=_reencrypt(team_key, identity=source_key[2]))
    assert outcome["ok"] and [item["id"] for item in outcome["copied"]] == [manifest["id"]]
    copy = Catalog(destination).get(JOB, manifest["id"])
    assert [obj["name"] for obj in copy["objects"]] == [obj["name"] + ".age" for obj in manifest["objects"]]
    assert copy["copied_from"]["reencrypted"]["source_encryption"] == {"mode": "none"}
    assert restore_tree(destination, manifest["id"], team_key[2], tmp_path, "restored") == snapshot(tree)


def test_a_backup_that_leaves_the_source_during_the_copy(tmp_path, monkeypatch):
    """Between the plan and the copy the stream replaces its partial WAL copy (or a prune runs):
    the backup that left the source is reported as vanished, not failed, and nothing of it is
    listed at the destination; one whose object alone is missing is a damaged source (failed)."""
    primary = tmp_path / "primary"
    source = open_storage({"backend": "filesystem", "path": str(primary)})
    destination = open_storage({"backend": "filesystem", "path": str(tmp_path / "offsite")})
    tree = str(tmp_path / "tree")
    made = []
    for step in range(3):
        write(os.path.join(tree, "f%d.txt" % step), "data %d\n" % step * 500)
        made.append(BackupRun(JOB, FilesSource({"path": tree}), source, encryption={"enabled": False}).run())
        time.sleep(1.05)
    kept, damaged, gone = (m["id"] for m in made)
    planned = offsite.Copier.plan

    def plan_then_change_the_source(self, *args, **kwargs):
        result = planned(self, *args, **kwargs)
        if self.job == JOB:
            os.remove(str(primary / JOB / gone / mf.MANIFEST_NAME))  # unlisted first, as deletions go
            shutil.rmtree(str(primary / JOB / gone))
            payload = [obj for obj in made[1]["objects"] if obj.get("payload")][0]
            os.remove(str(primary / JOB / damaged / payload["name"]))
        return result

    monkeypatch.setattr(offsite.Copier, "plan", plan_then_change_the_source)
    outcome = offsite.copy_backups(source, destination, JOB)
    assert [item["id"] for item in outcome["copied"]] == [kept]
    assert [item["id"] for item in outcome["vanished"]] == [gone]
    assert [item["id"] for item in outcome["failed"]] == [damaged]
    assert "at the source" in outcome["failed"][0]["error"]
    assert not outcome["ok"]  # the damaged one, not the vanished one
    assert listed(destination) == [kept]
