# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restic storage format wired into the engine (issue 16), against the real restic 0.14,
Redis 7, PostgreSQL 15 and SeaweedFS: backup, listing, verification, restore and prune through
engine/operations.py, the runner CLI and the modules (ansible-playbook); a damaged repository
refused before the target is touched; kinds the format does not hold refused with nothing
written; the repository password never in a manifest or in output.

Databases are tiny: the point is the wiring, not restic's speed (docs/restic-format.md).
"""

import datetime
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid

import pyrage
import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.restic import ResticRepository
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from .files_helpers import snapshot
from modules_helpers import ansible_playbook

FQCN = "biometrics.backup."
RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER = "bb_restic"
REDIS_SECRET = "R3dis-" + uuid.uuid4().hex


def password():
    return "restic-pw-" + uuid.uuid4().hex


def fs_storage(tmp_path, secret, **extra):
    return dict({"backend": "filesystem", "path": str(tmp_path / "store"), "format": "restic",
                 "restic_password": secret}, **extra)


@pytest.fixture
def redis_db(redis_server):
    admin = redis_server.client()
    admin.acl_setuser(USER, enabled=True, passwords=["+" + REDIS_SECRET], commands=["+@all"], keys=["*"],
                      channels=["*"], reset=True)
    for db in (3, 13):
        redis_server.client(db).flushdb()
    client = redis_server.client(3)
    client.set("subject:1", "template-one")
    client.hset("subject:2", mapping={"finger": "7", "template": os.urandom(48)})
    client.rpush("queue", *["item-%d" % i for i in range(50)])
    yield redis_server
    for db in (3, 13):
        redis_server.client(db).flushdb()
    admin.acl_deluser(USER)
    admin.close()


def redis_source(server):
    return {"host": server.host, "port": server.port, "username": USER, "password": REDIS_SECRET}


def redis_target(server):
    return dict(redis_source(server), db_map={3: 13})


def redis_state(server, db):
    client = server.client(db)
    try:
        return {key: client.dump(key) for key in sorted(client.keys("*"))}
    finally:
        client.close()


def run(command, config, env, extra=()):
    argv = [sys.executable, "-m", RUNNER, command, "--config", str(config)] + list(extra)
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"), **env)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                          timeout=600, cwd="/", check=False)


def write_job(path, data):
    path.write_text(json.dumps(data))
    return path


def backup(storage, job, kind, source):
    return operations.prepare_backup(job, operations.make_source(kind, source), storage).run()


def stored_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dummy, files in os.walk(root) for f in files)


# --------------------------------------------------------------------------- engine

def test_redis_round_trip_through_the_facade(tmp_path, redis_db):
    secret = password()
    storage = open_storage(fs_storage(tmp_path, secret, restic_read_data_subset="100%"))
    manifest = backup(storage, "cache", "redis", redis_source(redis_db))
    assert manifest["storage_format"] == "restic" and manifest["encryption"] == {"mode": "restic"}
    [obj] = manifest["objects"]
    assert obj["payload"] == "dump.rdb" and len(obj["restic_snapshot"]) == 64
    assert manifest["restic"]["snapshots"] == [obj["restic_snapshot"]]
    text = (tmp_path / "store" / "cache" / manifest["id"] / "manifest.json").read_text()
    assert secret not in text and REDIS_SECRET not in text
    # the manifest is the only object of the backup directory; the data is in the repository
    assert os.listdir(tmp_path / "store" / "cache" / manifest["id"]) == ["manifest.json"]
    assert os.path.isfile(tmp_path / "store" / "_restic" / "cache" / "config")
    # stock restorability: restic alone, with the password, gives back the bytes the manifest records
    dumped = subprocess.run(["restic", "-r", "local:%s" % (tmp_path / "store" / "_restic" / "cache"), "--no-cache",
                             "dump", obj["restic_snapshot"], "/dump.rdb"], capture_output=True, check=True,
                            env=dict(os.environ, RESTIC_PASSWORD=secret))
    assert hashlib.sha256(dumped.stdout).hexdigest() == obj["sha256"] and len(dumped.stdout) == obj["size"]

    listed = operations.inventory(storage)
    assert [m["id"] for m in listed["backups"]] == [manifest["id"]]
    assert listed["junk"] == [] and listed["orphans"] == []

    verified = operations.verify(storage, "cache")
    [result] = verified["results"]
    assert result["result"] == "ok", result["error"]
    assert result["restic_check"]["ok"] and result["restic_check"]["read_data_subset"] == "100%"
    assert result["plain_bytes"] == obj["size"]

    report = operations.restore(storage, "cache", redis_target(redis_db), kind="redis")
    assert report["backup_id"] == manifest["id"]
    assert redis_state(redis_db, 13) == redis_state(redis_db, 3)
    assert secret not in json.dumps(report)

    # a manifest whose SHA-256 does not match what restic dumps: refused before the target changes
    path = tmp_path / "store" / "cache" / manifest["id"] / "manifest.json"
    edited = json.loads(path.read_text())
    edited["objects"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(edited))
    (tmp_path / "store" / "cache" / "index.json").unlink()
    redis_db.client(13).flushdb()
    redis_db.client(13).set("untouched", "yes")
    with pytest.raises(IntegrityError, match="has SHA-256 [0-9a-f]{64}, the manifest says 0{64}"):
        operations.restore(storage, "cache", redis_target(redis_db), kind="redis")
    assert redis_state(redis_db, 13) == {b"untouched": redis_db.client(13).dump("untouched")}


def test_unsupported_kind_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a\n")
    storage = open_storage(fs_storage(tmp_path, password()))
    with pytest.raises(ConfigError, match=r"kind directory_sync cannot be stored in the restic format"):
        backup(storage, "mirror", "directory_sync",
               {"path": str(tmp_path / "data"), "destination": str(tmp_path / "mirror")})
    with pytest.raises(ConfigError, match=r"source.incremental cannot be used with storage.format restic"):
        backup(storage, "docs", "files", {"path": str(tmp_path / "data"), "incremental": True})
    assert not (tmp_path / "store").exists() or stored_files(tmp_path / "store") == []
    assert not (tmp_path / "mirror").exists()


def _write_tree(root, files, size):
    for number in range(files):
        directory = root / ("d%02d" % (number % 7))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ("template-%04d.bin" % number)).write_bytes(os.urandom(size))
    (root / "README").write_text("enrolment templates\n")
    os.symlink("README", root / "latest")


def test_files_backups_store_only_new_chunks_and_restore_with_the_files_checks(tmp_path):
    """A files job in the restic format: every backup is a whole tree (the engine's pax tar,
    index and sha256 list, one snapshot each); restic stores only the chunks it has not seen,
    so an unchanged tree adds next to nothing and one changed file adds about a chunk. Each
    backup restores on its own (no chain), through the files target's checks, and with stock
    tools (restic dump | tar -x, then sha256sum -c)."""
    tree = tmp_path / "data"
    _write_tree(tree, 480, 96 * 1024)  # 45 MiB of incompressible content
    secret = password()
    storage = open_storage(fs_storage(tmp_path, secret))
    first = backup(storage, "templates", "files", {"path": str(tree)})
    assert [obj["payload"] for obj in first["objects"]] == ["files.tar", "files.index", "files.sha256"]
    assert first["stats"]["type"] == "full" and first["parent"] is None
    assert first["restic"]["data_added"] > 45 * 1024 * 1024
    before = snapshot(tree)
    second = backup(storage, "templates", "files", {"path": str(tree)})
    assert second["restic"]["data_added"] < 0.01 * first["restic"]["data_added"], second["restic"]
    with open(tree / "d03" / "template-0010.bin", "r+b") as handle:
        handle.seek(4096)
        handle.write(os.urandom(512))
    third = backup(storage, "templates", "files", {"path": str(tree)})
    assert third["parent"] is None and third["stats"]["type"] == "full"
    # a change in place: the chunk around it (restic averages 1 MiB, at most 8 MiB), not 45 MiB
    # again. (A file added or removed mid-tree shifts the rest of the tar and costs much more
    # with restic 0.14's stdin chunking: docs/restic-format.md, figures for files.)
    assert 0 < third["restic"]["data_added"] < 0.25 * first["restic"]["data_added"], third["restic"]
    (tree / "d03" / "template-0017.bin").unlink()
    (tree / "d06" / "new.bin").write_bytes(b"enrolled later\n")
    fourth = backup(storage, "templates", "files", {"path": str(tree)})

    restored = operations.restore(storage, "templates", {"path": str(tmp_path / "at-second")}, kind="files",
                                  backup=second["id"])
    assert restored["backup_id"] == second["id"]
    assert snapshot(tmp_path / "at-second") == before
    operations.restore(storage, "templates", {"path": str(tmp_path / "latest")}, kind="files")
    assert snapshot(tmp_path / "latest") == snapshot(tree)
    results = operations.verify(storage, "templates", backup="all")["results"]
    assert sorted(r["id"] for r in results) == sorted(m["id"] for m in (first, second, third, fourth))
    assert all(r["result"] == "ok" for r in results), results

    # stock tools alone: the tar and the sha256 list of the first backup
    stock = tmp_path / "stock"
    stock.mkdir()
    env = dict(os.environ, RESTIC_PASSWORD=secret)
    repo = "local:%s" % (tmp_path / "store" / "_restic" / "templates")
    tar_snapshot = first["objects"][0]["restic_snapshot"]
    sums_snapshot = first["objects"][2]["restic_snapshot"]
    dump = subprocess.Popen(["restic", "-r", repo, "--no-cache", "dump", tar_snapshot, "/files.tar"],
                            stdout=subprocess.PIPE, env=env)
    subprocess.run(["tar", "-x", "-C", str(stock)], stdin=dump.stdout, check=True)
    dump.stdout.close()
    assert dump.wait() == 0
    sums = subprocess.run(["restic", "-r", repo, "--no-cache", "dump", sums_snapshot, "/files.sha256"],
                          capture_output=True, env=env, check=True).stdout
    subprocess.run(["sha256sum", "--quiet", "-c", "-"], input=sums, cwd=str(stock), check=True)
    assert snapshot(stock, owners=False) == snapshot(tmp_path / "at-second", owners=False)


def test_a_files_job_moved_to_restic_and_back_starts_a_new_chain_without_the_password(tmp_path):
    """Review finding: an archive job with incremental: true whose latest backup was taken in the
    restic format took that backup for its parent, so every run failed for want of the repository
    password (which only restic-format jobs mount). The move back now starts with a full."""
    tree = tmp_path / "data"
    _write_tree(tree, 6, 4096)
    secret = password()
    archive = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    restic = open_storage(fs_storage(tmp_path, secret))
    chained = {"path": str(tree), "incremental": True}
    base = backup(archive, "docs", "files", chained)
    increment = backup(archive, "docs", "files", chained)
    assert increment["parent"] == base["id"]
    moved = backup(restic, "docs", "files", {"path": str(tree)})
    assert moved["storage_format"] == "restic" and moved["parent"] is None
    (tree / "README").write_text("changed after the move back\n")
    back = backup(archive, "docs", "files", chained)   # no password in these storage options
    assert back["parent"] is None and back["stats"]["type"] == "full"
    assert back["stats"]["full_reason"] == "latest backup %s is in the restic format" % moved["id"]
    again = backup(archive, "docs", "files", chained)
    assert again["parent"] == back["id"]
    operations.restore(archive, "docs", {"path": str(tmp_path / "restored")}, kind="files")
    assert snapshot(tmp_path / "restored") == snapshot(tree)
    # the old archive chain restores as before, and the restic backup with the password
    operations.restore(archive, "docs", {"path": str(tmp_path / "old")}, kind="files", backup=increment["id"])
    operations.restore(restic, "docs", {"path": str(tmp_path / "moved")}, kind="files", backup=moved["id"])
    assert (tmp_path / "moved" / "README").read_text() == "enrolment templates\n"
    # both were taken of the same tree: the chain's end and the restic backup restore alike
    assert snapshot(tmp_path / "old") == snapshot(tmp_path / "moved")


def test_a_damaged_files_backup_is_refused_before_the_destination_exists(tmp_path):
    tree = tmp_path / "data"
    _write_tree(tree, 12, 64 * 1024)
    storage = open_storage(fs_storage(tmp_path, password()))
    backup(storage, "templates", "files", {"path": str(tree)})
    _damage_packs(tmp_path / "store" / "_restic" / "templates")
    with pytest.raises(IntegrityError):
        operations.restore(storage, "templates", {"path": str(tmp_path / "restored")}, kind="files")
    assert not (tmp_path / "restored").exists()
    leftovers = [name for name in os.listdir(tmp_path) if name not in ("data", "store")]
    assert leftovers == []


def test_the_format_needs_a_password_and_no_age_encryption(tmp_path, redis_db):
    with pytest.raises(ConfigError, match="format restic needs the repository password"):
        open_storage({"backend": "filesystem", "path": str(tmp_path), "format": "restic"})
    storage = open_storage(fs_storage(tmp_path, password()))
    source = operations.make_source("redis", redis_source(redis_db))
    with pytest.raises(ConfigError, match="remove the encryption option"):
        operations.prepare_backup("cache", source, storage, encryption={"passphrase": "x" * 20})


def _damage_packs(root):
    packs = [os.path.join(d, f) for d, dummy, files in os.walk(root / "data") for f in files]
    assert packs
    for path in packs:
        with open(path, "r+b") as handle:
            handle.seek(os.path.getsize(path) // 3)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_pack_fails_verify_and_restore_before_the_target_changes(tmp_path, redis_db):
    storage = open_storage(fs_storage(tmp_path, password()))
    backup(storage, "cache", "redis", redis_source(redis_db))
    # reading a restic-format backup without the password says what is missing
    bare = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    with pytest.raises(ConfigError, match="give storage.restic_password"):
        operations.restore(bare, "cache", redis_target(redis_db), kind="redis")
    _damage_packs(tmp_path / "store" / "_restic" / "cache")
    redis_db.client(13).set("untouched", "yes")
    before = redis_state(redis_db, 13)
    with pytest.raises(IntegrityError):
        operations.restore(storage, "cache", redis_target(redis_db), kind="redis")
    assert redis_state(redis_db, 13) == before
    [result] = operations.verify(storage, "cache")["results"]
    assert result["result"] == "failed"


def test_a_missing_snapshot_is_refused_before_the_target_changes_without_listing_the_repository(
        tmp_path, redis_db, monkeypatch):
    """The one-pass restore finds its declared payload's snapshot by name in the repository's
    storage: no ``restic snapshots`` (a restic start and the decryption of every snapshot). A
    snapshot the storage does not show is looked up by restic before the backup is refused."""
    storage = open_storage(fs_storage(tmp_path, password()))
    kept = backup(storage, "cache", "redis", redis_source(redis_db))
    gone = backup(storage, "cache", "redis", redis_source(redis_db))

    def no_listing(*_args, **_kwargs):
        raise AssertionError("restic snapshots was run")

    monkeypatch.setattr(ResticRepository, "_snapshots_json", no_listing)
    done = operations.restore(storage, "cache", redis_target(redis_db), backup=kept["id"], kind="redis")
    assert done["changed"] and done["verification"]["mode"] == "one-pass"

    monkeypatch.undo()
    [snapshot_id] = [obj["restic_snapshot"] for obj in gone["objects"]]
    (tmp_path / "store" / "_restic" / "cache" / "snapshots" / snapshot_id).unlink()
    redis_db.client(13).flushdb()
    redis_db.client(13).set("untouched", "yes")
    before = redis_state(redis_db, 13)
    with pytest.raises(IntegrityError, match="restic snapshot %s .* is missing from" % snapshot_id[:12]):
        operations.restore(storage, "cache", redis_target(redis_db), backup=gone["id"], kind="redis")
    assert redis_state(redis_db, 13) == before


def test_postgres_on_seaweedfs_round_trip_and_prune(tmp_path, s3_server, postgres_server, postgres_database):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, template bytea)")
        conn.execute("INSERT INTO subjects SELECT g, decode(md5(g::text), 'hex') FROM generate_series(1, 123) g")
    secret = password()
    options = dict(s3_server.storage_options(prefix="restic-%s" % uuid.uuid4().hex[:8]), format="restic",
                   restic_password=secret)
    storage = open_storage(options)
    source = {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
              "database": postgres_database.name, "bin_dir": postgres_server.bin_dir}
    first = backup(storage, "pg", "postgres", source)
    second = backup(storage, "pg", "postgres", source)
    assert {obj["payload"] for obj in second["objects"]} == {"globals.sql", "database.dump"}
    assert len(second["restic"]["snapshots"]) == 2
    assert operations.inventory(storage)["junk"] == []
    restored = "restic_%s" % uuid.uuid4().hex[:8]
    try:
        report = operations.restore(storage, "pg", dict(source, restore_database=restored), kind="postgres")
        assert report["backup_id"] == second["id"]
        with postgres_server.connect(restored) as conn:
            assert conn.execute("SELECT count(*) FROM subjects").fetchone()[0] == 123
    finally:
        postgres_server.drop_database(restored)

    repo_snapshots = _snapshots(storage, "pg")
    assert set(repo_snapshots) == set(first["restic"]["snapshots"] + second["restic"]["snapshots"])
    # a snapshot whose backup never got its manifest (a runner killed in between)
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    stray = resticstore.repository(storage, "pg").backup_stream(
        io.BytesIO(b"partial"), "database.dump",
        {"job": "pg", "kind": "postgres", "backup_id": "20200101T000000Z-dead", "payload": "database.dump"})
    pruned = operations.prune(storage, "pg", {"keep_last": 1}, orphan_grace="0")
    assert pruned["deleted"] == [first["id"]]
    assert set(_snapshots(storage, "pg")) == set(second["restic"]["snapshots"])
    assert sorted(pruned["restic"]["forgotten"]) == sorted(first["restic"]["snapshots"] + [stray["snapshot_id"]])
    assert [entry["id"] for entry in pruned["restic"]["orphan_snapshots"]] == [stray["snapshot_id"]]
    assert pruned["restic"]["pruned"]
    assert [m["id"] for m in operations.inventory(storage, "pg")["backups"]] == [second["id"]]
    [result] = operations.verify(storage, "pg")["results"]
    assert result["result"] == "ok", result["error"]


def _snapshots(storage, job):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    return [snap["id"] for snap in resticstore.repository(storage, job).snapshots({"job": job})]


# --------------------------------------------------------------------------- runner and modules

@pytest.fixture
def pg_db(postgres_server, postgres_database):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, template bytea)")
        conn.execute("INSERT INTO subjects SELECT g, decode(md5(g::text), 'hex') FROM generate_series(1, 77) g")
    return postgres_database.name


def test_runner_round_trips_postgres_and_redis(tmp_path, postgres_server, pg_db, redis_db):
    secret = password()
    pg_password = "pg-" + uuid.uuid4().hex
    env = {"RUNNER_RESTIC_PASSWORD": secret, "RUNNER_PG_PASSWORD": pg_password, "RUNNER_REDIS": REDIS_SECRET}
    storage = {"backend": "filesystem", "path": str(tmp_path / "store"), "format": "restic",
               "restic_password_env": "RUNNER_RESTIC_PASSWORD", "restic_read_data_subset": "1/2"}
    pg_source = {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                 "database": pg_db, "bin_dir": postgres_server.bin_dir, "password_env": "RUNNER_PG_PASSWORD"}
    restored = "restic_runner_%s" % uuid.uuid4().hex[:6]
    redis_options = {key: value for key, value in redis_source(redis_db).items() if key != "password"}
    redis_options["password_env"] = "RUNNER_REDIS"
    jobs = {
        "pg": write_job(tmp_path / "pg.json", {
            "job": "pg", "kind": "postgres", "source": pg_source, "storage": storage,
            "restore": {"target": dict(pg_source, restore_database=restored)}}),
        "cache": write_job(tmp_path / "cache.json", {
            "job": "cache", "kind": "redis", "source": redis_options, "storage": storage,
            "restore": {"target": dict(redis_options, db_map={3: 13})},
            "metrics": {"textfile": str(tmp_path / "cache.prom")}}),
    }
    outputs = []
    try:
        for job, config in jobs.items():
            done = run("backup", config, env)
            outputs.append(done)
            assert done.returncode == 0, done.stderr
            manifest = json.loads(done.stdout)["manifest"]
            assert manifest["storage_format"] == "restic"
            for command in ("list", "verify", "restore"):
                done = run(command, config, env)
                outputs.append(done)
                assert done.returncode == 0, (command, done.stderr)
                result = json.loads(done.stdout)
                if command == "list":
                    assert [m["id"] for m in result["backups"]] == [manifest["id"]] and result["junk"] == []
                elif command == "verify":
                    assert result["results"][0]["result"] == "ok"
                    assert result["results"][0]["restic_check"]["read_data_subset"] == "1/2"
                else:
                    assert result["backup_id"] == manifest["id"]
            assert secret not in (tmp_path / "store" / job / manifest["id"] / "manifest.json").read_text()
        # The metrics of a restic backup: what restic stored new, and the repository's size.
        values = dict(line.split("{", 1)[0:1] + [float(line.rsplit(" ", 1)[1])]
                      for line in (tmp_path / "cache.prom").read_text().splitlines()
                      if line.startswith(("backup_stored_new_bytes", "backup_repository_size_bytes")))
        repository = sum(os.path.getsize(os.path.join(d, f)) for d, dummy, files in
                         os.walk(tmp_path / "store" / "_restic" / "cache") for f in files)
        assert values["backup_repository_size_bytes"] == repository
        assert 0 < values["backup_stored_new_bytes"] <= repository
        with postgres_server.connect(restored) as conn:
            assert conn.execute("SELECT count(*) FROM subjects").fetchone()[0] == 77
        assert redis_state(redis_db, 13) == redis_state(redis_db, 3)
    finally:
        postgres_server.drop_database(restored)
    for done in outputs:
        for value in (secret, pg_password, REDIS_SECRET):
            assert value not in done.stdout and value not in done.stderr


def test_modules_round_trip_postgres_and_redis(tmp_path, postgres_server, pg_db, redis_db):
    secret = password()
    pg_password = "pg-" + uuid.uuid4().hex
    storage = {"backend": "filesystem", "path": str(tmp_path / "store"), "format": "restic",
               "restic_password": secret}
    connection = {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                  "password": pg_password, "bin_dir": postgres_server.bin_dir}
    restored = "restic_modules_%s" % uuid.uuid4().hex[:6]
    tasks = []
    for job, kind, source, target, verify in (
            ("pg", "postgres", dict(connection, database=pg_db),
             dict(connection, database=pg_db, restore_database=restored),
             {"test_restore": True, "scratch": dict(connection, database=pg_db)}),
            ("cache", "redis", redis_source(redis_db), redis_target(redis_db), {})):
        tasks += [
            {"name": "backup " + job, FQCN + "backup_run": {
                "job": job, "kind": kind, "source": source, "storage": storage}},
            {"name": "backup %s again" % job, "when": job == "cache", FQCN + "backup_run": {
                "job": job, "kind": kind, "source": source, "storage": storage}},
            {"name": "info " + job, FQCN + "backup_info": {"job": job, "storage": storage}},
            {"name": "verify " + job, FQCN + "backup_verify": dict(verify, job=job, storage=storage)},
            {"name": "restore " + job, FQCN + "backup_restore": {"job": job, "target": target, "storage": storage}},
        ]
    tasks += [
        {"name": "prune preview", "check_mode": True, FQCN + "backup_prune": {
            "job": "cache", "keep_last": 1, "storage": storage}},
        {"name": "prune", FQCN + "backup_prune": {"job": "cache", "keep_last": 1, "storage": storage}},
    ]
    tasks.append({"name": "refused", "ignore_errors": True, FQCN + "backup_run": {
        "job": "docs", "kind": "files", "source": {"path": str(tmp_path), "incremental": True},
        "storage": storage}})
    try:
        proc, results = ansible_playbook(tmp_path, tasks, verbosity=3)
        assert proc.returncode == 0, proc.stdout[-3000:]
        for job, name in (("pg", "backup pg"), ("cache", "backup cache again")):
            manifest = results[name]["manifest"]
            assert manifest["storage_format"] == "restic"
            assert [b["id"] for b in results["info " + job]["backups"]][0] == manifest["id"]
            assert results["verify " + job]["results"][0]["result"] == "ok"
            assert results["restore " + job]["backup_id"] == manifest["id"]
        # a test restore (as in a drill) reads all of the repository's data with restic check
        [verified] = results["verify pg"]["results"]
        assert verified["restic_check"]["read_data_subset"] == "all"
        rows = [check for check in verified["checks"] if check["what"] == "rows public.subjects"]
        assert rows and rows[0]["ok"] and rows[0]["actual"] == 77
        assert results["verify cache"]["results"][0]["restic_check"]["read_data_subset"] is None
        first = results["backup cache"]["manifest"]
        snapshots = sorted(first["restic"]["snapshots"])
        preview, pruned = results["prune preview"], results["prune"]
        assert [entry["id"] for entry in preview["prune"]] == [first["id"]] and preview["deleted"] == []
        assert preview["restic"]["would_forget"] == snapshots and preview["restic"]["forgotten"] == []
        assert pruned["deleted"] == [first["id"]] and pruned["changed"]
        assert sorted(pruned["restic"]["forgotten"]) == snapshots and pruned["restic"]["pruned"]
        assert "source.incremental cannot be used with storage.format restic" in results["refused"]["msg"]
        assert not (tmp_path / "store" / "docs").exists()
        with postgres_server.connect(restored) as conn:
            assert conn.execute("SELECT count(*) FROM subjects").fetchone()[0] == 77
        assert redis_state(redis_db, 13) == redis_state(redis_db, 3)
        for value in (secret, pg_password, REDIS_SECRET):
            assert value not in proc.stdout and value not in proc.stderr
    finally:
        postgres_server.drop_database(restored)


# --------------------------------------------------------------------------- review findings

def _repository(storage, job):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    return resticstore.repository(storage, job)


def _hold_a_lock(storage, job, secret):
    """A real ``restic backup --stdin`` of the job's repository whose input stays open: it holds a
    live (shared) lock until its stdin is closed."""
    repo = _repository(storage, job)
    proc = subprocess.Popen(["restic", "-r", repo.url, "--no-cache", "backup", "--stdin", "--stdin-filename", "held"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, RESTIC_PASSWORD=secret))
    deadline = time.monotonic() + 30
    while not repo.locks():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def test_damage_elsewhere_in_the_repository_does_not_condemn_intact_backups(tmp_path, redis_db):
    """Review finding: restic check failing on another snapshot's pack recorded every backup of
    the job as failed, and prune deletes failed backups after the grace period."""
    storage = open_storage(fs_storage(tmp_path, password()))
    first = backup(storage, "cache", "redis", redis_source(redis_db))
    second = backup(storage, "cache", "redis", redis_source(redis_db))
    data = tmp_path / "store" / "_restic" / "cache" / "data"
    before = set(stored_files(data))
    _repository(storage, "cache").backup_stream(io.BytesIO(os.urandom(2 << 20)), "other.bin",
                                                {"job": "other", "kind": "redis", "backup_id": "x"})
    # The other snapshot's data pack goes (restic keeps tree blobs in packs of their own: its
    # tree pack stays, so the check finds the missing pack without retrying loads of its tree).
    removed = [name for name in set(stored_files(data)) - before if os.path.getsize(data / name) > (1 << 20)]
    assert removed
    for name in removed:
        os.unlink(data / name)
    verified = operations.verify(storage, "cache", backup="all")
    assert verified["ok"] is False and verified["changed"] is False
    for result in verified["results"]:
        assert result["result"] == "error" and not result["recorded"], result
        assert "found errors elsewhere (this backup's payloads dumped intact)" in result["error"]
        assert result["restic_check"]["ok"] is False
    for manifest in (first, second):
        assert not (tmp_path / "store" / "cache" / manifest["id"] / "verification.json").exists()
    # Both still restore.
    report = operations.restore(storage, "cache", redis_target(redis_db), kind="redis", backup=first["id"])
    assert report["backup_id"] == first["id"]


def test_a_dump_closed_early_leaves_no_lock(tmp_path):
    storage = open_storage(fs_storage(tmp_path, password()))
    repo = _repository(storage, "big")
    repo.init_if_missing()
    stored = repo.backup_stream(io.BytesIO(os.urandom(48 << 20)), "dump.rdb",
                                {"job": "big", "kind": "redis", "backup_id": "20240101T000000Z-aaaaaa"})
    reader = repo.open_dump(stored["snapshot_id"], "dump.rdb")
    assert len(reader.read(1 << 16)) > 0   # restic is still writing: the pipe holds far less than 48 MiB
    reader.close()
    assert repo.locks() == []


def test_orphan_snapshots_wait_for_the_grace_of_their_newest_snapshot(tmp_path):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import utc_now
    storage = open_storage(fs_storage(tmp_path, password()))
    repo = _repository(storage, "pg")
    repo.init_if_missing()
    now = utc_now()

    def snapshot(backup_id, age):
        return repo.backup_stream(io.BytesIO(os.urandom(1024)), "database.dump",
                                  {"job": "pg", "kind": "postgres", "backup_id": backup_id},
                                  time_=(now - age).astimezone().strftime("%Y-%m-%d %H:%M:%S"))["snapshot_id"]

    # A backup in progress: its globals snapshot is old, its dump snapshot recent, no manifest yet.
    in_progress = [snapshot("20240101T000000Z-aaaaaa", datetime.timedelta(days=2)),
                   snapshot("20240101T000000Z-aaaaaa", datetime.timedelta(hours=1))]
    abandoned = snapshot("20240102T000000Z-bbbbbb", datetime.timedelta(days=3))
    dummy, plan = resticstore.plan_repository_prune(storage, "pg", [], set(), datetime.timedelta(hours=24), now)
    assert [entry["id"] for entry in plan["orphan_snapshots"]] == [abandoned]
    assert plan["waiting"] == len(in_progress)


def test_duplicate_snapshots_of_a_kept_backup_are_forgotten_after_the_grace(tmp_path, redis_db):
    """Two copy runs racing into one destination both copy a backup's snapshots; the manifest
    published last names one set and the other was never forgotten. Prune now forgets snapshots
    tagged with a kept backup's id that its manifest does not name, after orphan_grace, only while
    every named snapshot is there, and not one a manifest published since names."""
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import utc_now
    storage = open_storage(fs_storage(tmp_path, password()))
    made = backup(storage, "cache", "redis", redis_source(redis_db))
    [named] = made["restic"]["snapshots"]
    repo = _repository(storage, "cache")

    def duplicate(age, backup_id=made["id"]):
        moment = (utc_now() - age).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        return repo.backup_stream(io.BytesIO(b"the same payload, copied twice"), "dump.rdb",
                                  {"job": "cache", "kind": "redis", "backup_id": backup_id, "payload": "dump.rdb"},
                                  time_=moment)["snapshot_id"]

    old, young = duplicate(datetime.timedelta(days=3)), duplicate(datetime.timedelta(minutes=5))
    preview = operations.prune(storage, "cache", {"keep_last": 1}, orphan_grace="1h", dry_run=True)
    assert [entry["id"] for entry in preview["restic"]["duplicate_snapshots"]] == [old]
    assert preview["restic"]["would_forget"] == [old] and preview["restic"]["orphan_snapshots_waiting"] == 1
    assert preview["changed"] is True and set(_snapshots(storage, "cache")) == {named, old, young}
    pruned = operations.prune(storage, "cache", {"keep_last": 1}, orphan_grace="1h")
    assert pruned["restic"]["forgotten"] == [old] and pruned["restic"]["pruned"] is True
    assert set(_snapshots(storage, "cache")) == {named, young}
    [result] = operations.verify(storage, "cache")["results"]
    assert result["result"] == "ok", result["error"]

    # A manifest published since the plan names the duplicate: it stays (and the one named before
    # is left for the next prune, now a duplicate itself).
    dummy, plan = resticstore.plan_repository_prune(storage, "cache", [made], set(), datetime.timedelta(0), utc_now())
    assert [entry["id"] for entry in plan["duplicate_snapshots"]] == [young]
    key = mf.object_key("cache", made["id"], mf.MANIFEST_NAME)
    republished = json.loads(storage.get_bytes(key))
    republished["objects"][0]["restic_snapshot"] = republished["restic"]["snapshot_id"] = young
    republished["restic"]["snapshots"] = [young]
    storage.put_bytes(key, json.dumps(republished).encode())
    report = resticstore.prune_repository(storage, "cache", repo, plan, False, lambda line: None)
    assert report["duplicate_snapshots"] == [] and young in _snapshots(storage, "cache")
    storage.put_bytes(key, json.dumps(made).encode())

    # The named snapshot gone (a damaged backup): no snapshot of it is forgotten as a duplicate,
    # it may be the only readable copy left.
    repo.forget([named])
    dummy, plan = resticstore.plan_repository_prune(storage, "cache", [made], set(), datetime.timedelta(0), utc_now())
    assert plan["duplicate_snapshots"] == [] and plan["orphan_snapshots"] == []


def test_an_unfinished_repository_prune_is_reported_and_finished_by_the_next(tmp_path, redis_db, monkeypatch):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import PartialPruneError
    monkeypatch.setattr(resticstore, "LOCK_WAIT", 0)   # refused at once instead of after ten minutes
    secret = password()
    storage = open_storage(fs_storage(tmp_path, secret))
    old = backup(storage, "cache", "redis", redis_source(redis_db))
    new = backup(storage, "cache", "redis", redis_source(redis_db))
    marker = tmp_path / "store" / resticstore.prune_pending_key("cache")
    held = _hold_a_lock(storage, "cache", secret)
    try:
        with pytest.raises(PartialPruneError, match="1 backups deleted, then cleaning the restic repository failed"
                           ) as caught:
            operations.prune(storage, "cache", {"keep_last": 1}, orphan_grace="0")
        assert caught.value.result["deleted"] == [old["id"]]
        assert marker.exists()   # restic prune is owed
    finally:
        held.stdin.close()
        held.wait(timeout=60)
    # The next prune forgets the deleted backup's snapshots (no manifest any more) and prunes,
    # although the policy deletes nothing this time.
    result = operations.prune(storage, "cache", {"keep_last": 1}, orphan_grace="0")
    assert result["deleted"] == []
    assert result["restic"]["pruned"] is True and not marker.exists()
    assert {entry["backup_id"] for entry in result["restic"]["orphan_snapshots"]} >= {old["id"]}
    assert set(_snapshots(storage, "cache")) == set(new["restic"]["snapshots"])
    [result] = operations.verify(storage, "cache")["results"]
    assert result["result"] == "ok", result["error"]


def test_check_mode_opens_the_repository_as_the_real_run_would(tmp_path, redis_db):
    source = redis_source(redis_db)
    storage = open_storage(fs_storage(tmp_path, password()))
    planned = operations.prepare_backup("cache", operations.make_source("redis", source), storage).plan()
    assert planned["restic_repository"] == {"exists": False} and planned["restic_version"] >= "0.14"
    assert not (tmp_path / "store").exists() or stored_files(tmp_path / "store") == []
    made = backup(storage, "cache", "redis", source)
    planned = operations.prepare_backup("cache", operations.make_source("redis", source), storage).plan()
    assert planned["restic_repository"]["exists"] is True
    assert planned["restic_repository"]["id"] == made["restic"]["repository_id"]
    wrong = open_storage(fs_storage(tmp_path, password()))
    with pytest.raises(ConfigError, match="wrong password"):
        operations.prepare_backup("cache", operations.make_source("redis", source), wrong).plan()


def test_a_source_failing_after_a_committed_snapshot_leaves_neither_snapshot_nor_manifest(tmp_path):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import SourceError
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source

    class FirstPayloadThenFailure(Source):
        """As a postgres source whose row counts fail after globals.sql was stored."""
        kind = "redis"

        def produce(self, emit, context):
            emit("first.bin", io.BytesIO(os.urandom(4096)))   # a complete snapshot
            raise SourceError("the source failed after its first payload")

    storage = open_storage(fs_storage(tmp_path, password()))
    with pytest.raises(SourceError, match="after its first payload"):
        operations.prepare_backup("cache", FirstPayloadThenFailure({}), storage).run()
    assert _snapshots(storage, "cache") == []
    assert operations.inventory(storage)["backups"] == []
    assert [name for name in os.listdir(tmp_path / "store") if name != "_restic"] in ([], ["cache"])


def test_a_job_moves_to_the_restic_format_with_its_archive_history_side_by_side(tmp_path, redis_db):
    """Migration (issue 16 point 5): switching a job's storage.format keeps its archive backups
    listed, verifiable, restorable and pruned by the same policy; the retention counts both."""
    from pyrage import x25519
    identity = x25519.Identity.generate()
    encryption = {"recipients": [str(identity.to_public())]}
    archives = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    source = operations.make_source("redis", redis_source(redis_db))
    old = operations.prepare_backup("cache", source, archives, encryption=encryption).run()
    assert old.get("storage_format") in (None, "archive")
    restic_store = open_storage(fs_storage(tmp_path, password()))
    new = backup(restic_store, "cache", "redis", redis_source(redis_db))
    assert new["storage_format"] == "restic"

    listed = operations.inventory(restic_store, "cache")
    assert [m["id"] for m in listed["backups"]] == [new["id"], old["id"]] and listed["junk"] == []
    verified = operations.verify(restic_store, "cache", backup="all", identity=str(identity))
    assert [r["result"] for r in verified["results"]] == ["ok", "ok"], verified
    report = operations.restore(restic_store, "cache", redis_target(redis_db), kind="redis", backup=old["id"],
                                identity=str(identity))
    assert report["backup_id"] == old["id"] and redis_state(redis_db, 13) == redis_state(redis_db, 3)

    pruned = operations.prune(restic_store, "cache", {"keep_last": 1}, orphan_grace="0")
    assert pruned["deleted"] == [old["id"]]
    assert not (tmp_path / "store" / "cache" / old["id"]).exists()   # the archive's objects went
    assert pruned["restic"]["forgotten"] == []                     # the restic backup is kept
    assert [m["id"] for m in operations.inventory(restic_store, "cache")["backups"]] == [new["id"]]


def test_a_job_moved_back_to_archives_reads_its_restic_backups_with_the_password(tmp_path, redis_db):
    """The job file the roles write for a job moved back from the restic format (archive format,
    storage.restic_password_file kept): the runner stores archives, and lists, verifies, restores
    and prunes the restic backups from before; without the password the prune is refused, naming it."""
    secret = password()
    password_file = tmp_path / "restic-password"
    password_file.write_text(secret + "\n")
    password_file.chmod(0o600)
    source = {key: value for key, value in redis_source(redis_db).items() if key != "password"}
    source["password_env"] = "RUNNER_REDIS"
    env = {"RUNNER_REDIS": REDIS_SECRET}
    base = {"job": "cache", "kind": "redis", "source": source, "encryption": {"enabled": False},
            "restore": {"target": dict(source, db_map={3: 13})}, "retention": {"keep_last": 1, "orphan_grace": "0"}}
    location = {"backend": "filesystem", "path": str(tmp_path / "store")}
    restic_job = write_job(tmp_path / "restic.json", dict(
        base, storage=dict(location, format="restic", restic_password_file=str(password_file))))
    moved_back = write_job(tmp_path / "archive.json", dict(
        base, storage=dict(location, restic_password_file=str(password_file))))
    without_password = write_job(tmp_path / "plain.json", dict(base, storage=location))

    done = run("backup", restic_job, env)
    assert done.returncode == 0, done.stderr
    old = json.loads(done.stdout)["manifest"]
    assert old["storage_format"] == "restic"
    done = run("backup", moved_back, env)
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)["manifest"]
    assert new.get("storage_format", "archive") == "archive"

    done = run("verify", moved_back, env, ["--backup", "all"])
    assert done.returncode == 0, done.stderr
    assert {r["id"]: r["result"] for r in json.loads(done.stdout)["results"]} == {old["id"]: "ok", new["id"]: "ok"}
    done = run("restore", moved_back, env, ["--backup", old["id"]])
    assert done.returncode == 0, done.stderr
    assert redis_state(redis_db, 13) == redis_state(redis_db, 3)

    refused = run("prune", without_password, env)
    assert refused.returncode != 0
    assert "job cache has backups in the restic format: give storage.restic_password" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert (tmp_path / "store" / "cache" / old["id"]).exists()

    done = run("prune", moved_back, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted"] == [old["id"]]
    snapshots = subprocess.run(["restic", "-r", str(tmp_path / "store" / "_restic" / "cache"), "--no-cache",
                                "snapshots", "--json"], capture_output=True, text=True, check=True,
                               env=dict(os.environ, RESTIC_PASSWORD=secret)).stdout
    assert json.loads(snapshots) == []   # the old backup's snapshots were forgotten too
    for output in (done.stdout, done.stderr, refused.stderr):
        assert secret not in output


# --------------------------------------------------------------------------- offsite copies

COPY_JOB = "cache"


def _restic(repository, password, *args):
    return subprocess.run(["restic", "-r", repository, "--no-cache"] + list(args), capture_output=True, check=False,
                          env=dict(os.environ, RESTIC_PASSWORD=password))


def test_restic_backups_are_copied_into_the_destinations_own_repository(tmp_path, s3_server, redis_db):
    source_secret, destination_secret = "src-" + uuid.uuid4().hex, "dst-" + uuid.uuid4().hex
    source = open_storage(dict(s3_server.storage_options(prefix="rcopy-%s" % uuid.uuid4().hex[:8]),
                               format="restic", restic_password=source_secret))
    destination_root = tmp_path / "offsite"
    destination = open_storage({"backend": "filesystem", "path": str(destination_root), "format": "restic",
                                "restic_password": destination_secret})
    first = backup(source, COPY_JOB, "redis", redis_source(redis_db))
    redis_db.client(3).set("subject:3", os.urandom(4096))
    second = backup(source, COPY_JOB, "redis", redis_source(redis_db))

    planned = operations.copy(source, destination, COPY_JOB, check_mode=True)
    assert [step["id"] for step in planned["planned"]] == [first["id"], second["id"]]
    assert not destination_root.exists()  # check mode writes nothing

    outcome = operations.copy(source, destination, COPY_JOB)
    assert outcome["ok"] and [entry["id"] for entry in outcome["copied"]] == [first["id"], second["id"]]
    assert outcome["bytes_copied"] > 0 and outcome["lag_seconds"] == 0
    repository = str(destination_root / "_restic" / COPY_JOB)
    copies = {}
    for original in (first, second):
        copy = json.loads((destination_root / COPY_JOB / original["id"] / "manifest.json").read_text())
        copies[original["id"]] = copy
        assert copy["restic"]["snapshot_id"] != original["restic"]["snapshot_id"]
        assert copy["restic"]["repository_id"] != original["restic"]["repository_id"]
        assert copy["copied_from"]["restic"]["source_objects"] == original["objects"]
        [obj] = copy["objects"]
        assert (obj["size"], obj["sha256"]) == (original["objects"][0]["size"], original["objects"][0]["sha256"])
        # stock restorability at the destination: restic alone, with the destination's password
        dumped = _restic(repository, destination_secret, "dump", obj["restic_snapshot"], "/dump.rdb")
        assert dumped.returncode == 0, dumped.stderr
        assert hashlib.sha256(dumped.stdout).hexdigest() == obj["sha256"]
        text = json.dumps(copy)
        assert source_secret not in text and destination_secret not in text and s3_server.secret_key not in text
    # the destination's repository is its own: the source's password does not open it
    assert b"wrong password" in _restic(repository, source_secret, "cat", "config").stderr
    assert _restic(repository, destination_secret, "check", "--read-data").returncode == 0

    verified = operations.verify(destination, COPY_JOB, backup="all")
    assert [r["result"] for r in verified["results"]] == ["ok", "ok"], verified
    redis_db.client(13).flushdb()
    report = operations.restore(destination, COPY_JOB, redis_target(redis_db), kind="redis")
    assert report["backup_id"] == second["id"]
    assert redis_state(redis_db, 13) == redis_state(redis_db, 3)

    again = operations.copy(source, destination, COPY_JOB)
    assert again["copied"] == [] and sorted(again["in_sync"]) == sorted([first["id"], second["id"]])
    assert not again["changed"]

    # a snapshot lost at the destination: the backup is repaired, not taken for in sync
    lost = copies[second["id"]]["restic"]["snapshot_id"]
    os.unlink(os.path.join(repository, "snapshots", lost))
    repaired = operations.copy(source, destination, COPY_JOB)
    assert [(entry["id"], entry["action"]) for entry in repaired["copied"]] == [(second["id"], "repair")]
    fixed = json.loads((destination_root / COPY_JOB / second["id"] / "manifest.json").read_text())
    assert fixed["restic"]["snapshot_id"] != lost
    assert [r["result"] for r in operations.verify(destination, COPY_JOB, backup="all")["results"]] == ["ok", "ok"]

    # a copy of the copy (a third site, or a primary rebuilt from the offsite): restic names the
    # first snapshot of the line in every copy, and the engine maps the ids by it
    third = open_storage({"backend": "filesystem", "path": str(tmp_path / "third"), "restic_password": "third-pw"})
    onward = operations.copy(destination, third, COPY_JOB)
    assert onward["ok"] and [entry["id"] for entry in onward["copied"]] == [first["id"], second["id"]], onward
    assert [r["result"] for r in operations.verify(third, COPY_JOB, backup="all")["results"]] == ["ok", "ok"]
    assert operations.copy(destination, third, COPY_JOB)["copied"] == []

    # damaged data at the destination: reported by a full recheck, the copy stays listed (restic
    # copy could not store again what the destination's index lists, so a repair would only unlist it)
    packs = sorted(path for path in (destination_root / "_restic" / COPY_JOB / "data").rglob("*") if path.is_file())
    for pack in packs:
        pack.chmod(0o600)
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pack.write_bytes(bytes(data))
    rechecked = operations.copy(source, destination, COPY_JOB, recheck="full")
    assert not rechecked["ok"] and rechecked["copied"] == []
    assert {entry["id"] for entry in rechecked["failed"]} == {first["id"], second["id"]}
    assert all("the copy at the destination is damaged" in entry["error"] for entry in rechecked["failed"])
    assert [m["id"] for m in operations.inventory(destination, COPY_JOB)["backups"]] == [second["id"], first["id"]]
    # recorded there as a failed verification: no copy for require_copy, not verified for prune
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.offsite import copied_ids
    assert copied_ids(destination, COPY_JOB, operations.inventory(source, COPY_JOB)["backups"]) == set()
    assert rechecked["lag_seconds"] > 0


def test_racing_copy_runs_keep_one_manifest_and_prune_forgets_the_other_copies(tmp_path, redis_db, monkeypatch):
    """Two copy runs racing into one destination both copy a backup (each restic copy finds no copy
    there yet). The run that publishes second keeps the first run's manifest instead of replacing
    it under its readers, and the destination's prune forgets the snapshots no manifest names."""
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    source = open_storage(fs_storage(tmp_path / "src", password()))
    destination_root = tmp_path / "dst"
    destination = open_storage({"backend": "filesystem", "path": str(destination_root), "format": "restic",
                                "restic_password": "dst-" + uuid.uuid4().hex})
    made = backup(source, COPY_JOB, "redis", redis_source(redis_db))
    assert operations.copy(source, destination, COPY_JOB)["ok"]
    key = destination_root / COPY_JOB / made["id"] / "manifest.json"
    first = json.loads(key.read_text())["restic"]["snapshot_id"]
    # The race, replayed: the first run's snapshot and manifest out of the second run's sight
    # while it plans and copies (both runs see the backup missing there).
    snapshots_dir = destination_root / "_restic" / COPY_JOB / "snapshots"
    hidden = tmp_path / "hidden-snapshot"
    os.rename(snapshots_dir / first, hidden)
    key.unlink()
    verify_objects = resticstore.verify_objects
    published_meanwhile = {}

    def first_run_publishes_meanwhile(storage, manifest, *args, **kwargs):
        # Just before the second run publishes, the first run's manifest is (again) there.
        result = verify_objects(storage, manifest, *args, **kwargs)
        theirs = dict(json.loads(json.dumps(manifest)), copied_at="2000-01-01T00:00:00Z")
        theirs["restic"] = dict(theirs["restic"], snapshot_id=first, snapshots=[first])
        theirs["objects"] = [dict(theirs["objects"][0], restic_snapshot=first)]
        os.rename(hidden, snapshots_dir / first)
        storage.put_bytes("%s/%s/manifest.json" % (COPY_JOB, made["id"]), json.dumps(theirs).encode())
        published_meanwhile["manifest"] = theirs
        return result

    monkeypatch.setattr(resticstore, "verify_objects", first_run_publishes_meanwhile)
    lines = []
    second = operations.copy(source, destination, COPY_JOB, log=lines.append)
    monkeypatch.setattr(resticstore, "verify_objects", verify_objects)
    assert second["ok"] and [entry["action"] for entry in second["copied"]] == ["copy"], second
    assert json.loads(key.read_text()) == published_meanwhile["manifest"]   # not replaced
    assert any("another copy run published it" in line for line in lines), lines
    duplicates = set(_snapshots(destination, COPY_JOB)) - {first}
    assert len(duplicates) == 1   # the second run's copy, which no manifest names

    preview = operations.prune(destination, COPY_JOB, {"keep_last": 1}, orphan_grace="0", dry_run=True)
    assert {entry["id"] for entry in preview["restic"]["duplicate_snapshots"]} == duplicates
    pruned = operations.prune(destination, COPY_JOB, {"keep_last": 1}, orphan_grace="0")
    assert set(pruned["restic"]["forgotten"]) == duplicates
    assert _snapshots(destination, COPY_JOB) == [first]
    [result] = operations.verify(destination, COPY_JOB)["results"]
    assert result["result"] == "ok", result["error"]

    # A manifest there that does not read (junk) is no copy another run made: it is replaced.
    key.write_text("{not json")
    lines = []
    replaced = operations.copy(source, destination, COPY_JOB, log=lines.append)
    assert replaced["ok"] and [entry["id"] for entry in replaced["copied"]] == [made["id"]], replaced
    assert not any("another copy run published it" in line for line in lines), lines
    assert json.loads(key.read_text())["restic"]["snapshot_id"] == first
    [result] = operations.verify(destination, COPY_JOB)["results"]
    assert result["result"] == "ok", result["error"]


