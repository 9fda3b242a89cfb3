# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The redis kind against a real Redis 7 (``redis_server``): ``redis-cli --rdb -`` backups,
restores into the running server (DUMP/RESTORE through a temporary redis-server), failures,
encryption, S3, scratch verification and the stock-tool recovery path.

The shared server is emptied before and after each test here (tests run one at a time).
Backups are taken from databases 1 and 2 and restored into 11 and 12 (``db_map``), so the
source and the restored copy are compared key by key on one live server: same type, same
value, TTL kept.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import verify as vf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.source import RedisSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.target import (
    RedisTarget, TempRedisServer)

JOB = "redis-test"
USER = "bb_backup"
SECRET = "R3dis-" + uuid.uuid4().hex
DB_MAP = {1: 11, 2: 12}


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def redis_clean(redis_server):
    admin = redis_server.client()
    admin.flushall()
    admin.acl_setuser(USER, enabled=True, passwords=["+" + SECRET], commands=["+@all"], keys=["*"],
                      channels=["*"], reset=True)
    yield redis_server
    admin.flushall()
    admin.config_set("repl-diskless-sync", "yes")
    for user in admin.acl_users():
        if user.startswith("bb_"):
            admin.acl_deluser(user)
    admin.close()


def populate(server):
    one = server.client(1)
    one.set("a:string", "hello")
    one.set("a:binary", bytes(range(256)) * 4)
    one.set("a:counter", 41)
    one.incr("a:counter")
    one.hset("a:hash", mapping={"finger": "3", "device": "scanner-2", "template": os.urandom(64)})
    one.rpush("a:list", *["item-%d" % i for i in range(200)])
    one.sadd("a:set", *["m%d" % i for i in range(50)])
    one.zadd("a:zset", {"x": 1.5, "y": 2.25, "z": -3})
    one.xadd("a:stream", {"event": "enrolled", "subject": "42"})
    one.set("a:ttl", "expires later", ex=3600)
    pipe = one.pipeline()
    for i in range(300):
        pipe.set("a:bulk:%d" % i, os.urandom(100))
    pipe.execute()
    two = server.client(2)
    for i in range(120):
        two.hset("z:user:%d" % i, mapping={"name": "u%d" % i, "score": str(i)})
    one.close()
    two.close()


def _value(client, key, kind):
    if kind == b"string":
        return client.get(key)
    if kind == b"hash":
        return client.hgetall(key)
    if kind == b"list":
        return client.lrange(key, 0, -1)
    if kind == b"set":
        return frozenset(client.smembers(key))
    if kind == b"zset":
        return client.zrange(key, 0, -1, withscores=True)
    if kind == b"stream":
        return client.xrange(key)
    raise AssertionError("unexpected type %r of %r" % (kind, key))


def db_state(server, db):
    """{key: (type, value, has a TTL)} of one database."""
    client = server.client(db)
    try:
        state = {}
        for key in client.scan_iter(count=500):
            kind = client.type(key)
            state[key] = (kind, _value(client, key, kind), client.pttl(key) > 0)
        return state
    finally:
        client.close()


def source_options(server, **extra):
    return dict({"host": server.host, "port": server.port, "username": USER, "password": SECRET}, **extra)


def target_options(server, **extra):
    return dict({"host": server.host, "port": server.port, "username": USER, "password": SECRET,
                 "db_map": dict(DB_MAP)}, **extra)


def backup(storage, options, compression=None, encryption=None):
    return BackupRun(JOB, RedisSource(options), storage, compression=compression, encryption=encryption).run()


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


def _stock_rdb_keys(rdb_dir):
    """Load ``rdb_dir/dump.rdb`` with a plain redis-server (what disaster recovery does)."""
    sock = os.path.join(rdb_dir, "r.sock")
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--dir", rdb_dir,
                             "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(["redis-cli", "-s", sock, "info", "keyspace"], capture_output=True, text=True,
                                  check=False)
            if done.returncode == 0 and "loading" not in done.stdout.lower() and "# Keyspace" in done.stdout:
                return {line.split(":")[0]: int(line.split("keys=")[1].split(",")[0])
                        for line in done.stdout.splitlines() if line.startswith("db")}
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not load the dump"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- backup

