"""FilesystemStorage on real directories and real mounts: atomic publication, crashes,
a full disk, a read-only filesystem.

A full disk and a read-only filesystem are real tmpfs mounts (the tests run as root, as CI
does); without the permission to mount they skip, or fail under CI=true.
"""

import contextlib
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pyrage
import pytest

from ci_env import require_or_skip

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, NotFoundError, StorageError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import store_stream
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import filesystem
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

MiB = 1 << 20


@contextlib.contextmanager
def tmpfs(size_kib, options=""):
    """A real, small tmpfs mounted on a fresh directory (unmounted afterwards)."""
    point = tempfile.mkdtemp(prefix="bb-tmpfs-")
    opts = "size=%dk" % size_kib + ("," + options if options else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", point], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.rmdir(point)
        require_or_skip("cannot mount a tmpfs here (%s)" % done.stderr.strip())
    try:
        yield point
    finally:
        subprocess.run(["umount", point], check=True)
        os.rmdir(point)


class RandomSource:
    """Incompressible bytes (a reused random block with a position stamp)."""

    def __init__(self, size):
        self.size, self.pos = size, 0
        self.block = os.urandom(MiB)

    def read(self, n=-1):
        n = min(self.size - self.pos if n is None or n < 0 else n, self.size - self.pos)
        chunk = (b"%016x" % self.pos + self.block[16:n]) if n > 16 else self.block[:n]
        self.pos += len(chunk)
        return chunk


class GeneratedFiles(Source):
    kind = "files"

    def produce(self, emit, context):
        emit("data.tar", RandomSource(self.options["size"]))
        return {"files": 1}


def files_on_disk(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dummy, fs in os.walk(root) for f in fs)


# -- atomic publication --------------------------------------------------------------------

def test_write_goes_to_a_hidden_temp_name_is_fsynced_then_renamed(tmp_path, monkeypatch):
    storage = FilesystemStorage(str(tmp_path / "root"))
    calls = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        calls.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
        return real_fsync(fd)

    def rename(src, dst):
        calls.append(("rename", src, dst))
        return real_rename(src, dst)

    monkeypatch.setattr(filesystem.os, "fsync", fsync)
    monkeypatch.setattr(filesystem.os, "rename", rename)
    writer = storage.open_writer("job/20240101T000000Z-000000/payload")
    writer.write(b"a" * 1000)
    # Mid-write: only the temporary file exists, and listings show no payload.
    assert not storage.exists("job/20240101T000000Z-000000/payload")
    hidden = files_on_disk(str(tmp_path / "root"))
    assert len(hidden) == 1 and os.path.basename(hidden[0]).startswith(".payload.tmp-")
    assert writer.commit() == 1000
    final = str(tmp_path / "root" / "job" / "20240101T000000Z-000000" / "payload")
    renames = [c for c in calls if c[0] == "rename"]
    assert len(renames) == 1 and renames[0][2] == final and ".payload.tmp-" in renames[0][1]
    order = [c[0] for c in calls]
    first_rename = order.index("rename")
    # The file's data is fsynced before the rename; its directory after it; and so are the
    # parents of the directories this write created (job/ and the backup directory).
    assert calls[first_rename - 1] == ("fsync", renames[0][1])
    synced_after = {c[1] for c in calls[first_rename + 1:] if c[0] == "fsync"}
    assert {str(tmp_path / "root" / "job" / "20240101T000000Z-000000"), str(tmp_path / "root" / "job"),
            str(tmp_path / "root")} <= synced_after
    assert storage.get_bytes("job/20240101T000000Z-000000/payload") == b"a" * 1000
    assert files_on_disk(str(tmp_path / "root")) == ["job/20240101T000000Z-000000/payload"]


def test_abort_leaves_nothing(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    writer = storage.open_writer("j/x/p")
    writer.write(b"data" * 1000)
    writer.abort()
    writer.abort()  # idempotent, never raises
    assert files_on_disk(str(tmp_path / "root")) == []
    with pytest.raises(NotFoundError):
        storage.get_bytes("j/x/p")


def test_context_manager_aborts_on_error(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    with pytest.raises(RuntimeError):
        with storage.open_writer("j/x/p") as writer:
            writer.write(b"x")
            raise RuntimeError("boom")
    assert files_on_disk(str(tmp_path / "root")) == []


def test_replacing_an_object_is_atomic_for_readers(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    storage.put_bytes("j/index.json", b"old")
    reader = storage.open_reader("j/index.json")
    storage.put_bytes("j/index.json", b"new!")
    assert reader.read() == b"old"  # an open reader keeps the complete old object
    reader.close()
    assert storage.get_bytes("j/index.json") == b"new!"


CRASH_WRITER = textwrap.dedent("""
    import sys
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage

    class Endless(Source):
        kind = "files"
        def produce(self, emit, context):
            class Reader:
                def read(self, n=-1):
                    return b"\\x5a" * n  # never ends: the test kills us
            emit("data.tar", Reader())
            return {}

    print("started", flush=True)
    BackupRun("crashy", Endless({}), FilesystemStorage(sys.argv[1]), {"algorithm": "none"}).run()
""")


def test_a_killed_run_leaves_only_an_orphan_never_a_visible_backup(tmp_path):
    root = str(tmp_path / "root")
    storage = FilesystemStorage(root)
    catalog = Catalog(storage)
    # One complete backup before the crash.
    good = BackupRun("crashy", GeneratedFiles({"size": MiB}), storage, {"algorithm": "none"}).run()
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, root], stdout=subprocess.PIPE, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            partial = [k for k in files_on_disk(root) if ".tmp-" in k]
            if partial and os.path.getsize(os.path.join(root, partial[0])) > 20 * MiB:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the writer never got going: %s" % files_on_disk(root))
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup of any kind runs
    finally:
        proc.kill()
        proc.wait()
    leftovers = [k for k in files_on_disk(root) if good["id"] not in k and not k.endswith("index.json")]
    assert len(leftovers) == 1 and ".data.tar.tmp-" in leftovers[0]
    assert [m["id"] for m in catalog.scan("crashy")] == [good["id"]]
    assert catalog.junk == []
    # The dead run's directory is an orphan for prune, never a backup.
    assert [info.key for info in catalog.orphans] == [leftovers[0]]
    assert catalog.latest("crashy")["id"] == good["id"]


# -- bad places ----------------------------------------------------------------------------

def test_disk_full_fails_clearly_and_leaves_nothing():
    with tmpfs(4096) as point:
        storage = FilesystemStorage(point)
        identity = pyrage.x25519.Identity.generate()
        for encryption in (None, {"recipients": [str(identity.to_public())]}):
            run = BackupRun("full", GeneratedFiles({"size": 16 * MiB}), storage, {"algorithm": "zstd", "level": 1}, encryption)
            with pytest.raises(StorageError) as info:
                run.run()
            message = str(info.value)
            assert message.startswith("writing %s/full/" % point) and message.endswith("failed: disk full"), message
            assert files_on_disk(point) == []
        # Small writes that only fail when flushed at commit are reported the same way.
        filler = storage.open_writer("full/filler")
        with pytest.raises(StorageError, match="disk full"):
            for dummy in range(8):
                filler.write(os.urandom(MiB))
            filler.commit()
        assert files_on_disk(point) == []
        # Space is back once the failed run cleaned up: a small backup still fits.
        manifest = BackupRun("full", GeneratedFiles({"size": MiB}), storage, {"algorithm": "none"}).run()
        assert Catalog(storage).latest("full")["id"] == manifest["id"]


def test_another_process_filling_the_disk_mid_write(tmp_path):
    with tmpfs(1024) as point:
        storage = FilesystemStorage(point)
        writer = storage.open_writer("j/x/p")
        writer.write(os.urandom(4000))
        with open(os.path.join(point, "hog"), "wb") as hog:
            with pytest.raises(OSError):
                hog.write(os.urandom(2 * MiB))
                hog.flush()
        with pytest.raises(StorageError, match=r"(writing|publishing) %s/j/x/p failed: disk full" % point):
            writer.write(os.urandom(64 * 1024))
            writer.commit()
        assert not os.path.exists(os.path.join(point, "j", "x", "p"))
        assert [f for f in files_on_disk(point) if f != "hog"] == []


def test_read_only_filesystem():
    with tmpfs(1024, "ro") as point:
        storage = FilesystemStorage(os.path.join(point, "backups"))
        with pytest.raises(StorageError, match="cannot create storage directory %s/backups: Read-only file system" % point):
            storage.ensure_ready()
        with pytest.raises(StorageError, match="Read-only file system"):
            BackupRun("ro", GeneratedFiles({"size": MiB}), storage).run()
        storage = FilesystemStorage(point)
        with pytest.raises(StorageError, match="storage directory %s is not writable" % point):
            storage.ensure_ready()


def test_keys_cannot_escape_the_root(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    for key in ("../x", "a/../../x", "a/./b", "", "/"):
        with pytest.raises(StorageError, match="invalid object key"):
            storage.open_writer(key)
    with pytest.raises(StorageError, match="invalid listing prefix"):
        storage.list("../")
    assert not (tmp_path / "x").exists()


def test_relative_root_is_refused():
    with pytest.raises(StorageError, match="must be an absolute directory"):
        FilesystemStorage("backups")
    with pytest.raises(ConfigError, match="storage.path must be an absolute path, got 'rel'"):
        open_storage({"backend": "filesystem", "path": "rel"})
    with pytest.raises(ConfigError, match="storage.path is required for backend nfs"):
        open_storage({"backend": "nfs"})
    with pytest.raises(ConfigError, match="storage.backend must be one of filesystem, s3, nfs, got 'ftp'"):
        open_storage({"backend": "ftp"})


def test_open_storage_prefix_and_nfs(tmp_path):
    storage = open_storage({"backend": "nfs", "path": str(tmp_path), "prefix": "/team/a/"})
    assert storage.backend == "nfs" and storage.root == str(tmp_path / "team" / "a")
    assert storage.describe() == {"backend": "nfs", "path": str(tmp_path / "team" / "a")}
    storage.put_bytes("j/x", b"1")
    assert (tmp_path / "team" / "a" / "j" / "x").read_bytes() == b"1"


# -- listing and deleting --------------------------------------------------------------------

def test_listing_is_sorted_prefix_filtered_and_sees_only_files(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    for key in ("b/2/x", "a/1/y", "a/1/x", "ab/1/z", "a/2/sub/deep", "top"):
        storage.put_bytes(key, key.encode())
    os.makedirs(str(tmp_path / "root" / "a" / "empty"))
    assert [i.key for i in storage.list()] == ["a/1/x", "a/1/y", "a/2/sub/deep", "ab/1/z", "b/2/x", "top"]
    assert [i.key for i in storage.list("a/")] == ["a/1/x", "a/1/y", "a/2/sub/deep"]
    assert [i.key for i in storage.list("a")] == ["a/1/x", "a/1/y", "a/2/sub/deep", "ab/1/z"]
    assert [i.key for i in storage.list("a/1/")] == ["a/1/x", "a/1/y"]
    assert [i.key for i in storage.list("a/1/x")] == ["a/1/x"]
    assert storage.list("nothing/") == []
    info = storage.list("top")[0]
    assert info.size == 3 and info.modified.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - info.modified).total_seconds()) < 300


def test_delete_prunes_empty_directories_but_not_the_root(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    storage.put_bytes("j/b1/x", b"1")
    storage.put_bytes("j/b2/x", b"2")
    storage.delete("j/b1/x")
    storage.delete("j/b1/x")  # missing: not an error
    assert not (tmp_path / "root" / "j" / "b1").exists() and (tmp_path / "root" / "j" / "b2").exists()
    storage.delete("j/b2/x")
    assert (tmp_path / "root").is_dir() and os.listdir(str(tmp_path / "root")) == []


def test_missing_object_messages(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    with pytest.raises(NotFoundError, match="object j/x/manifest.json not found in %s" % (tmp_path / "root")):
        storage.get_bytes("j/x/manifest.json")
    assert not storage.exists("j/x/manifest.json")
    storage.put_bytes("j/x/p", b"1")
    with pytest.raises(StorageError, match="cannot read j/x: Is a directory"):
        storage.get_bytes("j/x")


def test_store_stream_into_a_filesystem_is_exactly_what_the_manifest_says(tmp_path):
    storage = FilesystemStorage(str(tmp_path / "root"))
    identity = pyrage.x25519.Identity.generate()
    result = store_stream(RandomSource(3 * MiB), storage, "j/b/p", codecs.compression_settings({"algorithm": "gzip"}),
                          codecs.encryption_settings({"recipients": [str(identity.to_public())]}))
    data = (tmp_path / "root" / "j" / "b" / "p").read_bytes()
    assert len(data) == result["size"]
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    assert json.loads(json.dumps(result)) == result
    assert result["raw_bytes"] == 3 * MiB