def test_a_kept_backup_naming_a_malformed_snapshot_id_does_not_stop_the_prune(tmp_path, redis_db):
    storage = open_storage(fs_storage(tmp_path, password()))
    odd = backup(storage, "cache", "redis", redis_source(redis_db))
    made = backup(storage, "cache", "redis", redis_source(redis_db))
    key = tmp_path / "store" / "cache" / odd["id"] / "manifest.json"
    broken = json.loads(key.read_text())
    broken["restic"]["snapshot_id"] = "not-a-snapshot-id"
    key.write_text(json.dumps(broken))
    pruned = operations.prune(storage, "cache", {"keep_last": 2}, orphan_grace="0")
    assert pruned["deleted"] == [] and pruned["restic"]["duplicate_snapshots"] == []
    assert set(_snapshots(storage, "cache")) == set(odd["restic"]["snapshots"]) | set(made["restic"]["snapshots"])


def test_a_copied_snapshot_without_its_manifest_ages_from_its_arrival(tmp_path):
    """Review finding: restic copy keeps the source snapshot's time, so a prune at the destination
    took a snapshot copied a moment ago (its manifest about to be published) for an old orphan."""
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
    source = open_storage({"backend": "filesystem", "path": str(tmp_path / "src"), "format": "restic",
                           "restic_password": "pw"})
    destination = open_storage({"backend": "filesystem", "path": str(tmp_path / "dst"), "format": "restic",
                                "restic_password": "pw"})
    repo = resticstore.repository(source, COPY_JOB)
    repo.init_if_missing()
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
    made = repo.backup_stream(io.BytesIO(b"a backup from three days ago"), "dump.rdb",
                              {"job": COPY_JOB, "kind": "redis", "backup_id": "20200101T000000Z-0ld0",
                               "payload": "dump.rdb"}, time_=old.strftime("%Y-%m-%d %H:%M:%S"))
    manifest = {"id": "20200101T000000Z-0ld0", "job": COPY_JOB, "storage_format": "restic",
                "restic": {"snapshot_id": made["snapshot_id"]},
                "objects": [{"name": "dump.rdb", "payload": "dump.rdb", "restic_snapshot": made["snapshot_id"]}]}
    copied, failed, dummy = resticstore.copy_snapshots(source, destination, COPY_JOB, [manifest])
    assert failed == {} and list(copied) == [manifest["id"]]
    waiting = operations.prune(destination, COPY_JOB, {"keep_last": 1}, orphan_grace="1h")
    assert waiting["restic"]["orphan_snapshots"] == [] and waiting["restic"]["forgotten"] == []
    # the source's own snapshot of the same age is an orphan there (no copy, no arrival rule)
    pruned = operations.prune(source, COPY_JOB, {"keep_last": 1}, orphan_grace="1h")
    assert [entry["id"] for entry in pruned["restic"]["orphan_snapshots"]] == [made["snapshot_id"]]


