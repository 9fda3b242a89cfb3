# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one-pass restore with the real targets and real servers: a payload damaged in the middle
passes the engine's listing checks (the size is right), so only the stream the target consumes
can find it. The target must have started (the engine logs the diagnosis it runs after a
one-pass failure), and the live data must be exactly as before: files (tree state, no staging
directory left), PostgreSQL (database list and table checksums: no new database left behind),
Redis with ``flush: true`` (every key and value). A control restore of each takes the one-pass
path and reads every payload object once.
"""

import os
import uuid

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ObjectMismatchError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.source import PostgresSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.source import RedisSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.target import FilesTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.target import RedisTarget

from restore_helpers import CountingStorage, tree_state

from .test_postgres_kind import databases

KEY = x25519.Identity.generate()
RECIPIENTS = {"recipients": [str(KEY.to_public())]}
DIAGNOSIS = "verifying the whole backup"


def storage_at(path):
    return open_storage({"backend": "filesystem", "path": str(path)})


def take(store, job, source, encryption=None):
    return BackupRun(job, source, storage_at(store), compression={"algorithm": "zstd"}, encryption=encryption).run()


def payload_key(manifest, payload):
    obj = next(o for o in manifest["objects"] if o.get("payload") == payload)
    return "%s/%s/%s" % (manifest["job"], manifest["id"], obj["name"])


def flip_middle(store, manifest, payload):
    path = os.path.join(str(store), payload_key(manifest, payload))
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        byte = handle.read(1)[0]
        handle.seek(size // 2)
        handle.write(bytes([byte ^ 0x10]))


def restore_logged(storage, job, target, **keys):
    lines = []
    report = rs.restore(storage, job, target, log=lines.append, **keys)
    return report, lines


def refused_in_the_target(storage, job, target, **keys):
    """The restore fails with the stored-bytes error, after the target had started."""
    lines = []
    with pytest.raises(ObjectMismatchError) as caught:
        rs.restore(storage, job, target, log=lines.append, **keys)
    assert any(DIAGNOSIS in line for line in lines), lines  # the failure came out of the target
    assert not any(line.startswith("verified ") for line in lines)  # not the two-pass path
    return caught.value


def assert_one_pass_once(report, counting, manifest):
    assert report["verification"]["mode"] == "one-pass"
    for obj in manifest["objects"]:
        if obj.get("payload"):
            key = "%s/%s/%s" % (manifest["job"], manifest["id"], obj["name"])
            assert counting.opened.get(key, 0) <= 1, key


# -- files ----------------------------------------------------------------------------------

def test_files_one_pass_leaves_the_destination_and_no_staging(tmp_path):
    source = tmp_path / "src"
    (source / "conf").mkdir(parents=True)
    (source / "conf" / "app.yaml").write_text("a: 1\n")
    (source / "blob.bin").write_bytes(os.urandom(400_000))
    store = tmp_path / "store"
    manifest = take(store, "tree", FilesSource({"path": str(source)}), RECIPIENTS)
    live = tmp_path / "live"
    live.mkdir()
    (live / "production.txt").write_text("current data")
    counting = CountingStorage(storage_at(store))
    report, _lines = restore_logged(counting, "tree", FilesTarget({"path": str(tmp_path / "control")}),
                                    identity=str(KEY))
    assert_one_pass_once(report, counting, manifest)
    assert tree_state(str(tmp_path / "control")) == tree_state(str(source))
    flip_middle(store, manifest, "files.tar")
    before = tree_state(str(live))
    refused_in_the_target(storage_at(store), "tree", FilesTarget({"path": str(live), "overwrite": True}),
                          identity=str(KEY))
    assert tree_state(str(live)) == before
    assert sorted(os.listdir(str(tmp_path))) == ["control", "live", "src", "store"]  # no staging left


# -- postgres -------------------------------------------------------------------------------

def table_state(server, name):
    with server.connect(name) as conn:
        return conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM subjects t").fetchone()


@pytest.fixture
def pg_database(postgres_server):
    name = "op_%s" % uuid.uuid4().hex[:10]
    with postgres_server.connect() as conn:
        conn.execute('CREATE DATABASE "%s"' % name)
    with postgres_server.connect(name) as conn:
        conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, template bytea)")
        conn.execute("INSERT INTO subjects SELECT g, decode(md5(g::text), 'hex') FROM generate_series(1, 20000) g")
    yield name
    for found in databases(postgres_server):
        if found.startswith(name):
            postgres_server.drop_database(found)


def pg_options(server, name, **extra):
    return dict({"host": server.host, "port": server.port, "user": server.user, "database": name,
                 "bin_dir": server.bin_dir}, **extra)


def test_postgres_one_pass_corrupted_dump_leaves_no_new_database(tmp_path, postgres_server, pg_database):
    store = tmp_path / "store"
    manifest = take(store, "pg", PostgresSource(pg_options(postgres_server, pg_database)), {"passphrase": "pg"})
    with postgres_server.connect(pg_database) as conn:
        conn.execute("UPDATE subjects SET template = 'changed after the backup' WHERE id <= 10")
    flip_middle(store, manifest, "database.dump")
    before = (databases(postgres_server), table_state(postgres_server, pg_database))
    target = PostgresTarget(pg_options(postgres_server, pg_database, swap=True))
    refused_in_the_target(storage_at(store), "pg", target, passphrase="pg")
    assert (databases(postgres_server), table_state(postgres_server, pg_database)) == before


def test_postgres_one_pass_control_restore(tmp_path, postgres_server, pg_database):
    store = tmp_path / "store"
    manifest = take(store, "pg", PostgresSource(pg_options(postgres_server, pg_database)), {"passphrase": "pg"})
    expected = table_state(postgres_server, pg_database)
    with postgres_server.connect(pg_database) as conn:
        conn.execute("DELETE FROM subjects WHERE id > 100")
    counting = CountingStorage(storage_at(store))
    report, _lines = restore_logged(counting, "pg", PostgresTarget(pg_options(postgres_server, pg_database, swap=True)),
                                    passphrase="pg")
    assert_one_pass_once(report, counting, manifest)
    assert table_state(postgres_server, pg_database) == expected


# -- redis ----------------------------------------------------------------------------------

def redis_state(server):
    state = {}
    for db in range(16):
        client = server.client(db)
        for key in client.scan_iter(count=1000):
            state[(db, key)] = (client.type(key), client.dump(key))
    return state


def test_redis_one_pass_with_flush_keeps_the_live_keys(tmp_path, redis_server):
    client = redis_server.client(6)
    client.flushdb()
    try:
        prefix = "op:%s:" % uuid.uuid4().hex[:6]
        for index in range(2000):
            client.set(prefix + str(index), os.urandom(200))
        store = tmp_path / "store"
        manifest = take(store, "kv", RedisSource({"host": redis_server.host, "port": redis_server.port}), RECIPIENTS)
        client.set(prefix + "0", b"changed after the backup")
        client.set(prefix + "new", b"not in the backup")
        flip_middle(store, manifest, "dump.rdb")
        before = redis_state(redis_server)
        target = RedisTarget({"host": redis_server.host, "port": redis_server.port, "flush": True})
        refused_in_the_target(storage_at(store), "kv", target, identity=str(KEY))
        assert redis_state(redis_server) == before
    finally:
        client.flushdb()


def test_redis_one_pass_control_restore(tmp_path, redis_server):
    client = redis_server.client(7)
    client.flushdb()
    try:
        client.set("op:kept", b"value")
        store = tmp_path / "store"
        manifest = take(store, "kv", RedisSource({"host": redis_server.host, "port": redis_server.port}), RECIPIENTS)
        client.flushdb()
        counting = CountingStorage(storage_at(store))
        report, _lines = restore_logged(counting, "kv", RedisTarget(
            {"host": redis_server.host, "port": redis_server.port, "replace": True}), identity=str(KEY))
        assert_one_pass_once(report, counting, manifest)
        assert client.get("op:kept") == b"value"
    finally:
        client.flushdb()