@pytest.mark.parametrize("diskless", ["yes", "no"])
def test_backup_is_a_real_rdb_with_key_counts(redis_clean, storage, tmp_path, diskless):
    """Both replication modes: diskless (redis-cli 7.0 leaves a 40-byte EOF marker on stdout,
    which must not end up in the payload) and disk-based (length-prefixed transfer)."""
    server = redis_clean
    populate(server)
    server.client().config_set("repl-diskless-sync", diskless)
    manifest = backup(storage, source_options(server), compression={"algorithm": "zstd"})
    stats = manifest["stats"]
    assert stats["keys"] == {"db1": 309, "db2": 120}
    assert stats["keys_after"] == stats["keys"] and stats["consistent"] is True
    assert stats["expires"] == {"db1": 1, "db2": 0}
    assert stats["total_keys"] == 429
    assert stats["redis_version"].startswith("7.")
    assert [(o["payload"], o["name"]) for o in manifest["objects"]] == [("dump.rdb", "dump.rdb.zst")]
    assert manifest["tool_versions"]["redis-cli"].startswith("7.")
    assert manifest["source"] == {"endpoint": "%s:%d" % (server.host, server.port), "username": USER, "tls": False}

    stored = tmp_path / "store" / JOB / manifest["id"] / "dump.rdb.zst"
    rdb_dir = tmp_path / "dr"
    rdb_dir.mkdir()
    subprocess.run(["zstd", "-d", "-q", str(stored), "-o", str(rdb_dir / "dump.rdb")], check=True)
    rdb = (rdb_dir / "dump.rdb").read_bytes()
    assert rdb.startswith(b"REDIS00") and len(rdb) == stats["rdb_bytes"] == manifest["objects"][0]["raw_bytes"]
    assert rdb[-9:-8] == b"\xff"  # the RDB EOF opcode, then its 8-byte checksum: nothing after
    check = subprocess.run(["redis-check-rdb", str(rdb_dir / "dump.rdb")], capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "RDB looks OK" in check.stdout + check.stderr
    assert _stock_rdb_keys(str(rdb_dir)) == {"db1": 309, "db2": 120}
    assert SECRET not in json.dumps(manifest)


def test_backup_over_the_unix_socket(redis_clean, storage):
    server = redis_clean
    populate(server)
    manifest = backup(storage, {"unix_socket": server.unix_socket, "username": USER, "password": SECRET})
    assert manifest["source"]["endpoint"] == server.unix_socket
    assert manifest["stats"]["keys"] == {"db1": 309, "db2": 120}
    with RedisTarget.scratch(manifest, {}) as target:
        report = rs.restore(storage, JOB, target, backup=manifest["id"])
    assert [check["actual"] for check in report["checks"]] == [309, 120]


def test_key_counts_bracket_the_snapshot_under_writes(redis_clean, storage):
    server = redis_clean
    populate(server)
    stop = threading.Event()

    def writer():
        client = server.client(1)
        i = 0
        while not stop.is_set():
            client.set("a:live:%d" % i, "x")
            i += 1
        client.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        manifest = backup(storage, source_options(server))
    finally:
        stop.set()
        thread.join()
    stats = manifest["stats"]
    assert stats["consistent"] is False and stats["keys_after"]["db1"] > stats["keys"]["db1"]
    with RedisTarget.scratch(manifest, {}) as target:
        report = rs.restore(storage, JOB, target, backup=manifest["id"])
    check = report["checks"][0]
    assert check["what"] == "keys db1 in backup" and check["ok"] is True
    low, high = (int(part) for part in check["expected"].split(".."))
    assert low <= check["actual"] <= high and low < high


def test_wrong_password_fails_clearly_without_leaking(redis_clean, storage, tmp_path, monkeypatch):
    server = redis_clean
    populate(server)
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("BB_TEST_REDISPASS", wrong)
    source = RedisSource({"host": server.host, "port": server.port, "username": USER,
                          "password_env": "BB_TEST_REDISPASS"})
    with pytest.raises(SourceError) as failure:
        BackupRun(JOB, source, storage).run()
    message = str(failure.value)
    assert "authentication" in message and USER in message and wrong not in message
    assert Catalog(storage).scan(JOB) == []
    assert not (tmp_path / "store" / JOB).exists() or not any((tmp_path / "store" / JOB).rglob("*.rdb*"))

    secret_file = tmp_path / "redis-pass"
    secret_file.write_text(SECRET + "\n")
    manifest = backup(storage, {"host": server.host, "port": server.port, "username": USER,
                                "password_file": str(secret_file)}, compression={"algorithm": "none"})
    assert manifest["stats"]["total_keys"] == 429
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- restore

def test_restore_into_running_redis_equal_keys_and_values(redis_clean, storage):
    server = redis_clean
    populate(server)
    manifest = backup(storage, source_options(server))
    source = {db: db_state(server, db) for db in (1, 2)}
    target = RedisTarget(target_options(server))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])
    assert report["restore"]["copied"] == {"db11": 309, "db12": 120}
    assert {"what": "keys db1 restored into db11", "expected": 309, "actual": 309, "ok": True} in report["checks"]
    assert all(check["ok"] for check in report["checks"])
    assert db_state(server, 11) == source[1]
    assert db_state(server, 12) == source[2]
    ttl = server.client(11).ttl("a:ttl")
    assert 3000 < ttl <= 3600
    assert db_state(server, 1) == source[1]  # the source databases are untouched


