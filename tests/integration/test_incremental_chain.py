# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Incremental chains of the ``files`` kind (the seed's "Incremental / Point-in-Time" backup).

A full, then incrementals carrying additions, modifications (including a same-size change
with the mtime put back, which only the ctime reveals), mode changes, deletions, renames
and type changes. Every point of the chain is restored — by id and by point in time — and
compared with a snapshot of the source taken at that point; the chain is also restored
with stock tools following docs/formats.md. Broken chains must refuse to restore.
"""

import os
import shutil
import time

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import keys as backup_keys
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.target import FilesTarget

from .files_helpers import age_key, decode_cmd, flip_byte, sh, snapshot, stored_object, write
from .test_files_kind import ROOT, make_tree

JOB = "chain-test"


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


def run(storage, options, job=JOB, **kwargs):
    manifest = BackupRun(job, FilesSource(options), storage, **kwargs).run()
    # Manifest times have whole seconds: the next backup must finish in a later second for
    # point-in-time selection to tell them apart.
    time.sleep(1.05)
    return manifest


def tar_names(store, manifest, identity_file=None):
    listing = sh("%s | tar -t -f -" % decode_cmd(stored_object(store, JOB, manifest, "files.tar"), identity_file))
    return {line.rstrip(b"/").decode("utf-8", "surrogateescape") for line in listing.splitlines()}


def deleted_names(store, manifest, identity_file=None):
    data = sh(decode_cmd(stored_object(store, JOB, manifest, "files.deleted"), identity_file))
    return [item.decode("utf-8") for item in data.split(b"\0") if item]


def mutate(source, step):
    """The changes between backups; each step is one incremental."""

    def path(*parts):
        return os.path.join(source, *parts)

    if step == 1:
        write(path("added", "one.txt"), "one\n")
        write(path("added", "sub", "two.txt"), "two\n")
        os.makedirs(path("added", "empty-new"))
        write(path("plain.txt"), "hello, longer now\n")
        # Same size, mtime put back: only the ctime (and content) changed.
        info = os.stat(path("random.bin"))
        with open(path("random.bin"), "r+b") as handle:
            handle.seek(1000)
            handle.write(b"CHANGED")
        os.utime(path("random.bin"), ns=(info.st_atime_ns, info.st_mtime_ns))
        os.chmod(path("run.sh"), 0o700)
    elif step == 2:
        os.unlink(path("back\\slash"))
        shutil.rmtree(path("d" * 60))
        os.rename(path("added", "one.txt"), path("added", "renamed.txt"))
        os.unlink(path("link-rel"))
        write(path("link-rel"), "was a symlink\n")          # symlink -> file
        os.unlink(path("hard-b"))
        os.symlink("hard-a", path("hard-b"))                 # file -> symlink
        os.unlink(path("link-abs"))
        os.symlink("/etc/os-release", path("link-abs"))      # retargeted
    elif step == 3:
        shutil.rmtree(path("empty"))
        write(path("empty"), "a file where a directory was\n")      # dir -> file
        os.unlink(path("empty-file"))
        write(path("empty-file", "child.txt"), "a directory where a file was\n")  # file -> dir
        os.chmod(path("readonly"), 0o755)
        write(path("readonly", "late.txt"), "late\n")
        os.chmod(path("readonly"), 0o555)
    # step 4: nothing changes


EXPECTED_ARCHIVES = {
    1: {"added", "added/one.txt", "added/sub", "added/sub/two.txt", "added/empty-new", "plain.txt",
        "random.bin", "run.sh"},
    2: {"added", "added/renamed.txt", "link-rel", "hard-a", "hard-b", "link-abs"},
    3: {"empty", "empty-file", "empty-file/child.txt", "readonly", "readonly/late.txt"},
    4: set(),
}
EXPECTED_DELETED = {
    1: [],
    2: ["added/one.txt", "back\\slash", "d" * 60, "hard-b", "link-rel"],  # link-abs stays a symlink
    3: ["empty", "empty-file"],
    4: [],
}


@pytest.fixture
def chain(tmp_path, storage):
    """Five backups (full + 4 incrementals) and the source's snapshot at each."""
    source = make_tree(tmp_path / "src")
    options = {"path": source, "incremental": True, "full_every": 10}
    points = []
    for step in range(5):
        if step:
            mutate(source, step)
        manifest = run(storage, options)
        points.append((manifest, snapshot(source, owners=ROOT)))
    return source, points


def test_chain_records_only_changes(tmp_path, chain):
    _source, points = chain
    store = tmp_path / "store"
    full = points[0][0]
    assert full["parent"] is None and full["stats"]["type"] == "full"
    assert full["stats"]["full_reason"] == "first backup of the job"
    for step in range(1, 5):
        manifest, state = points[step]
        previous = points[step - 1][0]
        stats = manifest["stats"]
        assert manifest["parent"] == previous["id"]
        assert stats["type"] == "incremental" and stats["chain_length"] == step + 1
        assert sorted(obj["payload"] for obj in manifest["objects"]) == [
            "files.deleted", "files.index", "files.sha256", "files.tar"]
        assert tar_names(store, manifest) == EXPECTED_ARCHIVES[step], step
        assert deleted_names(store, manifest) == EXPECTED_DELETED[step], step
        assert stats["deleted"] == len(EXPECTED_DELETED[step])
        assert stats["files"] == sum(1 for value in state.values() if value[0] == "file")
    assert points[4][0]["stats"]["archive_entries"] == 0 and points[4][0]["stats"]["archive_bytes"] == 0


