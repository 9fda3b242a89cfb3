# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``directory_sync`` kind: a real rsync mirror plus a sync record in the catalog.

The mirror is compared with the source by ``files_helpers.snapshot``; the reported numbers
are checked against counts made independently of rsync.
"""

import os
import shutil

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.directory_sync.source import (
    DirectorySyncSource, parse_stats)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.directory_sync.target import (
    DirectorySyncTarget)

from ci_env import require_or_skip

from .files_helpers import decode_cmd, regular_file_totals as regular_files, sh, snapshot, stored_object, write

JOB = "sync-test"


@pytest.fixture(autouse=True)
def need_rsync():
    if shutil.which("rsync") is None:
        require_or_skip("rsync is not installed (hack/install-deps.sh)")


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


def data_tree(root):
    write(os.path.join(root, "a.txt"), "alpha\n", mode=0o640)
    write(os.path.join(root, "dir", "b.bin"), os.urandom(200000))
    write(os.path.join(root, "dir", "deeper", "c.txt"), "gamma\n")
    write(os.path.join(root, "ünï.txt"), "unicode\n")
    os.makedirs(os.path.join(root, "empty"))
    os.symlink("a.txt", os.path.join(root, "link"))
    age_tree(root)
    return root


def age_tree(root, when_ns=1600000000123456789):
    """Give every entry an old mtime. rsync leaves a directory's mtime alone when it falls in
    the same second as the source's, so trees made "now" would compare by luck only."""
    for directory, dirs, names in os.walk(root, topdown=False):
        for name in dirs + names:
            os.utime(os.path.join(directory, name), ns=(when_ns, when_ns), follow_symlinks=False)
    os.utime(root, ns=(when_ns, when_ns))


def sync(storage, options, **kwargs):
    return BackupRun(JOB, DirectorySyncSource(options), storage, **kwargs).run()


def sync_log(tmp_path, manifest):
    return sh(decode_cmd(stored_object(tmp_path / "store", JOB, manifest, "sync.log"))).decode("utf-8")


def test_first_sync_mirrors_and_reports(tmp_path, storage):
    source = data_tree(str(tmp_path / "data"))
    mirror = tmp_path / "backup" / "data"
    (tmp_path / "backup").mkdir()
    manifest = sync(storage, {"path": source, "destination": str(mirror), "delete": True})

    assert snapshot(mirror) == snapshot(source)
    files, size = regular_files(source)
    stats = manifest["stats"]
    # rsync's "Total file size" counts symlinks by the length of their target ("a.txt").
    assert stats["regular_files"] == files and stats["total_bytes"] == size + len("a.txt")
    assert stats["transferred"] == files and stats["transferred_bytes"] == size
    assert stats["directories"] == 4 and stats["symlinks"] == 1  # ".", dir, dir/deeper, empty
    assert stats["deleted"] == 0 and stats["mirror"] is True and stats["exit_code"] == 0
    assert manifest["source"]["mode"] == "mirror (not versioned)"
    assert manifest["tool_versions"]["rsync"]
    log = sync_log(tmp_path, manifest)
    assert ">f+++++++++ dir/deeper/c.txt" in log and "cL+++++++++ link -> a.txt" in log
    assert "Number of regular files transferred: %d" % files in log
    assert stats["changes"] == sum(1 for line in log.splitlines() if line[:1] in "<>ch.*" and len(line) > 12
                                   and line[11:12] == " ")
    # Listed in the catalog like every backup.
    assert Catalog(storage).latest(JOB)["id"] == manifest["id"]


def test_second_sync_transfers_changes_and_deletes(tmp_path, storage):
    source = data_tree(str(tmp_path / "data"))
    mirror = str(tmp_path / "mirror")
    sync(storage, {"path": source, "destination": mirror, "delete": True})
    write(os.path.join(source, "a.txt"), "alpha changed\n", mode=0o640)
    write(os.path.join(source, "new.txt"), "new\n")
    os.unlink(os.path.join(source, "ünï.txt"))
    shutil.rmtree(os.path.join(source, "dir", "deeper"))
    manifest = sync(storage, {"path": source, "destination": mirror, "delete": True})
    stats = manifest["stats"]
    # rsync deletes inside a directory after setting its time (same second: left alone), so
    # directory mtimes are not compared here; files, links, modes and owners are.
    assert snapshot(mirror, dir_mtimes=False) == snapshot(source, dir_mtimes=False)
    assert stats["transferred"] == 2 and stats["transferred_bytes"] == len("alpha changed\n") + len("new\n")
    assert stats["deleted"] == 3  # ünï.txt, dir/deeper, dir/deeper/c.txt
    log = sync_log(tmp_path, manifest)
    assert "*deleting   ünï.txt" in log and "*deleting   dir/deeper/c.txt" in log

    unchanged = sync(storage, {"path": source, "destination": mirror, "delete": True})
    assert unchanged["stats"]["transferred"] == 0 and unchanged["stats"]["deleted"] == 0
    assert len(Catalog(storage).scan(JOB)) == 3


def test_without_delete_the_mirror_keeps_removed_files(tmp_path, storage):
    source = data_tree(str(tmp_path / "data"))
    mirror = tmp_path / "mirror"
    sync(storage, {"path": source, "destination": str(mirror)})
    os.unlink(os.path.join(source, "a.txt"))
    manifest = sync(storage, {"path": source, "destination": str(mirror)})
    assert manifest["stats"]["deleted"] == 0 and manifest["source"]["delete"] is False
    assert (mirror / "a.txt").read_text() == "alpha\n"