def test_prune_sweeps_the_unfinished_writes_a_killed_copy_left_in_the_repository(tmp_path):
    """Review finding: a copy killed while the repository server stored an object left its
    ``.tmp-`` file under _restic/<job>/ (the catalog never lists it, restic ignores it): prune
    removes such leftovers after orphan_grace, and nothing else of the repository."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path), "format": "restic", "restic_password": "pw"})
    repository = tmp_path / "_restic" / COPY_JOB
    (repository / "data" / "ab").mkdir(parents=True)
    name = "ab" + "0" * 62
    old = repository / "data" / "ab" / (".%s.tmp-0123" % name)
    fresh = repository / "data" / "ab" / (".%s.tmp-4567" % ("ab" + "1" * 62))
    restic_file = repository / "data" / "ab" / name
    for path in (old, fresh, restic_file):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(restic_file, (two_days_ago, two_days_ago))
    preview = operations.prune(storage, COPY_JOB, {"keep_last": 1}, orphan_grace="1h", dry_run=True)
    assert old.exists()
    assert sorted((entry["path"], entry["action"]) for entry in preview["orphans"]) == [
        (str(old.relative_to(tmp_path)), "would remove"), (str(fresh.relative_to(tmp_path)), "kept (within grace)")]
    operations.prune(storage, COPY_JOB, {"keep_last": 1}, orphan_grace="1h")
    assert not old.exists() and fresh.exists() and restic_file.exists()


def test_the_copy_takes_the_sources_password_when_the_destination_names_none(tmp_path, redis_db):
    secret = "pw-" + uuid.uuid4().hex
    source = open_storage({"backend": "filesystem", "path": str(tmp_path / "src"), "format": "restic",
                           "restic_password": secret})
    destination = open_storage({"backend": "filesystem", "path": str(tmp_path / "dst")})
    made = backup(source, COPY_JOB, "redis", redis_source(redis_db))
    outcome = operations.copy(source, destination, COPY_JOB)
    assert [entry["id"] for entry in outcome["copied"]] == [made["id"]]
    assert _restic(str(tmp_path / "dst" / "_restic" / COPY_JOB), secret, "cat", "config").returncode == 0


def test_reencrypt_is_refused_for_restic_backups_before_anything_is_written(tmp_path, redis_db):
    source = open_storage({"backend": "filesystem", "path": str(tmp_path / "src"), "format": "restic",
                           "restic_password": "pw"})
    destination = open_storage({"backend": "filesystem", "path": str(tmp_path / "dst")})
    backup(source, COPY_JOB, "redis", redis_source(redis_db))
    with pytest.raises(ConfigError, match="copy.reencrypt cannot apply"):
        key = pyrage.x25519.Identity.generate()
        operations.copy(source, destination, COPY_JOB,
                        reencrypt={"recipients": [str(key.to_public())], "identity": str(key)})
    assert not (tmp_path / "dst").exists()


def test_the_runner_copies_restic_backups_to_s3_and_prunes_them_there(tmp_path, s3_server, redis_db):
    """runner copy of a restic-format job file into S3 (the repository server storing through the
    engine's S3 storage with the destination's credentials, restic holding none of them), then
    list, verify and restore --from-copy, and prune --destination with copy.retention."""
    secret = password()
    env = {"RUNNER_RESTIC_PASSWORD": secret, "RUNNER_REDIS": REDIS_SECRET,
           "RUNNER_S3_ACCESS": s3_server.access_key, "RUNNER_S3_SECRET": s3_server.secret_key}
    redis_options = {key: value for key, value in redis_source(redis_db).items() if key != "password"}
    redis_options["password_env"] = "RUNNER_REDIS"
    destination = {key: value for key, value in s3_server.storage_options(prefix="offsite-%s" % uuid.uuid4().hex[:8]).items()
                   if key not in ("access_key", "secret_key")}
    destination.update(access_key_env="RUNNER_S3_ACCESS", secret_key_env="RUNNER_S3_SECRET")
    config = write_job(tmp_path / "cache.json", {
        "job": COPY_JOB, "kind": "redis", "source": redis_options,
        "storage": {"backend": "filesystem", "path": str(tmp_path / "store"), "format": "restic",
                    "restic_password_env": "RUNNER_RESTIC_PASSWORD"},
        "restore": {"target": dict(redis_options, db_map={3: 13})},
        "copy": {"destination": destination, "retention": {"keep_last": 1}}})
    outputs = []

    def runner(command, *extra):
        done = run(command, config, env, extra)
        outputs.append(done)
        assert done.returncode == 0, (command, extra, done.stderr)
        return json.loads(done.stdout)

    made = []
    for round_ in range(2):
        redis_db.client(3).set("round", str(round_))
        made.append(runner("backup")["manifest"]["id"])
    copied = runner("copy")
    # the destination keeps one backup (copy.retention): the older one is not copied at all
    assert [entry["id"] for entry in copied["copied"]] == [made[1]] and copied["not_wanted"] == [made[0]]
    keys = [obj["Key"] for obj in s3_server.client().list_objects_v2(
        Bucket=destination["bucket"], Prefix=destination["prefix"] + "/")["Contents"]]
    assert any("/_restic/%s/data/" % COPY_JOB in key for key in keys)
    assert any(key.endswith("/%s/%s/manifest.json" % (COPY_JOB, made[1])) for key in keys)
    listed = runner("list", "--from-copy")
    assert [m["id"] for m in listed["backups"]] == [made[1]]
    verified = runner("verify", "--from-copy")
    assert verified["results"][0]["result"] == "ok"
    redis_db.client(13).flushdb()
    restored = runner("restore", "--from-copy")
    assert restored["backup_id"] == made[1]
    assert redis_state(redis_db, 13) == redis_state(redis_db, 3)
    # a third backup copied; the destination's prune then forgets the second there
    redis_db.client(3).set("round", "2")
    made.append(runner("backup")["manifest"]["id"])
    assert [entry["id"] for entry in runner("copy")["copied"]] == [made[2]]
    assert runner("verify", "--from-copy")["results"][0]["result"] == "ok"   # the newest verified is never pruned
    pruned = runner("prune", "--destination")
    assert pruned["deleted"] == [made[1]] and pruned["restic"]["forgotten"]
    assert [m["id"] for m in runner("list", "--from-copy")["backups"]] == [made[2]]
    assert runner("verify", "--from-copy")["results"][0]["result"] == "ok"   # after the destination's restic prune
    again = runner("copy")   # the pruned backup is not copied again
    assert again["copied"] == [] and again["in_sync"] == [made[2]]
    for done in outputs:
        for value in (secret, REDIS_SECRET, s3_server.secret_key):
            assert value not in done.stdout and value not in done.stderr
