"""engine/restic against the real restic (Debian's 0.14.0): filesystem repositories and SeaweedFS.

Nothing is replaced: every test runs restic on a repository it creates, and damages or locks
it the way a real failure would (a flipped byte in a pack, a SIGKILLed or stopped restic).
"""

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ci_env import require_or_skip
from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, NotFoundError, SourceError, StorageError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.procutil import tool_env

PASSWORD = "pw-Zq8-restic-repository-secret"
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _restic_installed():
    import shutil
    if shutil.which("restic") is None:
        require_or_skip("restic is not installed")


def payload(size, seed=1):
    """Deterministic, compressible-ish bytes: text rows derived from a counter."""
    rows = []
    total = 0
    index = 0
    while total < size:
        row = ("%08d,%d,subject-%d,template:%s\n" % (index, seed, index % 977,
                                                     hashlib.sha256(b"%d-%d" % (seed, index)).hexdigest()))
        rows.append(row)
        total += len(row)
        index += 1
    return "".join(rows).encode()[:size]


def open_repo(tmp_path, name="repo", password=PASSWORD, **kwargs):
    options = {"backend": "filesystem", "path": str(tmp_path), "prefix": name}
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return rs.ResticRepository(options, password, **kwargs)


def tags(backup_id, kind="postgres", job="pg-main"):
    return {"job": job, "kind": kind, "backup_id": backup_id}


class FailingReader:
    """A source that fails after ``fail_after`` bytes, like a pg_dump that dies mid-stream."""

    def __init__(self, data, fail_after):
        self._data = io.BytesIO(data)
        self._left = fail_after

    def read(self, size):
        if self._left <= 0:
            raise SourceError("pg_dump failed (exit 1): connection lost")
        chunk = self._data.read(min(size, self._left))
        self._left -= len(chunk)
        return chunk


def restic_env(password=PASSWORD):
    return tool_env({"RESTIC_PASSWORD": password}, drop=rs._DROP_ENV)  # pylint: disable=protected-access


def test_a_backup_learns_its_full_snapshot_id_from_the_listing_not_from_restic(tmp_path, monkeypatch):
    """restic 0.14's backup summary names the snapshot by its short id; the full id comes from the
    names under snapshots/ (no second restic start, no decryption of every snapshot), and only an
    ambiguous prefix asks restic."""
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    listed = []
    real = rs.ResticRepository._snapshots_json
    monkeypatch.setattr(rs.ResticRepository, "_snapshots_json",
                        lambda self, args: listed.append(args) or real(self, args))
    result = repo.backup_stream(io.BytesIO(b"enrolment"), "dump.rdb", tags("20240101T000000Z-aaaaaa", kind="redis"))
    assert listed == []
    [snap] = repo.snapshots()
    assert result["snapshot_id"] == snap["id"] and result["short_id"] == snap["short_id"]
    assert result["paths"] == snap["paths"] == ["/dump.rdb"]
    # a name that shares the short id (as a second snapshot might): restic decides
    decoy = tmp_path / "repo" / "snapshots" / (snap["id"][:8] + "0" * 56)
    decoy.write_bytes(b"")
    assert repo._full_snapshot_id(snap["id"][:8]) == snap["id"]   # pylint: disable=protected-access
    assert listed, "an ambiguous short id must be resolved by restic"