def test_every_point_in_time_restores_exactly(tmp_path, storage, chain):
    _source, points = chain
    for step, (manifest, state) in enumerate(points):
        by_id = tmp_path / ("by-id-%d" % step)
        report = rs.restore(storage, JOB, FilesTarget({"path": str(by_id)}), backup=manifest["id"])
        assert report["chain"] == [point[0]["id"] for point in points[:step + 1]]
        assert all(check["ok"] for check in report["checks"]), report["checks"]
        assert snapshot(by_id, owners=ROOT) == state, step

        at_time = tmp_path / ("at-time-%d" % step)
        report = rs.restore(storage, JOB, FilesTarget({"path": str(at_time)}), point_in_time=manifest["finished_at"])
        assert report["backup_id"] == manifest["id"] and report["selected_by"] == "point_in_time"
        assert snapshot(at_time, owners=ROOT) == state, step


def test_subpath_restore_from_a_chain(tmp_path, storage, chain):
    _source, points = chain
    manifest, state = points[3]
    destination = tmp_path / "part"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination), "subpath": "empty-file"}),
                        backup=manifest["id"])
    assert all(check["ok"] for check in report["checks"])
    assert snapshot(destination, owners=ROOT) == {key: state[key] for key in (b"empty-file", b"empty-file/child.txt")}