def test_existing_keys_are_refused_then_replace_and_flush(redis_clean, storage):
    server = redis_clean
    populate(server)
    manifest = backup(storage, source_options(server))
    eleven = server.client(11)
    eleven.set("a:string", "newer value")
    eleven.set("unrelated", "stays unless flushed")
    before = {db: db_state(server, db) for db in (11, 12)}
    with pytest.raises(ConfigError, match="'a:string' already exists in db11.*nothing was written"):
        rs.restore(storage, JOB, RedisTarget(target_options(server)), backup=manifest["id"])
    assert {db: db_state(server, db) for db in (11, 12)} == before

    report = rs.restore(storage, JOB, RedisTarget(target_options(server, replace=True)), backup=manifest["id"])
    assert all(check["ok"] for check in report["checks"])
    assert eleven.get("a:string") == b"hello" and eleven.get("unrelated") == b"stays unless flushed"

    report = rs.restore(storage, JOB, RedisTarget(target_options(server, flush=True)), backup=manifest["id"])
    assert {"what": "keys in flushed db11", "expected": 309, "actual": 309, "ok": True} in report["checks"]
    assert eleven.get("unrelated") is None
    assert db_state(server, 11) == db_state(server, 1)
    eleven.close()


def test_partial_copy_is_undone(redis_clean, storage):
    """The target user may write only ``a*`` keys: db1 (all ``a:``) is copied, then db2
    (``z:`` keys) fails with NOPERM. The keys already copied are removed again."""
    server = redis_clean
    populate(server)
    manifest = backup(storage, source_options(server))
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "bb_writer", "on", ">" + SECRET, "+@all", "%R~*", "%W~a*")
    options = target_options(server, username="bb_writer")
    eleven = server.client(11)
    eleven.set("b:mine", "kept")
    with pytest.raises(SourceError, match=r"RESTORE of key 'z:user:\d+' into db12 failed.*no permissions.*removed again"):
        rs.restore(storage, JOB, RedisTarget(options), backup=manifest["id"])
    assert db_state(server, 11) == {b"b:mine": (b"string", b"kept", False)}
    assert db_state(server, 12) == {}
    eleven.close()
    admin.close()


def test_preflight_refuses_missing_target_database(redis_clean, storage):
    server = redis_clean
    populate(server)
    manifest = backup(storage, source_options(server))
    with pytest.raises(ConfigError, match="db99"):
        rs.restore(storage, JOB, RedisTarget(target_options(server, db_map={1: 11, 2: 99})), backup=manifest["id"])
    assert db_state(server, 11) == {}


