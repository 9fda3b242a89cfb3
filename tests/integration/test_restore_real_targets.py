# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fault injection through engine/restore.py with the real kinds' targets: a damaged backup or a
wrong key is refused before the files, PostgreSQL or Redis target is touched, and the live
data is proven unchanged (tree state; database list and table checksums; every key and value).
"""

import os
import shutil
import time
import uuid

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.source import PostgresSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.source import RedisSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.target import FilesTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.target import RedisTarget

from restore_helpers import tree_state

KEY = x25519.Identity.generate()
STRANGER = x25519.Identity.generate()
RECIPIENTS = {"recipients": [str(KEY.to_public())]}


def storage_at(path):
    return open_storage({"backend": "filesystem", "path": str(path)})


def take(store, job, source, encryption=None):
    return BackupRun(job, source, storage_at(store), compression={"algorithm": "zstd"}, encryption=encryption).run()


def next_second():
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def payload_path(store, manifest, payload):
    obj = next(o for o in manifest["objects"] if o.get("payload") == payload)
    return os.path.join(str(store), manifest["job"], manifest["id"], obj["name"])


def flip(path, where=0.5):
    with open(path, "r+b") as handle:
        size = os.path.getsize(path)
        handle.seek(int(size * where))
        byte = handle.read(1)[0]
        handle.seek(int(size * where))
        handle.write(bytes([byte ^ 0x80]))


def truncate(path, keep=0.5):
    with open(path, "r+b") as handle:
        handle.truncate(int(os.path.getsize(path) * keep))


def append(path, data=b"\0" * 7):
    with open(path, "ab") as handle:
        handle.write(data)


def swap(path_a, path_b):
    tmp = path_a + ".tmp-swap"
    os.rename(path_a, tmp)
    os.rename(path_b, path_a)
    os.rename(tmp, path_b)


# -- files ----------------------------------------------------------------------------------

def build_tree(root, variant):
    (root / "conf").mkdir(parents=True)
    (root / "conf" / "app.yaml").write_text("variant: %s\n" % variant)
    (root / "blob.bin").write_bytes(os.urandom(60_000))
    os.chmod(root / "conf" / "app.yaml", 0o640)
    os.symlink("conf/app.yaml", root / "link")


@pytest.fixture
def files_setup(tmp_path):
    store = tmp_path / "store"
    build_tree(tmp_path / "src-a", "a")
    build_tree(tmp_path / "src-b", "b")
    first = take(store, "tree", FilesSource({"path": str(tmp_path / "src-a")}), RECIPIENTS)
    next_second()
    second = take(store, "tree", FilesSource({"path": str(tmp_path / "src-b")}), RECIPIENTS)
    live = tmp_path / "live"
    live.mkdir()
    (live / "production.txt").write_text("current data")
    return store, first, second, live


FILES_FAULTS = {
    "flip-tar": lambda store, first, second: flip(payload_path(store, second, "files.tar")),
    "flip-index": lambda store, first, second: flip(payload_path(store, second, "files.index"), 0.1),
    "truncate-tar": lambda store, first, second: truncate(payload_path(store, second, "files.tar")),
    "truncate-sums": lambda store, first, second: truncate(payload_path(store, second, "files.sha256"), 0.9),
    "swap-tar-between-backups": lambda store, first, second: swap(payload_path(store, first, "files.tar"),
                                                                  payload_path(store, second, "files.tar")),
    "index-from-other-backup": lambda store, first, second: shutil.copyfile(
        payload_path(store, first, "files.index"), payload_path(store, second, "files.index")),
    "deleted-payload": lambda store, first, second: os.unlink(payload_path(store, second, "files.sha256")),
}


@pytest.mark.parametrize("fault", sorted(FILES_FAULTS))
def test_files_target_untouched(files_setup, fault):
    store, first, second, live = files_setup
    FILES_FAULTS[fault](store, first, second)
    before = tree_state(str(live))
    target = FilesTarget({"path": str(live), "overwrite": True})
    with pytest.raises(IntegrityError):
        rs.restore(storage_at(store), "tree", target, backup=second["id"], identity=str(KEY))
    assert tree_state(str(live)) == before


def test_files_wrong_identity_and_control(files_setup, tmp_path):
    store, second, live = files_setup[0], files_setup[2], files_setup[3]
    before = tree_state(str(live))
    with pytest.raises(IntegrityError, match="wrong key"):
        rs.restore(storage_at(store), "tree", FilesTarget({"path": str(live), "overwrite": True}),
                   identity=str(STRANGER))
    assert tree_state(str(live)) == before
    report = rs.restore(storage_at(store), "tree", FilesTarget({"path": str(live), "overwrite": True}),
                        identity=str(KEY))
    assert report["backup_id"] == second["id"] and all(check["ok"] for check in report["checks"])
    assert tree_state(str(live)) == tree_state(str(tmp_path / "src-b"))


# -- postgres -------------------------------------------------------------------------------

def db_state(server, name):
    with server.connect(name) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
        state = {}
        for (table,) in tables:
            state[table] = conn.execute('SELECT count(*), md5(coalesce(string_agg(t::text, \',\' ORDER BY t::text), \'\')) '
                                        'FROM public."%s" t' % table).fetchone()
    return state


def databases(server):
    with server.connect() as conn:
        return sorted(row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall())


@pytest.fixture
def pg_setup(tmp_path, postgres_server):
    created = []

    def database(rows):
        name = "rt_%s" % uuid.uuid4().hex[:10]
        with postgres_server.connect() as conn:
            conn.execute('CREATE DATABASE "%s"' % name)
        created.append(name)
        with postgres_server.connect(name) as conn:
            conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, template bytea)")
            conn.execute("INSERT INTO subjects SELECT g, decode(md5(g::text), 'hex') FROM generate_series(1, %d) g" % rows)
        return name

    def source(name):
        return PostgresSource({"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                               "database": name, "bin_dir": postgres_server.bin_dir})

    store = tmp_path / "store"
    first = take(store, "pg", source(database(300)), {"passphrase": "pg-pass"})
    next_second()
    second = take(store, "pg", source(database(500)), {"passphrase": "pg-pass"})
    live = database(42)
    yield store, first, second, live
    for name in created + [n for n in databases(postgres_server) if n.startswith(tuple(created))]:
        postgres_server.drop_database(name)


PG_FAULTS = {
    "flip-dump": (lambda store, first, second: flip(payload_path(store, second, "database.dump")), "pg-pass"),
    "truncate-dump": (lambda store, first, second: truncate(payload_path(store, second, "database.dump"), 0.7), "pg-pass"),
    "dump-from-other-backup": (lambda store, first, second: shutil.copyfile(
        payload_path(store, first, "database.dump"), payload_path(store, second, "database.dump")), "pg-pass"),
    "envelope-from-other-backup": (lambda store, first, second: shutil.copyfile(
        os.path.join(str(store), "pg", first["id"], "key.age"), os.path.join(str(store), "pg", second["id"], "key.age")),
        "pg-pass"),
    "wrong-passphrase": (lambda store, first, second: None, "not-the-passphrase"),
}


@pytest.mark.parametrize("fault", sorted(PG_FAULTS))
def test_postgres_target_untouched(pg_setup, postgres_server, fault):
    store, first, second, live = pg_setup
    mutate, passphrase = PG_FAULTS[fault]
    mutate(store, first, second)
    before = (databases(postgres_server), db_state(postgres_server, live))
    target = PostgresTarget({"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                             "database": live, "bin_dir": postgres_server.bin_dir, "swap": True})
    with pytest.raises(IntegrityError):
        rs.restore(storage_at(store), "pg", target, backup=second["id"], passphrase=passphrase)
    assert (databases(postgres_server), db_state(postgres_server, live)) == before


# -- redis ----------------------------------------------------------------------------------

def redis_state(server):
    state = {}
    for db in range(16):
        client = server.client(db)
        for key in client.scan_iter(count=1000):
            state[(db, key)] = (client.type(key), client.dump(key))
    return state


@pytest.fixture
def redis_setup(tmp_path, redis_server):
    client = redis_server.client(5)
    client.flushdb()
    prefix = "rt:%s:" % uuid.uuid4().hex[:6]
    for index in range(50):
        client.set(prefix + str(index), os.urandom(64))
    client.hset(prefix + "hash", mapping={"a": "1", "b": "2"})
    store = tmp_path / "store"
    manifest = take(store, "kv", RedisSource({"host": redis_server.host, "port": redis_server.port}), RECIPIENTS)
    client.set(prefix + "0", b"changed after the backup")  # the live data differs from the backup
    yield store, manifest
    client.flushdb()


REDIS_FAULTS = {
    "flip-rdb": (lambda store, manifest: flip(payload_path(store, manifest, "dump.rdb"), 0.3), str(KEY)),
    "truncate-rdb": (lambda store, manifest: truncate(payload_path(store, manifest, "dump.rdb"), 0.8), str(KEY)),
    "appended": (lambda store, manifest: append(payload_path(store, manifest, "dump.rdb")), str(KEY)),
    "wrong-identity": (lambda store, manifest: None, str(STRANGER)),
}


@pytest.mark.parametrize("fault", sorted(REDIS_FAULTS))
def test_redis_target_untouched(redis_setup, redis_server, fault):
    store, manifest = redis_setup
    mutate, identity = REDIS_FAULTS[fault]
    mutate(store, manifest)
    before = redis_state(redis_server)
    target = RedisTarget({"host": redis_server.host, "port": redis_server.port, "replace": True})
    with pytest.raises(IntegrityError):
        rs.restore(storage_at(store), "kv", target, identity=identity)
    assert redis_state(redis_server) == before


def test_postgres_control_restore_swaps_in_the_backup(pg_setup, postgres_server):
    """Without a fault the same target options restore and swap: the refusals above are about the faults."""
    store, second, live = pg_setup[0], pg_setup[2], pg_setup[3]
    target = PostgresTarget({"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                             "database": live, "bin_dir": postgres_server.bin_dir, "swap": True})
    report = rs.restore(storage_at(store), "pg", target, backup=second["id"], passphrase="pg-pass")
    assert all(check["ok"] for check in report["checks"])
    assert db_state(postgres_server, live)["subjects"][0] == 500