def test_stock_tools_replay_the_chain(tmp_path):
    """docs/formats.md: for each backup oldest first, rm -rf its deleted list, then untar it."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    identity_file, recipient, identity = age_key(tmp_path)
    source = make_tree(tmp_path / "src")
    options = {"path": source, "incremental": True}
    encryption = {"recipients": [recipient]}
    identities = codecs.parse_identities(identity)
    manifests = []
    for step in range(4):
        if step:
            mutate(source, step)
        manifests.append(run(storage, options, encryption=encryption, identities=identities))
    final_state = snapshot(source, owners=ROOT)
    assert [m["stats"]["type"] for m in manifests] == ["full", "incremental", "incremental", "incremental"]

    out = tmp_path / "stock"
    out.mkdir()
    store = tmp_path / "store"
    for manifest in Catalog(storage).chain(manifests[-1]):
        if manifest["parent"]:
            deleted = stored_object(store, JOB, manifest, "files.deleted")
            sh("%s | xargs -0 -r rm -rf --" % decode_cmd(deleted, identity_file), cwd=str(out))
        tar = stored_object(store, JOB, manifest, "files.tar")
        sh("%s | tar -x -p -f - -C %s" % (decode_cmd(tar, identity_file), out))
    sums = stored_object(store, JOB, manifests[-1], "files.sha256")
    sh("%s > %s" % (decode_cmd(sums, identity_file), tmp_path / "files.sha256"))
    checked = sh("sha256sum -c %s" % (tmp_path / "files.sha256"), cwd=str(out))
    assert checked.count(b": OK") == manifests[-1]["stats"]["files"]
    assert snapshot(out, owners=ROOT) == final_state


# --------------------------------------------------------------------------- when a new full starts

def test_full_every_and_max_chain_age_start_new_fulls(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    kinds = []
    for step in range(5):
        write(os.path.join(source, "counter.txt"), str(step))
        kinds.append(run(storage, {"path": source, "incremental": True, "full_every": 2})["stats"])
    assert [s["type"] for s in kinds] == ["full", "incremental", "incremental", "full", "incremental"]
    assert kinds[3]["full_reason"] == "full_every=2 reached"

    aged = run(storage, {"path": source, "incremental": True, "full_every": 0, "max_chain_age": "1s"})["stats"]
    assert aged["type"] == "full" and "older than max_chain_age" in aged["full_reason"]
    following = run(storage, {"path": source, "incremental": True, "full_every": 0, "max_chain_age": "1h"})["stats"]
    assert following["type"] == "incremental"

    moved = tmp_path / "elsewhere"
    write(moved / "file.txt", "another tree\n")
    other = run(storage, {"path": str(moved), "incremental": True})["stats"]
    assert other["type"] == "full" and "source path changed" in other["full_reason"]


def test_encrypted_chain_needs_the_identity_to_continue(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    _identity_file, recipient, identity = age_key(tmp_path)
    options = {"path": source, "incremental": True}
    encryption = {"recipients": [recipient]}
    run(storage, options, encryption=encryption)
    write(os.path.join(source, "more.txt"), "more")
    with pytest.raises(ConfigError, match="identity"):
        BackupRun(JOB, FilesSource(options), storage, encryption=encryption).run()
    assert len(Catalog(storage).scan(JOB)) == 1  # nothing half-written became a backup
    nxt = run(storage, options, encryption=encryption, identities=codecs.parse_identities(identity))
    assert nxt["stats"]["type"] == "incremental"


# --------------------------------------------------------------------------- broken chains

def test_corrupted_chain_member_refuses_restore(tmp_path, storage, chain):
    _source, points = chain
    flip_byte(stored_object(tmp_path / "store", JOB, points[2][0], "files.tar"))
    destination = tmp_path / "live"
    write(destination / "current.txt", "current data\n")
    live = snapshot(destination)
    for step in (2, 3, 4):  # every backup whose chain holds the damaged member
        with pytest.raises(IntegrityError):
            rs.restore(storage, JOB, FilesTarget({"path": str(destination), "overwrite": True}),
                       backup=points[step][0]["id"])
        assert snapshot(destination) == live
    assert not [name for name in os.listdir(tmp_path) if ".restore-" in name]
    # Points before the damage still restore.
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination), "overwrite": True}),
                        backup=points[1][0]["id"])
    assert all(check["ok"] for check in report["checks"])
    assert snapshot(destination, owners=ROOT) == points[1][1]


def test_missing_chain_member_refuses_restore_and_next_backup_is_full(tmp_path, storage, chain):
    source, points = chain
    Catalog(storage).delete_backup(points[2][0])
    destination = tmp_path / "target"
    with pytest.raises(IntegrityError, match="chain is broken"):
        rs.restore(storage, JOB, FilesTarget({"path": str(destination)}), backup=points[4][0]["id"])
    assert not destination.exists()
    write(os.path.join(source, "after.txt"), "after the damage\n")
    healed = run(storage, {"path": source, "incremental": True})
    assert healed["stats"]["type"] == "full" and "broken" in healed["stats"]["full_reason"]
    rs.restore(storage, JOB, FilesTarget({"path": str(destination)}))
    assert snapshot(destination, owners=ROOT) == snapshot(source, owners=ROOT)


def test_damaged_parent_index_starts_a_new_full(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    options = {"path": source, "incremental": True}
    first = run(storage, options)
    flip_byte(stored_object(tmp_path / "store", JOB, first, "files.index"))
    second = run(storage, options)
    assert second["parent"] is None and second["stats"]["type"] == "full"
    assert "damaged" in second["stats"]["full_reason"]


def test_a_damaged_encrypted_parent_index_without_the_key_starts_a_new_full(tmp_path, storage):
    """Without the key the index cannot be read either way: only when its stored bytes are
    intact is the missing key the problem (a clear error); a damaged one means a new full."""
    source = make_tree(tmp_path / "src")
    _identity_file, recipient, _identity = age_key(tmp_path)
    options = {"path": source, "incremental": True}
    encryption = {"recipients": [recipient]}
    first = run(storage, options, encryption=encryption)
    flip_byte(stored_object(tmp_path / "store", JOB, first, "files.index"))
    second = run(storage, options, encryption=encryption)
    assert second["parent"] is None and second["stats"]["type"] == "full"
    assert "damaged" in second["stats"]["full_reason"]


def test_chain_on_s3(tmp_path, s3_server):
    storage = open_storage(s3_server.storage_options())
    source = make_tree(tmp_path / "src")
    options = {"path": source, "incremental": True}
    states = []
    for step in range(3):
        if step:
            mutate(source, step)
        states.append((run(storage, options), snapshot(source, owners=ROOT)))
    assert [point[0]["stats"]["type"] for point in states] == ["full", "incremental", "incremental"]
    for step, (manifest, state) in enumerate(states):
        destination = tmp_path / ("s3-%d" % step)
        rs.restore(storage, JOB, FilesTarget({"path": str(destination)}), backup=manifest["id"])
        assert snapshot(destination, owners=ROOT) == state


def test_passphrase_encrypted_chain(tmp_path, storage):
    """Each backup has its own key envelope; the parent's is opened with the passphrase."""
    source = make_tree(tmp_path / "src")
    options = {"path": source, "incremental": True}
    encryption = {"passphrase": "correct horse battery staple"}
    states = []
    for step in range(2):  # scrypt (age passphrases) is slow on purpose: two backups suffice
        if step:
            mutate(source, step)
        parents = backup_keys.parent_identities(storage, JOB, passphrase=encryption["passphrase"])
        states.append((run(storage, options, encryption=encryption, identities=parents),
                       snapshot(source, owners=ROOT)))
    assert [point[0]["stats"]["type"] for point in states] == ["full", "incremental"]
    for step, (manifest, state) in enumerate(states):
        destination = tmp_path / ("pp-%d" % step)
        rs.restore(storage, JOB, FilesTarget({"path": str(destination)}), backup=manifest["id"],
                   passphrase=encryption["passphrase"])
        assert snapshot(destination, owners=ROOT) == state
