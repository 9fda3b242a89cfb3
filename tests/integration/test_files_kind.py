# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``files`` kind on real trees: backup to filesystem and S3 storage, verified restore,
restore with stock tools only (``age -d | zstd -d | tar -x`` then ``sha256sum -c``).

Equality is proven by ``files_helpers.snapshot`` (its own walk and hashing): type, mode,
content, link target, mtime to the nanosecond and ownership (these tests run as root in
CI; ownership is compared only when they do).
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files import archive as fmt
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.target import FilesTarget

from .files_helpers import (
    age_key, decode_cmd, flip_byte, regular_file_totals, sh, snapshot, stored_object, write)

JOB = "files-test"
ROOT = os.geteuid() == 0
NON_UTF8 = b"latin1-\xe9t\xe9.txt"


def make_tree(root):
    """A tree with what tar and restores get wrong: modes, links, odd names, empty dirs, times."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    write(os.path.join(root, "plain.txt"), "hello\n", mode=0o640, mtime_ns=981173106123456789)
    write(os.path.join(root, "run.sh"), "#!/bin/sh\necho hi\n", mode=0o755)
    write(os.path.join(root, "setuid-bin"), b"\x7fELF fake", mode=0o4750)
    write(os.path.join(root, "empty-file"), b"")
    write(os.path.join(root, "ünïcödé dïr", "fïlé ✓.txt"), "unicode\n")
    write(os.path.join(root, "name\nwith newline"), "nl\n")
    write(os.path.join(root, "back\\slash"), "bs\n")
    write(os.path.join(root, "d" * 60, "e" * 60, "f" * 60, "long-name-" + "x" * 150), "deep and long\n")
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as handle:
        handle.write(b"not utf-8 name\n")
    os.makedirs(os.path.join(root, "empty", "nested-empty"))
    os.makedirs(os.path.join(root, "sticky"))
    os.chmod(os.path.join(root, "sticky"), 0o1777)
    write(os.path.join(root, "readonly", "inside.txt"), "ro\n", mode=0o444)
    os.chmod(os.path.join(root, "readonly"), 0o555)
    os.symlink("plain.txt", os.path.join(root, "link-rel"))
    os.symlink("/etc/hostname", os.path.join(root, "link-abs"))
    os.symlink("does/not/exist", os.path.join(root, "link-dangling"))
    os.symlink("ünïcödé dïr", os.path.join(root, "link-to-dir"))
    os.mkfifo(os.path.join(root, "a-fifo"), 0o620)
    write(os.path.join(root, "hard-a"), "same inode\n")
    os.link(os.path.join(root, "hard-a"), os.path.join(root, "hard-b"))
    write(os.path.join(root, "random.bin"), os.urandom(3 * 1024 * 1024 + 17))
    if ROOT:
        write(os.path.join(root, "owned"), "owned by someone else\n")
        os.chown(os.path.join(root, "owned"), 1234, 5678)
        os.lchown(os.path.join(root, "link-rel"), 4321, 8765)
    # Directory mtimes last: creating children changes them.
    os.utime(os.path.join(root, "empty"), ns=(1500000000987654321, 1500000000987654321))
    return root


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


def backup(storage, options, job=JOB, **kwargs):
    return BackupRun(job, FilesSource(options), storage, **kwargs).run()


def assert_all_checks_ok(report):
    checks = report["restore"]["checks"]
    assert checks and all(check["ok"] for check in checks), checks
    whats = {check["what"] for check in checks}
    assert {"files", "bytes", "tree_sha256", "files.sha256 agrees with files.index"} <= whats


# --------------------------------------------------------------------------- round trips

def test_round_trip_keeps_modes_links_times_owners_and_odd_names(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    manifest = backup(storage, {"path": source})

    assert manifest["kind"] == "files" and manifest["parent"] is None
    payloads = sorted(obj["payload"] for obj in manifest["objects"] if obj.get("payload"))
    assert payloads == ["files.index", "files.sha256", "files.tar"]
    stats = manifest["stats"]
    assert stats["type"] == "full"
    assert (stats["files"], stats["bytes"]) == regular_file_totals(source)
    assert stats["symlinks"] == 4 and stats["other"] == 1  # the fifo
    assert stats["skipped"] == stats["vanished"] == stats["changed_while_read"] == 0

    destination = tmp_path / "restored"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination)}))
    assert_all_checks_ok(report)
    assert report["restore"]["files"] == stats["files"]
    after = snapshot(destination, owners=ROOT)
    assert after == before
    # Hard links come back as independent copies with the same content.
    assert os.stat(destination / "hard-a").st_ino != os.stat(destination / "hard-b").st_ino
    assert after[b"hard-a"][2] == after[b"hard-b"][2]
    # No staging directory is left next to the destination.
    assert sorted(os.listdir(tmp_path)) == ["restored", "src", "store"]


def test_stock_tools_restore_then_sha256sum_check(tmp_path, storage):
    """Disaster recovery with age, zstd, tar and sha256sum only, on an encrypted backup."""
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    identity_file, recipient = age_key(tmp_path)[:2]
    manifest = backup(storage, {"path": source}, encryption={"recipients": [recipient]})
    store = tmp_path / "store"
    tar_object = stored_object(store, JOB, manifest, "files.tar")
    sums_object = stored_object(store, JOB, manifest, "files.sha256")
    assert tar_object.endswith("files.tar.zst.age")

    out = tmp_path / "stock"
    out.mkdir()
    sh("%s | tar -x -p -f - -C %s" % (decode_cmd(tar_object, identity_file), out))
    sh("%s > %s" % (decode_cmd(sums_object, identity_file), tmp_path / "files.sha256"))
    checked = sh("sha256sum -c %s" % (tmp_path / "files.sha256"), cwd=str(out))
    assert checked.count(b": OK") == manifest["stats"]["files"]
    # GNU tar restores everything the engine does (as root: owners too), except the root's own mtime.
    assert snapshot(out, owners=ROOT) == before

    # A damaged file is caught by the stock check as well.
    with open(out / "plain.txt", "ab") as handle:
        handle.write(b"tampered")
    done = subprocess.run(["sha256sum", "-c", "--quiet", str(tmp_path / "files.sha256")], cwd=str(out),
                          capture_output=True, check=False)
    assert done.returncode == 1 and b"plain.txt: FAILED" in done.stdout


def test_round_trip_through_s3(tmp_path, s3_server):
    storage = open_storage(s3_server.storage_options())
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    identity_file, recipient, identity = age_key(tmp_path)
    manifest = backup(storage, {"path": source}, compression={"algorithm": "zstd", "level": 3},
                      encryption={"recipients": [recipient]})
    assert Catalog(storage).latest(JOB)["id"] == manifest["id"]
    destination = tmp_path / "restored"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination)}), identity=identity)
    assert_all_checks_ok(report)
    assert snapshot(destination, owners=ROOT) == before
    assert identity_file  # the key file exists for stock tools; unused here


def test_gzip_and_uncompressed_payloads_restore(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    for number, algorithm in enumerate(("gzip", "none")):
        job = "files-%s" % algorithm
        manifest = backup(storage, {"path": source}, job=job, compression={"algorithm": algorithm})
        names = sorted(obj["name"] for obj in manifest["objects"])
        suffix = {"gzip": ".gz", "none": ""}[algorithm]
        assert names == sorted(["files.index" + suffix, "files.sha256" + suffix, "files.tar" + suffix])
        destination = tmp_path / ("restored-%d" % number)
        assert_all_checks_ok(rs.restore(storage, job, FilesTarget({"path": str(destination)})))
        assert snapshot(destination, owners=ROOT) == before


def test_large_file_streams_in_bounded_memory(tmp_path):
    """A 320 MiB file through backup and restore in a child process whose peak RSS stays small."""
    source = tmp_path / "src"
    source.mkdir()
    size = 320 * 1024 * 1024
    with open(source / "big.bin", "wb") as handle:
        block = os.urandom(1 << 20)
        for index in range(size >> 20):
            handle.write(block[index:] + block[:index])  # distinct blocks, cheap to make
    script = textwrap.dedent("""
        import json, sys
        from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
        from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
        from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
        from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
        from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.target import FilesTarget
        def peak_kib():
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so the child
            # would report pytest's peak instead of its own.
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        src, store, dest = sys.argv[1:4]
        storage = open_storage({"backend": "filesystem", "path": store})
        manifest = BackupRun("big", FilesSource({"path": src}), storage, compression={"algorithm": "zstd", "level": 1}).run()
        after_backup = peak_kib()
        report = rs.restore(storage, "big", FilesTarget({"path": dest}))
        print(json.dumps({"stats": manifest["stats"], "checks": report["checks"], "backup_kib": after_backup,
                          "peak_kib": peak_kib()}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(source), str(tmp_path / "store"), str(tmp_path / "out")],
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    result = json.loads(done.stdout.decode("utf-8").splitlines()[-1])
    assert result["stats"]["bytes"] == size and result["stats"]["files"] == 1
    assert all(check["ok"] for check in result["checks"])
    assert snapshot(tmp_path / "out") == snapshot(source)
    # The payload is 320 MiB; the process never held more than a fraction of it.
    assert result["peak_kib"] < 160 * 1024, result


# --------------------------------------------------------------------------- target options

def test_subpath_restore_brings_back_only_that_subtree(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    backup(storage, {"path": source})
    destination = tmp_path / "part"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination), "subpath": "/ünïcödé dïr/"}))
    assert_all_checks_ok(report)
    assert report["restore"]["files"] == 1
    restored = snapshot(destination, owners=ROOT)
    assert set(restored) == {"ünïcödé dïr".encode(), "ünïcödé dïr/fïlé ✓.txt".encode()}
    assert all(restored[key] == before[key] for key in restored)

    single = tmp_path / "single"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(single), "subpath": "readonly/inside.txt"}))
    assert_all_checks_ok(report)
    assert snapshot(single, owners=ROOT) == {key: before[key] for key in (b"readonly", b"readonly/inside.txt")}

    with pytest.raises(ConfigError, match=r"\.\."):
        FilesTarget({"path": str(tmp_path / "x"), "subpath": "../etc"})