def test_excludes_and_destination_inside_source(tmp_path, storage):
    source = data_tree(str(tmp_path / "data"))
    write(os.path.join(source, "cache", "x.tmp"), "junk")
    age_tree(source)
    inside = os.path.join(source, "mirror")
    sync(storage, {"path": source, "destination": inside, "exclude": ["cache/"], "delete": True})
    state = snapshot(inside)
    assert b"cache" not in state and b"mirror" not in state  # never mirrors itself
    expected = {key: value for key, value in snapshot(source).items()
                if not key.startswith((b"cache", b"mirror"))}
    assert state == expected


def test_sync_record_on_s3(tmp_path, s3_server):
    storage = open_storage(s3_server.storage_options())
    source = data_tree(str(tmp_path / "data"))
    manifest = BackupRun(JOB, DirectorySyncSource({"path": source, "destination": str(tmp_path / "m")}),
                         storage, compression={"algorithm": "gzip"}).run()
    assert snapshot(tmp_path / "m") == snapshot(source)
    assert [obj["name"] for obj in manifest["objects"]] == ["sync.log.gz"]
    assert Catalog(storage).latest(JOB)["stats"]["transferred"] == regular_files(source)[0]


def test_failures_write_no_backup(tmp_path, storage):
    source = data_tree(str(tmp_path / "data"))
    with pytest.raises(SourceError, match="not a directory"):
        sync(storage, {"path": str(tmp_path / "missing"), "destination": str(tmp_path / "m")})
    with pytest.raises(SourceError, match="does not exist"):
        sync(storage, {"path": source, "destination": str(tmp_path / "no" / "such" / "parent")})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(SourceError, match="not a directory"):
        sync(storage, {"path": source, "destination": str(blocker)})
    with pytest.raises(ConfigError, match="absolute"):
        DirectorySyncSource({"path": source, "destination": "host:/backup"})
    with pytest.raises(ConfigError, match="unknown option.*dest"):
        DirectorySyncSource({"path": source, "dest": str(tmp_path / "m")})
    with pytest.raises(ConfigError, match="source directory itself"):
        DirectorySyncSource({"path": source, "destination": source})
    with pytest.raises(ConfigError, match="would remove it"):
        DirectorySyncSource({"path": source, "destination": str(tmp_path), "delete": True})
    assert Catalog(storage).scan(JOB) == []
    assert not [info for info in storage.list("") if "/" in info.key]


def test_rsync_failure_is_reported_and_nothing_stored(tmp_path, storage):
    """rsync itself fails (a destination directory it may not write into) -> SourceError, no backup."""
    source = data_tree(str(tmp_path / "data"))
    fake = tmp_path / "bin" / "rsync"
    fake.parent.mkdir()
    real = shutil.which("rsync")
    # A real rsync run that fails: its receiver is told to write below a regular file.
    fake.write_text("#!/bin/sh\nexec %s --temp-dir=/proc/version \"$@\"\n" % real)
    fake.chmod(0o755)
    with pytest.raises(SourceError, match=r"rsync .* failed \(exit \d+\)"):
        sync(storage, {"path": source, "destination": str(tmp_path / "m"), "rsync": str(fake)})
    assert Catalog(storage).scan(JOB) == []


def test_parse_stats_reads_thousands_separators():
    text = ("Number of files: 1,234 (reg: 1,000, dir: 230, link: 4)\nNumber of created files: 7\n"
            "Number of deleted files: 0\nNumber of regular files transferred: 12\n"
            "Total file size: 9,876,543 bytes\nTotal transferred file size: 1,024 bytes\n")
    assert parse_stats(text) == {"files": 1234, "regular_files": 1000, "directories": 230, "symlinks": 4,
                                 "created": 7, "deleted": 0, "transferred": 12, "total_bytes": 9876543,
                                 "transferred_bytes": 1024}


# --------------------------------------------------------------------------- restore from the mirror

def test_restore_copies_the_mirror_of_the_latest_record(tmp_path, storage):
    source = data_tree(str(tmp_path / "data"))
    mirror = str(tmp_path / "mirror")
    first = sync(storage, {"path": source, "destination": mirror, "delete": True})
    restored = tmp_path / "restored"
    report = rs.restore(storage, JOB, DirectorySyncTarget({"path": str(restored)}))
    assert all(check["ok"] for check in report["checks"]) and len(report["checks"]) == 3
    assert snapshot(restored) == snapshot(source)

    # A later sync moves the mirror on: the older record can no longer be restored from it.
    write(os.path.join(source, "later.txt"), "later\n")
    second = sync(storage, {"path": source, "destination": mirror, "delete": True})
    blocked = tmp_path / "blocked"
    write(blocked / "live.txt", "live\n")
    with pytest.raises(IntegrityError, match="no longer matches sync record %s" % first["id"]):
        rs.restore(storage, JOB, DirectorySyncTarget({"path": str(blocked), "overwrite": True}), backup=first["id"])
    assert sorted(os.listdir(blocked)) == ["live.txt"] and (blocked / "live.txt").read_text() == "live\n"
    report = rs.restore(storage, JOB, DirectorySyncTarget({"path": str(blocked), "overwrite": True}),
                        backup=second["id"])
    assert snapshot(blocked, dir_mtimes=False) == snapshot(mirror, dir_mtimes=False)
    assert not [name for name in os.listdir(tmp_path) if ".restore-" in name]

    anyway = tmp_path / "anyway"
    report = rs.restore(storage, JOB, DirectorySyncTarget({"path": str(anyway), "require_record_match": False}),
                        backup=first["id"])
    assert (anyway / "later.txt").exists() and report["restore"]["record_matches"] is False

    with DirectorySyncTarget.scratch(second, {}) as target:
        assert all(check["ok"] for check in rs.restore(storage, JOB, target)["checks"])
    with pytest.raises(ConfigError, match="overlaps the mirror"):
        rs.restore(storage, JOB, DirectorySyncTarget({"path": os.path.join(mirror, "inside")}))