def test_check_mode_writes_nothing(redis_clean, storage):
    server = redis_clean
    populate(server)
    manifest = backup(storage, source_options(server))
    target = RedisTarget(target_options(server, flush=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"], check_mode=True)
    assert report["changed"] is False
    plan = target.restore(rs.restore_context(storage, manifest, [manifest], {}, check_mode=True))
    assert plan["would_write"] == ["db11", "db12"] and plan["would_flush"] == ["db11", "db12"]
    assert plan["would_load"] == {"db1": 309, "db2": 120}
    # The engine's check mode carries the same plan.
    assert report["restore"]["would_load"] == plan["would_load"] and report["restore"]["would_flush"] == plan["would_flush"]
    assert db_state(server, 11) == {} and db_state(server, 12) == {}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_backup_is_refused_before_the_target_is_touched(redis_clean, storage, tmp_path, damage):
    server = redis_clean
    populate(server)
    manifest = backup(storage, source_options(server), compression={"algorithm": "zstd"})
    stored = tmp_path / "store" / JOB / manifest["id"] / "dump.rdb.zst"
    data = bytearray(stored.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[:-64]
    stored.write_bytes(bytes(data))
    server.client(11).set("a:string", "target value")
    before = {db: db_state(server, db) for db in (11, 12)}
    with pytest.raises(IntegrityError, match="dump.rdb.zst"):
        rs.restore(storage, JOB, RedisTarget(target_options(server, flush=True)), backup=manifest["id"])
    assert {db: db_state(server, db) for db in (11, 12)} == before


# --------------------------------------------------------------------------- encryption, S3, stock tools

def test_encrypted_s3_backup_scratch_verify_and_stock_recovery(redis_clean, s3_server, tmp_path):
    server = redis_clean
    populate(server)
    identity = x25519.Identity.generate()
    options = s3_server.storage_options()
    storage = open_storage(options)
    manifest = backup(storage, source_options(server), compression={"algorithm": "zstd", "level": 5},
                      encryption={"recipients": [str(identity.to_public())]})
    assert [o["name"] for o in manifest["objects"]] == ["dump.rdb.zst.age"]

    result = vf.verify(storage, JOB, backup=manifest["id"], identity=str(identity), test_restore=True,
                       target_class=RedisTarget, scratch_options={"temp_dir": str(tmp_path)})
    assert result["ok"] is True, result["results"]
    assert {"what": "keys db2 in backup", "expected": 120, "actual": 120, "ok": True} in result["results"][0]["checks"]
    assert os.listdir(tmp_path) == []  # the temporary server's directory is gone

    report = rs.restore(storage, JOB, RedisTarget(target_options(server)), backup="latest", identity=str(identity))
    assert report["backup_id"] == manifest["id"]
    assert db_state(server, 11) == db_state(server, 1)

    # Disaster recovery with stock tools only: age, zstd, redis-server.
    key_file = tmp_path / "age.key"
    key_file.write_text(str(identity) + "\n")
    encrypted = tmp_path / "dump.rdb.zst.age"
    s3_server.client().download_file(options["bucket"], "%s/%s/%s/dump.rdb.zst.age"
                                     % (options["prefix"], JOB, manifest["id"]), str(encrypted))
    rdb_dir = tmp_path / "dr"
    rdb_dir.mkdir()
    subprocess.run("set -o pipefail; age -d -i %s %s | zstd -d > %s" % (key_file, encrypted, rdb_dir / "dump.rdb"),
                   shell=True, check=True, executable="/bin/bash")
    assert _stock_rdb_keys(str(rdb_dir)) == {"db1": 309, "db2": 120}


def _deep_dir(base, length):
    """A new directory under ``base`` whose path is ``length`` bytes long."""
    path = os.path.join(str(base), "d" * max(1, length - len(str(base)) - 1))
    os.makedirs(path)
    return path


def test_scratch_verify_under_a_long_temp_dir_listens_elsewhere_and_leaves_nothing(
        redis_clean, storage, tmp_path, monkeypatch):
    # A scratch directory on a volume easily makes <temp_dir>/bb-redis-restore-XXXXXXXX/redis.sock
    # longer than a unix socket address holds (107 bytes): redis-server then exits before it
    # reads the backup, which once became a failed verdict recorded against a good backup.
    populate(redis_clean)
    manifest = backup(storage, source_options(redis_clean))
    private_tmp = tmp_path / "t"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # where the socket goes instead
    temp_dir = _deep_dir(tmp_path, 100)
    result = vf.verify(storage, JOB, backup=manifest["id"], test_restore=True, target_class=RedisTarget,
                       scratch_options={"temp_dir": temp_dir})
    assert result["ok"] is True, result["results"]
    assert os.listdir(temp_dir) == [] and os.listdir(private_tmp) == []

    # No short directory at all: an error before any server starts, and no verdict recorded.
    monkeypatch.setattr(tempfile, "tempdir", _deep_dir(tmp_path / "long-tmp", 100))
    second = backup(storage, source_options(redis_clean))
    with pytest.raises(ConfigError, match="set TMPDIR to a shorter directory"):
        vf.verify(storage, JOB, backup=second["id"], test_restore=True, target_class=RedisTarget,
                  scratch_options={"temp_dir": temp_dir})
    assert Catalog(storage).get(JOB, second["id"]).get("verification") is None
    assert os.listdir(temp_dir) == []


def test_a_scratch_server_killed_while_loading_is_an_error_not_a_verdict(redis_clean, tmp_path):
    # The kernel's OOM killer ends a scratch redis-server that loads an RDB too big for the pod:
    # the RDB had passed its SHA-256 check, so that is the machine failing, not the backup.
    admin = redis_clean.client(9)
    value = b"v" * 100
    for start in range(0, 600000, 20000):
        with admin.pipeline(transaction=False) as pipe:
            for number in range(start, start + 20000):
                pipe.set("k%d" % number, value)
            pipe.execute()
    admin.save()
    workdir = tmp_path / "w"
    workdir.mkdir()
    shutil.copyfile(os.path.join(redis_clean.dir, "dump.rdb"), workdir / "dump.rdb")
    server = TempRedisServer(shutil.which("redis-server"), str(workdir))
    killed = []

    def kill_once_loading():
        log = workdir / "redis.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.proc is not None and log.exists() and "Server initialized" in log.read_text(errors="replace"):
                os.kill(server.proc.pid, signal.SIGKILL)
                killed.append(True)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_once_loading)
    watcher.start()
    try:
        with pytest.raises(SourceError, match=r"stopped while loading the backup \(signal 9\)"):
            server.start()
    finally:
        watcher.join()
        server.stop()
    assert killed == [True]