def test_non_empty_destination_is_refused_unless_overwrite(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    backup(storage, {"path": source})
    destination = tmp_path / "busy"
    write(destination / "keep-me.txt", "precious\n")
    with pytest.raises(ConfigError, match="not empty"):
        rs.restore(storage, JOB, FilesTarget({"path": str(destination)}))
    assert snapshot(destination) != {} and (destination / "keep-me.txt").read_text() == "precious\n"

    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination), "overwrite": True}))
    assert_all_checks_ok(report)
    assert snapshot(destination, owners=ROOT) == before  # replaced as a whole: keep-me.txt is gone
    assert sorted(os.listdir(tmp_path)) == ["busy", "src", "store"]

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert_all_checks_ok(rs.restore(storage, JOB, FilesTarget({"path": str(empty)})))
    assert snapshot(empty, owners=ROOT) == before

    with pytest.raises(ConfigError, match="absolute"):
        FilesTarget({"path": "relative/dir"})
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        rs.restore(storage, JOB, FilesTarget({"path": str(tmp_path / "a-file"), "overwrite": True}))


def test_corrupted_payload_is_refused_and_destination_unchanged(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    manifest = backup(storage, {"path": source})
    destination = tmp_path / "current"
    write(destination / "live.txt", "live data\n")
    live = snapshot(destination)
    flip_byte(stored_object(tmp_path / "store", JOB, manifest, "files.tar"))
    with pytest.raises(IntegrityError):
        rs.restore(storage, JOB, FilesTarget({"path": str(destination), "overwrite": True}))
    assert snapshot(destination) == live
    assert sorted(os.listdir(tmp_path)) == ["current", "src", "store"]


def _rewrite_payload(store, manifest, payload, transform):
    """Replace a payload by a consistent forgery: new bytes, manifest entry updated to match.

    The stored bytes then pass every checksum; only the target's own checks can tell.
    """
    import hashlib  # pylint: disable=import-outside-toplevel
    import zstandard  # pylint: disable=import-outside-toplevel
    path = stored_object(store, JOB, manifest, payload)
    with open(path, "rb") as handle:
        plain = zstandard.ZstdDecompressor().decompressobj().decompress(handle.read())
    data = zstandard.ZstdCompressor().compress(transform(plain))
    with open(path, "wb") as handle:
        handle.write(data)
    manifest_path = os.path.join(str(store), JOB, manifest["id"], "manifest.json")
    with open(manifest_path, encoding="utf-8") as handle:
        stored = json.load(handle)
    for obj in stored["objects"]:
        if obj.get("payload") == payload:
            obj["size"], obj["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    with open(manifest_path, "w", encoding="utf-8") as handle:
        json.dump(stored, handle, indent=2, sort_keys=True)
    index = os.path.join(str(store), JOB, "index.json")
    if os.path.exists(index):
        os.unlink(index)  # the catalog's cache would otherwise serve the old manifest


@pytest.mark.parametrize("payload, transform, failing", [
    ("files.sha256", lambda data: data.replace(data[:8], b"0" * 8, 1), "files.sha256 agrees"),
    ("files.index", lambda data: data.replace(b'"mode":416', b'"mode":420'), "files.index agrees with the manifest"),
    ("files.tar", lambda data: data.replace(b"hello\n", b"HELLO\n"), "tree_sha256"),
])
def test_consistent_forgery_is_caught_by_the_target(tmp_path, storage, payload, transform, failing):
    source = make_tree(tmp_path / "src")
    manifest = backup(storage, {"path": source})
    _rewrite_payload(tmp_path / "store", manifest, payload, transform)
    destination = tmp_path / "current"
    write(destination / "live.txt", "live data\n")
    live = snapshot(destination)
    with pytest.raises(IntegrityError, match=re.escape(failing)):
        rs.restore(storage, JOB, FilesTarget({"path": str(destination), "overwrite": True}))
    assert snapshot(destination) == live
    assert sorted(os.listdir(tmp_path)) == ["current", "src", "store"]


def test_check_mode_reads_but_writes_nothing(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    manifest = backup(storage, {"path": source})
    destination = tmp_path / "not-yet"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination)}), check_mode=True)
    assert report["changed"] is False and not destination.exists()
    assert "would restore" in report["plan"] and report["restore"]["destination"] == str(destination)
    assert report["checks"] and all(check["ok"] for check in report["checks"])
    chain = [manifest]
    context = rs.restore_context(storage, manifest, chain, {manifest["id"]: None}, check_mode=True)
    plan = FilesTarget({"path": str(destination)}).restore(context)
    assert all(check["ok"] for check in plan["checks"]) and "would restore" in plan["plan"]
    assert not destination.exists()


