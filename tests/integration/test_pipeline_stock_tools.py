"""What the engine stores is recovered by the stock tools alone (Debian's age, zstd, gzip),
and what the stock tools produce is read by the engine.

``age -d -i key | zstd -d`` is the documented way out when this collection is not at hand.
Stock age reads a passphrase only from a terminal: the passphrase envelope is opened by
running ``age`` on a real pseudo-terminal (pty.fork), typing the passphrase at its prompt.
"""

import hashlib
import os
import pty
import select
import shutil
import subprocess
import time

import pytest

from ci_env import require_or_skip

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import DecryptionError, IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import check_object, store_stream
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage

MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def stock_tools():
    missing = [tool for tool in ("age", "age-keygen", "zstd", "gzip") if shutil.which(tool) is None]
    if missing:
        require_or_skip("stock tools missing: %s (hack/install-deps.sh installs them)" % ", ".join(missing))


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    """An identity made by the stock age-keygen, and its public key."""
    path = tmp_path_factory.mktemp("keys") / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True).stdout.strip()
    return path, public


def payload_bytes(size=12 * MiB):
    """Realistic mix: random 'templates', CSV-ish text, JSON, timestamps."""
    rnd = os.urandom(size // 3)
    rows = b"".join(b"%08d,2024-01-15T02:%02d:%02dZ,{\"q\":0.%03d,\"site\":\"lab-%d\"}\n" % (i, i % 60, i % 59, i % 997, i % 7)
                    for i in range(size // 50))
    return (rnd + rows)[:size]


def run_pipeline(commands, stdin_path, stdout_path):
    """Run a shell-free pipeline of argv lists; return each stage's (rc, stderr)."""
    procs, previous = [], open(stdin_path, "rb")
    with open(stdout_path, "wb") as out:
        for index, argv in enumerate(commands):
            last = index == len(commands) - 1
            proc = subprocess.Popen(argv, stdin=previous, stdout=out if last else subprocess.PIPE, stderr=subprocess.PIPE)
            previous.close()
            previous = proc.stdout
            procs.append(proc)
    return [(proc.wait(), proc.stderr.read().decode()) for proc in procs]


def stored_path(tmp_path, key):
    return str(tmp_path / "store" / key)


def sha_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("algorithm, decompress", [
    ("zstd", ["zstd", "-d", "-c", "-q"]),
    ("gzip", ["gzip", "-d", "-c"]),
    ("none", None),
])
@pytest.mark.parametrize("level_threads", [(1, 0), (3, -1), (9, 2)])
def test_age_identity_file_and_stock_decompressor(tmp_path, keyfile, algorithm, decompress, level_threads):
    level, threads = level_threads
    data = payload_bytes()
    storage = FilesystemStorage(str(tmp_path / "store"))
    compression = codecs.compression_settings({"algorithm": algorithm, "level": level if algorithm != "none" else None,
                                               "threads": threads})
    encryption = codecs.encryption_settings({"recipients": [keyfile[1]]})
    result = store_stream(_Bytes(data), storage, "j/b/payload", compression, encryption)
    src = stored_path(tmp_path, "j/b/payload")
    assert sha_file(src) == result["sha256"]
    out = str(tmp_path / "restored")
    commands = [["age", "-d", "-i", str(keyfile[0])]] + ([decompress] if decompress else [])
    statuses = run_pipeline(commands, src, out)
    assert all(rc == 0 for rc, dummy in statuses), statuses
    assert sha_file(out) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("algorithm, tool", [("zstd", ["zstd", "-d", "-c", "-q"]), ("gzip", ["gzip", "-d", "-c"])])
def test_unencrypted_payloads_decompress_and_test_with_stock_tools(tmp_path, algorithm, tool):
    data = payload_bytes(6 * MiB)
    storage = FilesystemStorage(str(tmp_path / "store"))
    store_stream(_Bytes(data), storage, "j/b/p", codecs.compression_settings({"algorithm": algorithm}), {"mode": "none"})
    src = stored_path(tmp_path, "j/b/p")
    assert subprocess.run([tool[0], "-t", src] if tool[0] == "gzip" else ["zstd", "-t", "-q", src], check=False).returncode == 0
    statuses = run_pipeline([tool], src, str(tmp_path / "out"))
    assert statuses[0][0] == 0, statuses
    assert sha_file(str(tmp_path / "out")) == hashlib.sha256(data).hexdigest()


def age_decrypt_with_passphrase_on_a_tty(envelope_path, output_path, passphrase, timeout=120):
    """Run stock ``age -d`` on a pseudo-terminal and type the passphrase at its prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # child: its controlling terminal is the pty, as for a person at a shell
        try:
            os.execvp("age", ["age", "-d", "-o", output_path, envelope_path])
        finally:
            os._exit(127)
    transcript, typed = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, dummy_w, dummy_x = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            transcript += chunk
            if not typed and b"passphrase" in transcript.lower():
                os.write(fd, passphrase.encode() + b"\r")
                typed = True
        dummy, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), transcript.decode(errors="replace"), typed


class _Bytes:
    def __init__(self, data):
        self._data, self._pos = data, 0

    def read(self, n=-1):
        n = len(self._data) - self._pos if n is None or n < 0 else n
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk


class BytesSource(Source):
    kind = "files"

    def produce(self, emit, context):
        emit("data.tar", _Bytes(self.options["data"]))
        return {"files": 1}


def test_passphrase_backup_opens_with_stock_age_at_a_terminal(tmp_path):
    data = payload_bytes(8 * MiB)
    storage = FilesystemStorage(str(tmp_path / "store"))
    manifest = BackupRun("pp", BytesSource({"data": data}), storage, {"algorithm": "zstd", "level": 3},
                         {"passphrase": "correct horse battery staple"}).run()
    backup_dir = tmp_path / "store" / "pp" / manifest["id"]
    identity_path = str(tmp_path / "identity.txt")
    rc, transcript, typed = age_decrypt_with_passphrase_on_a_tty(str(backup_dir / "key.age"), identity_path,
                                                                 "correct horse battery staple")
    assert typed and rc == 0, transcript
    assert open(identity_path, encoding="ascii").read().startswith("AGE-SECRET-KEY-1")
    statuses = run_pipeline([["age", "-d", "-i", identity_path], ["zstd", "-d", "-c", "-q"]],
                            str(backup_dir / "data.tar.zst.age"), str(tmp_path / "out"))
    assert all(rc == 0 for rc, dummy in statuses), statuses
    assert sha_file(str(tmp_path / "out")) == hashlib.sha256(data).hexdigest()
    # And the wrong passphrase is refused by stock age as well.
    rc, transcript, typed = age_decrypt_with_passphrase_on_a_tty(str(backup_dir / "key.age"), str(tmp_path / "nope"),
                                                                 "wrong horse")
    assert typed and rc != 0, transcript
    assert "incorrect passphrase" in transcript, transcript
    assert not os.path.exists(str(tmp_path / "nope")) or os.path.getsize(str(tmp_path / "nope")) == 0


def test_stock_age_refuses_the_wrong_identity_and_so_does_the_engine(tmp_path, keyfile):
    storage = FilesystemStorage(str(tmp_path / "store"))
    result = store_stream(_Bytes(payload_bytes(MiB)), storage, "j/b/p", codecs.compression_settings({"algorithm": "zstd"}),
                          codecs.encryption_settings({"recipients": [keyfile[1]]}))
    other = tmp_path / "other.txt"
    subprocess.run(["age-keygen", "-o", str(other)], check=True, capture_output=True)
    done = subprocess.run(["age", "-d", "-i", str(other), stored_path(tmp_path, "j/b/p")], capture_output=True, text=True,
                          check=False)
    assert done.returncode != 0 and "no identity matched" in done.stderr
    with pytest.raises(DecryptionError, match="j/b/p does not decrypt with the given key"):
        check_object(storage, "j/b/p", dict(result, name="p"), "zstd",
                     codecs.parse_identities(other.read_text()))


@pytest.mark.parametrize("compress, algorithm", [
    (["zstd", "-3", "-T0", "-q", "-c"], "zstd"),
    (["zstd", "-19", "--long", "-q", "-c"], "zstd"),
    (["gzip", "-c"], "gzip"),
])
def test_the_engine_reads_what_the_stock_pipeline_wrote(tmp_path, keyfile, compress, algorithm):
    """`tool | age -r KEY > file` (the baseline pipeline) verifies and decrypts through the engine."""
    data = payload_bytes(6 * MiB)
    raw = tmp_path / "raw"
    raw.write_bytes(data)
    os.makedirs(str(tmp_path / "store" / "j" / "b"))
    target = stored_path(tmp_path, "j/b/p")
    statuses = run_pipeline([compress, ["age", "-r", keyfile[1]]], str(raw), target)
    assert all(rc == 0 for rc, dummy in statuses), statuses
    storage = FilesystemStorage(str(tmp_path / "store"))
    expected = {"name": "p", "size": os.path.getsize(target), "sha256": sha_file(target)}
    identities = codecs.parse_identities(open(str(keyfile[0]), encoding="ascii").read())
    summary = check_object(storage, "j/b/p", expected, algorithm, identities)
    assert summary["plain_bytes"] == len(data)


def test_a_stock_zstd_stream_cut_short_is_refused(tmp_path):
    """Defence in depth: even when the stored hash matches (the cut happened before hashing),
    a zstd payload that ends inside a frame does not pass verification."""
    data = payload_bytes(4 * MiB)
    raw = tmp_path / "raw"
    raw.write_bytes(data)
    whole = subprocess.run(["zstd", "-3", "-q", "-c", str(raw)], check=True, capture_output=True).stdout
    cut = whole[: len(whole) - 1000]
    os.makedirs(str(tmp_path / "store" / "j" / "b"))
    (tmp_path / "store" / "j" / "b" / "p").write_bytes(cut)
    assert subprocess.run(["zstd", "-t", "-q", str(tmp_path / "store" / "j" / "b" / "p")], check=False).returncode != 0
    storage = FilesystemStorage(str(tmp_path / "store"))
    expected = {"name": "p", "size": len(cut), "sha256": hashlib.sha256(cut).hexdigest()}
    with pytest.raises(IntegrityError, match="does not decompress .*truncated"):
        check_object(storage, "j/b/p", expected, "zstd")