def test_stream_round_trip_dedup_tags_and_check(tmp_path):
    repo = open_repo(tmp_path)
    assert repo.init_if_missing() is True
    assert repo.init_if_missing() is False
    assert repo.config()["version"] == 2
    data = payload(6 * MiB)
    first = repo.backup_stream(io.BytesIO(data), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    assert first["size"] == len(data)
    assert first["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(first["snapshot_id"]) == 64
    assert first["data_added"] >= len(data) * 0.9  # restic 0.14 counts new data before compression

    second = repo.backup_stream(io.BytesIO(data), "dump.pgdump", tags("20240102T000000Z-bbbbbb"))
    assert second["snapshot_id"] != first["snapshot_id"]
    assert second["data_added"] <= 0.01 * len(data), second  # only the new tree blob

    other = repo.backup_stream(io.BytesIO(b"redis rdb"), "dump.rdb", tags("20240103T000000Z-cccccc", kind="redis"))
    assert [s["id"] for s in repo.snapshots()] == [first["snapshot_id"], second["snapshot_id"], other["snapshot_id"]]
    postgres = repo.snapshots({"kind": "postgres"})
    assert [s["id"] for s in postgres] == [first["snapshot_id"], second["snapshot_id"]]
    assert postgres[1]["tag_map"] == {"job": "pg-main", "kind": "postgres", "backup_id": "20240102T000000Z-bbbbbb"}
    assert [s["id"] for s in repo.snapshots({"backup_id": "20240103T000000Z-cccccc"})] == [other["snapshot_id"]]
    assert postgres[0]["hostname"] == rs.DEFAULT_HOST

    sink = io.BytesIO()
    dumped = repo.dump(second["snapshot_id"], "dump.pgdump", sink)
    assert dumped == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sink.getvalue() == data
    assert repo.check() is not None
    repo.check(read_data_subset="all")
    repo.check(read_data_subset="50%")
    with pytest.raises(ConfigError, match="read_data_subset"):
        repo.check(read_data_subset="half")

    # Stock restorability: restic itself, with nothing but the password, gives the bytes back.
    stock = subprocess.run(["restic", "-r", repo.url, "--no-cache", "dump", first["short_id"], "/dump.pgdump"],
                           env=restic_env(), capture_output=True, check=True)
    assert hashlib.sha256(stock.stdout).hexdigest() == first["sha256"]


def test_source_failure_mid_stream_leaves_no_snapshot_and_no_lock(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    with pytest.raises(SourceError, match="connection lost"):
        repo.backup_stream(FailingReader(payload(4 * MiB), 3 * MiB), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    assert repo.snapshots() == []
    assert repo.locks() == []
    repo.check()


def test_directory_backup_restore_forget_prune(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    source = tmp_path / "files"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(payload(3 * MiB, seed=2))
    (source / "sub" / "b.txt").write_bytes(b"hello\n")
    first = repo.backup_directory(str(source), tags("20240101T000000Z-aaaaaa", kind="files"))
    assert first["files_new"] == 2 and first["sha256"] is None
    (source / "sub" / "c.txt").write_bytes(b"new file\n")
    second = repo.backup_directory(str(source), tags("20240102T000000Z-bbbbbb", kind="files"))
    assert second["files_new"] == 1 and second["files_unmodified"] == 2  # parent found: same host, path
    assert second["data_added"] < 10000

    target = tmp_path / "restored"
    repo.restore(second["snapshot_id"], str(target))
    restored = target / str(source).lstrip("/")
    assert (restored / "a.bin").read_bytes() == (source / "a.bin").read_bytes()
    assert (restored / "sub" / "c.txt").read_bytes() == b"new file\n"

    big = repo.backup_stream(io.BytesIO(os.urandom(4 * MiB)), "dump.rdb", tags("20240103T000000Z-cccccc", kind="redis"))
    before = repo.stored_bytes()
    assert repo.forget([big["snapshot_id"]]) == [big["snapshot_id"]]
    assert repo.forget([]) == []
    assert big["snapshot_id"] not in [s["id"] for s in repo.snapshots()]
    repo.prune(max_unused="0%")
    after = repo.stored_bytes()
    assert before - after >= 3.9 * MiB, (before, after)
    repo.check(read_data_subset="all")


def _data_packs(repo_dir):
    packs = []
    for root, dummy, files in os.walk(os.path.join(repo_dir, "data")):
        packs.extend(os.path.join(root, name) for name in files)
    return packs


def test_corrupted_pack_fails_check_read_data_and_dump(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    data = os.urandom(2 * MiB)
    result = repo.backup_stream(io.BytesIO(data), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    repo.check(read_data_subset="all")
    pack = max(_data_packs(str(tmp_path / "repo")), key=os.path.getsize)
    with open(pack, "r+b") as handle:
        handle.seek(os.path.getsize(pack) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    repo.check()  # the structure is intact: only reading the data finds it
    with pytest.raises(IntegrityError, match="restic check found errors") as excinfo:
        repo.check(read_data_subset="all")
    assert PASSWORD not in str(excinfo.value)
    with pytest.raises(IntegrityError):
        repo.dump(result["snapshot_id"], "dump.pgdump", io.BytesIO())


def _start_held_backup(repo):
    """A real restic backup --stdin whose input we hold open: it holds a (shared) lock."""
    proc = subprocess.Popen(
        ["restic", "-r", repo.url, "--no-cache", "backup", "--stdin", "--stdin-filename", "held"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=restic_env())
    deadline = time.monotonic() + 30
    while not repo.locks():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def test_stale_lock_of_a_killed_restic_is_removed_live_lock_is_refused(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    repo.backup_stream(io.BytesIO(b"x" * 1000), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))

    killed = _start_held_backup(repo)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    locks = repo.locks()
    assert len(locks) == 1 and locks[0]["stale"] and locks[0]["pid"] == killed.pid
    assert repo.unlock_stale() == [locks[0]["id"]]
    assert repo.locks() == []

    # A stale lock does not get in the way: forget (exclusive) removes it and goes on.
    killed = _start_held_backup(repo)
    killed.kill()
    killed.wait()
    extra = repo.backup_stream(io.BytesIO(b"y" * 1000), "dump.pgdump", tags("20240102T000000Z-bbbbbb"))
    assert repo.forget([extra["snapshot_id"]]) == [extra["snapshot_id"]]

    live = _start_held_backup(repo)
    try:
        held = repo.locks()
        assert len(held) == 1 and not held[0]["stale"]
        assert repo.unlock_stale() == []
        with pytest.raises(rs.RepositoryLockedError, match="locked by another process and the lock is live"):
            repo.prune()
        assert repo.locks()[0]["id"] == held[0]["id"]  # still there: never removed
        # With a bounded wait, the command goes through once the other job finishes.
        waiting = open_repo(tmp_path, lock_wait=60)
        live.stdin.write(b"held data")
        live.stdin.close()
        waiting.prune()
        assert live.wait(timeout=30) == 0
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    repo.check()


@pytest.mark.parametrize("command", ["prune", "check"])
def test_a_lock_that_turns_stale_during_the_wait_is_removed_then(tmp_path, command):
    """A job killed a moment ago: its lock is live when the next command is refused, and stale
    once its process is reaped. The waiting command removes it then and goes on, instead of
    retrying against it until lock_wait has passed."""
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    repo.backup_stream(io.BytesIO(b"x" * 1000), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    holder = _start_held_backup(repo)
    reaper = threading.Timer(3.0, lambda: (holder.kill(), holder.wait()))
    reaper.start()
    waiting = open_repo(tmp_path, lock_wait=90)
    started = time.monotonic()
    try:
        getattr(waiting, command)()
    finally:
        reaper.join()
    assert holder.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 45, "the stale lock was not removed during the wait"
    assert waiting.locks() == []


def test_backup_refused_while_another_job_holds_an_exclusive_lock(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    repo.backup_stream(io.BytesIO(os.urandom(32 * MiB)), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    locks_dir = str(tmp_path / "repo" / "locks")
    check = subprocess.Popen(["restic", "-r", repo.url, "--no-cache", "check", "--read-data"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=restic_env())
    try:
        # Stop restic check (an exclusive lock) as soon as its lock file appears.
        deadline = time.monotonic() + 30
        # (restic writes a lock under a temporary name first, then renames it)
        while not [name for name in os.listdir(locks_dir) if len(name) == 64 and "-" not in name]:
            assert check.poll() is None and time.monotonic() < deadline, "check finished before it was seen"
            time.sleep(0.002)
        os.kill(check.pid, signal.SIGSTOP)
        assert repo.locks()[0]["exclusive"]
        with pytest.raises(rs.RepositoryLockedError, match="locked exclusively by PID %d" % check.pid):
            repo.backup_stream(io.BytesIO(b"data"), "dump.pgdump", tags("20240102T000000Z-bbbbbb"))
    finally:
        os.kill(check.pid, signal.SIGCONT)
        check.wait(timeout=60)
    assert len(repo.snapshots()) == 1


def test_wrong_password_error_names_no_secret(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    wrong = open_repo(tmp_path, password="not-the-" + PASSWORD)
    for call in (wrong.snapshots, wrong.init_if_missing, wrong.check):
        with pytest.raises(ConfigError, match="the password does not open it") as excinfo:
            call()
        assert PASSWORD not in str(excinfo.value) and "not-the-" not in str(excinfo.value)
    with pytest.raises(ConfigError):
        wrong.backup_stream(io.BytesIO(b"data"), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    assert PASSWORD not in " ".join(repo._argv(["backup"]))  # pylint: disable=protected-access
    assert len(repo.snapshots()) == 0


def test_manifest_names_the_snapshot_and_dump_matches_it(tmp_path):
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    data = payload(MiB)
    result = repo.backup_stream(io.BytesIO(data), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    manifest = rs.build_manifest("20240101T000000Z-aaaaaa", "pg-main", "postgres", "2024-01-01T00:00:00Z",
                                 "2024-01-01T00:00:05Z", result, repo.config(), {"restic": repo.version()[0]},
                                 {"rows": 10}, filename="dump.pgdump")
    manifest = mf.loads(mf.dumps(manifest))
    assert manifest["size_bytes"] == len(data)
    snapshot = rs.manifest_snapshot(manifest)
    assert snapshot == result["snapshot_id"]
    assert manifest["restic"]["repository_id"] == repo.config()["id"]
    assert repo.dump(snapshot, manifest["objects"][0]["name"], io.BytesIO())["sha256"] == manifest["objects"][0]["sha256"]


@pytest.mark.usefixtures("s3_server")
def test_s3_round_trip(s3_server, tmp_path):
    options = rs.job_repository_options(s3_server.storage_options(), "pg-main")
    repo = rs.ResticRepository(options, PASSWORD, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(NotFoundError, match="there is no restic repository at s3:"):
        repo.snapshots()
    assert repo.url.startswith("s3:%s/%s/" % (s3_server.endpoint_url, s3_server.bucket))
    assert repo.url.endswith("/_restic/pg-main")
    assert s3_server.secret_key not in " ".join(repo._argv(["init"]))  # pylint: disable=protected-access
    assert repo.init_if_missing() is True
    data = payload(5 * MiB, seed=3)
    first = repo.backup_stream(io.BytesIO(data), "dump.pgdump", tags("20240101T000000Z-aaaaaa"))
    second = repo.backup_stream(io.BytesIO(data), "dump.pgdump", tags("20240102T000000Z-bbbbbb"))
    assert second["data_added"] <= 0.01 * len(data)
    sink = io.BytesIO()
    assert repo.dump(first["snapshot_id"], "dump.pgdump", sink)["sha256"] == hashlib.sha256(data).hexdigest()
    assert sink.getvalue() == data
    repo.check(read_data_subset="all")
    stored = repo.stored_bytes()
    assert 0 < stored < len(data)  # compressed, and the second backup added nothing
    keys = [obj["Key"] for obj in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix=options["prefix"] + "/").get("Contents", [])]
    assert any("/data/" in key for key in keys) and any(key.endswith("/config") for key in keys)

    bad = dict(options, secret_key="wrong" + s3_server.secret_key)
    with pytest.raises(StorageError, match="cannot open the restic repository") as excinfo:
        rs.ResticRepository(bad, PASSWORD, cache_dir=str(tmp_path / "cache2")).snapshots()
    assert s3_server.secret_key not in str(excinfo.value) and PASSWORD not in str(excinfo.value)


KILLED_RUNNER = """
import os, sys
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic as rs

class Endless:
    def __init__(self):
        self.calls = 0

    def read(self, size):
        self.calls += 1
        if self.calls == 3:
            with open(sys.argv[2], "w") as flag:
                flag.write("streaming")
        return os.urandom(min(size, 1 << 16))

repo = rs.ResticRepository({"backend": "filesystem", "path": sys.argv[1]}, sys.argv[3], cache_dir=False)
repo.backup_stream(Endless(), "dump.pgdump", {"job": "pg-main", "kind": "postgres", "backup_id": "killed"})
"""


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.0])
def test_runner_killed_mid_stream_leaves_no_truncated_snapshot(tmp_path, delay):
    """SIGKILL of the runner closes restic's stdin, which restic alone would take for the end
    of the stream and commit; restic runs with a parent-death signal so it dies too."""
    repo = open_repo(tmp_path)
    repo.init_if_missing()
    flag = tmp_path / "streaming"
    runner = subprocess.Popen([sys.executable, "-c", KILLED_RUNNER,
                               str(tmp_path / "repo"), str(flag), PASSWORD], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert runner.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        runner.kill()
        runner.wait()
    time.sleep(2)  # what restic would need to commit the snapshot, had it survived
    assert repo.snapshots() == []
    assert [lock["stale"] for lock in repo.locks()] in ([], [True])
    repo.unlock_stale()
    assert repo.locks() == []
    repo.check()