def test_scratch_target_restores_and_cleans_up(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    manifest = backup(storage, {"path": source})
    options = kinds.scratch_options_from_source("files", {"path": source, "incremental": True})
    with FilesTarget.scratch(manifest, options) as target:
        assert target.path != source
        report = rs.restore(storage, JOB, target)
        assert_all_checks_ok(report)
        assert snapshot(target.path, owners=ROOT) == before
        scratch_root = os.path.dirname(target.path)
    assert not os.path.exists(scratch_root)


# --------------------------------------------------------------------------- source options

def test_exclude_one_file_system_and_storage_inside_the_tree(tmp_path):
    source = make_tree(tmp_path / "src")
    write(os.path.join(source, "cache", "junk.tmp"), "junk")
    write(os.path.join(source, "logs", "app.log"), "log")
    write(os.path.join(source, "keep.tmp"), "tmp")
    # The backups land inside the tree they back up: they must never archive themselves.
    storage = open_storage({"backend": "filesystem", "path": os.path.join(source, "backups")})
    first = backup(storage, {"path": source, "exclude": ["cache", "*.tmp", "logs/*.log"], "one_file_system": True})
    second = backup(storage, {"path": source, "exclude": ["cache", "*.tmp", "logs/*.log"]})
    destination = tmp_path / "restored"
    rs.restore(storage, JOB, FilesTarget({"path": str(destination)}), backup=second["id"])
    restored = snapshot(destination)
    assert b"cache" not in restored and b"keep.tmp" not in restored and b"logs/app.log" not in restored
    assert b"logs" in restored and b"backups" not in restored
    assert first["stats"]["files"] == second["stats"]["files"] == restored_files(restored)
    assert second["source"]["exclude"] == ["cache", "*.tmp", "logs/*.log"]


def restored_files(state):
    return sum(1 for value in state.values() if value[0] == "file")


def test_bad_source_options_and_missing_source(tmp_path, storage):
    with pytest.raises(ConfigError, match="absolute"):
        FilesSource({"path": "relative"})
    with pytest.raises(ConfigError, match="unknown option.*incremntal"):
        FilesSource({"path": "/tmp", "incremntal": True})
    with pytest.raises(ConfigError, match="unknown option.*overwrte"):
        FilesTarget({"path": "/tmp/x", "overwrte": True})
    assert FilesSource({"path": "/tmp", "incremental": "false"}).incremental is False
    with pytest.raises(ConfigError, match="max_chain_age"):
        FilesSource({"path": "/tmp", "incremental": True, "max_chain_age": "soon"})
    with pytest.raises(ConfigError, match="full_every"):
        FilesSource({"path": "/tmp", "full_every": "often"})
    with pytest.raises(SourceError, match="not a directory"):
        backup(storage, {"path": str(tmp_path / "missing")})
    assert Catalog(storage).scan(JOB) == []


def test_index_and_sums_formats(tmp_path, storage):
    """The documented payload formats, read with nothing but json and sha256sum's rules."""
    source = make_tree(tmp_path / "src")
    manifest = backup(storage, {"path": source})
    store = tmp_path / "store"
    index_lines = sh(decode_cmd(stored_object(store, JOB, manifest, "files.index"))).splitlines()
    header = json.loads(index_lines[0])
    assert header == {"format": fmt.INDEX_FORMAT, "version": fmt.INDEX_VERSION}
    entries = [json.loads(line) for line in index_lines[1:]]
    assert entries[0]["path"] == "." and entries[0]["type"] == "dir"
    by_path = {entry["path"]: entry for entry in entries}
    assert by_path["plain.txt"]["mode"] == 0o640 and by_path["plain.txt"]["mtime"] == 981173106123456789
    assert by_path["link-rel"]["target"] == "plain.txt"
    assert os.fsencode(next(p for p in by_path if p.startswith("latin1"))) == NON_UTF8
    # Walk order: components compared as bytes.
    keys = [fmt.sort_key(entry["path"]) for entry in entries]
    assert keys == sorted(keys)
    sums = sh(decode_cmd(stored_object(store, JOB, manifest, "files.sha256"))).splitlines()
    assert len(sums) == manifest["stats"]["files"]
    assert b"\\" + by_path["name\nwith newline"]["sha256"].encode() + b"  name\\nwith newline" in sums
    # The tar lists exactly the index's entries (root excluded, fifo included).
    listing = sh("%s | tar -t -f -" % decode_cmd(stored_object(store, JOB, manifest, "files.tar")))
    assert len(listing.splitlines()) == len(entries) - 1  # the root is not archived; tar -t escapes the newline


@pytest.mark.allow_skip("needs permission to mount a tmpfs (root outside a restricted container)")
def test_restore_into_a_mount_point(tmp_path, storage):
    """A volume's mount point cannot be renamed: staging happens inside it, on its filesystem."""
    source = make_tree(tmp_path / "src")
    before = snapshot(source, owners=ROOT)
    backup(storage, {"path": source})
    volume = tmp_path / "volume"
    volume.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(volume)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % done.stderr.decode("utf-8", "replace").strip())
    try:
        write(volume / "old-data.txt", "to be replaced\n")
        with pytest.raises(ConfigError, match="not empty"):
            rs.restore(storage, JOB, FilesTarget({"path": str(volume)}))
        report = rs.restore(storage, JOB, FilesTarget({"path": str(volume), "overwrite": True}))
        assert_all_checks_ok(report)
        assert os.path.ismount(volume)
        assert snapshot(volume, owners=ROOT) == before  # old-data.txt gone, no staging leftovers
        assert os.stat(volume).st_mode & 0o7777 == os.stat(source).st_mode & 0o7777
    finally:
        subprocess.run(["umount", str(volume)], check=False)


def test_restore_without_ownership(tmp_path, storage):
    source = make_tree(tmp_path / "src")
    backup(storage, {"path": source})
    destination = tmp_path / "mine"
    report = rs.restore(storage, JOB, FilesTarget({"path": str(destination), "ownership": False}))
    assert_all_checks_ok(report)
    assert report["restore"]["ownership_restored"] is False
    assert snapshot(destination, owners=False) == snapshot(source, owners=False)
    paths = [os.path.join(d, n) for d, ds, fs in os.walk(destination) for n in ds + fs]
    owners = {(os.lstat(path).st_uid, os.lstat(path).st_gid) for path in paths}
    assert owners == {(os.geteuid(), os.getegid())}
