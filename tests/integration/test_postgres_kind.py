# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The postgres kind against a real PostgreSQL 15 (``postgres_server``): backup, verified
restore into a new database, swap with rollback, failures, encryption, S3, stock tools.

Equality is proven with exact row counts and a per-table content checksum (md5 over the
sorted md5 of every row's text form), computed on the live source and on the restored copy.
"""

import json
import os
import subprocess
import threading
import time
import uuid

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import verify as vf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.source import PostgresSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget

JOB = "pg-test"
PW_ROLE = "bb_pw_user"
PW_SECRET = "S3cret-" + uuid.uuid4().hex

SCHEMA_SQL = """
CREATE TABLE public.templates (
    id bigserial PRIMARY KEY, subject uuid NOT NULL, template bytea NOT NULL, quality real,
    meta jsonb, note text, captured timestamptz NOT NULL DEFAULT now());
CREATE INDEX templates_subject ON public.templates (subject);
CREATE INDEX templates_meta ON public.templates USING gin (meta);
CREATE SCHEMA "Ops";
CREATE TABLE "Ops"."audit.log" (at timestamptz, line text);
CREATE TABLE public.empty_table (x int);
CREATE TABLE public.events (id int, day date NOT NULL) PARTITION BY RANGE (day);
CREATE TABLE public.events_2023 PARTITION OF public.events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE public.events_2024 PARTITION OF public.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
"""

DATA_SQL = """
INSERT INTO public.templates (subject, template, quality, meta, note, captured)
SELECT gen_random_uuid(), decode(repeat(md5(random()::text), 8), 'hex'), random(),
       jsonb_build_object('finger', g %% 10, 'device', 'scanner-' || (g %% 3), 'tags', jsonb_build_array(g, g * 2)),
       repeat('note ' || g, 3), now() - (g || ' minutes')::interval
  FROM generate_series(1, %(rows)s) g;
INSERT INTO "Ops"."audit.log" SELECT now(), 'line ' || g FROM generate_series(1, 37) g;
INSERT INTO public.events SELECT g, DATE '2023-06-01' + g FROM generate_series(1, 400) g;
"""


# --------------------------------------------------------------------------- helpers

def fill(server, dbname, rows=500):
    with server.connect(dbname) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute(DATA_SQL % {"rows": rows})


def tables_state(server, dbname):
    """{"schema.table": (rows, content checksum)} of every user table of ``dbname``."""
    state = {}
    with server.connect(dbname) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname !~ '^pg_toast' ORDER BY 1, 2").fetchall()
        for schema, table in tables:
            ident = '"%s"."%s"' % (schema.replace('"', '""'), table.replace('"', '""'))
            rows, checksum = conn.execute(
                "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h), '')) "
                "FROM (SELECT md5(t::text) AS h FROM %s AS t) s" % ident).fetchone()
            state["%s.%s" % (schema, table)] = (rows, checksum)
    return state


def databases(server):
    return server.databases()


def source_options(server, dbname, **extra):
    return dict({"host": server.host, "port": server.port, "user": server.user, "database": dbname}, **extra)


def target_options(server, dbname, **extra):
    return dict({"host": server.host, "port": server.port, "user": server.user, "database": dbname}, **extra)


def backup(storage, options, compression=None, encryption=None, job=JOB):
    return BackupRun(job, PostgresSource(options), storage, compression=compression, encryption=encryption).run()


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


@pytest.fixture
def filled(postgres_server, postgres_database):
    fill(postgres_server, postgres_database.name)
    return postgres_database


@pytest.fixture(scope="module")
def password_role(postgres_server):
    """A login role that must authenticate with a password (scram) over TCP.

    The shared server trusts everyone; one pg_hba line placed first asks this role alone
    for a password, so other tests are not affected.
    """
    hba = os.path.join(postgres_server.data_dir, "pg_hba.conf")
    line = "host all %s 127.0.0.1/32 scram-sha-256\n" % PW_ROLE
    with open(hba, encoding="utf-8") as handle:
        text = handle.read()
    if line not in text:
        stat = os.stat(hba)
        with open(hba, "w", encoding="utf-8") as handle:
            handle.write(line + text)
        os.chown(hba, stat.st_uid, stat.st_gid)
    with postgres_server.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS %s" % PW_ROLE)
        conn.execute("CREATE ROLE %s LOGIN PASSWORD '%s'" % (PW_ROLE, PW_SECRET))
        conn.execute("SELECT pg_reload_conf()")
    return PW_ROLE


# --------------------------------------------------------------------------- backup

def test_backup_records_snapshot_row_counts_and_payloads(postgres_server, filled, storage, tmp_path):
    manifest = backup(storage, source_options(postgres_server, filled.name), compression={"algorithm": "zstd"})
    state = tables_state(postgres_server, filled.name)
    stats = manifest["stats"]
    assert stats["database"] == filled.name
    assert stats["tables"] == {name: value[0] for name, value in state.items()}
    assert stats["tables"]["public.templates"] == 500
    assert stats["tables"]["Ops.audit.log"] == 37
    assert stats["tables"]["public.empty_table"] == 0
    assert stats["tables"]["public.events"] == 400
    assert stats["tables"]["public.events_2023"] + stats["tables"]["public.events_2024"] == 400
    assert stats["table_count"] == len(state) and stats["total_rows"] == sum(value[0] for value in state.values())
    assert stats["server_version"].startswith("15.")
    assert stats["globals"] == {"included": True, "role_hashes": True}
    assert sorted(obj["payload"] for obj in manifest["objects"]) == ["database.dump", "globals.sql"]
    assert sorted(obj["name"] for obj in manifest["objects"]) == ["database.dump.zst", "globals.sql.zst"]
    assert manifest["tool_versions"]["pg_dump"].startswith("15.")
    assert manifest["source"]["database"] == filled.name

    # The stored dump is a pg_dump custom archive with the data of every table.
    stored = tmp_path / "store" / JOB / manifest["id"]
    listing = subprocess.run("zstd -dc %s | pg_restore -l" % (stored / "database.dump.zst"), shell=True,
                             check=True, capture_output=True, text=True).stdout
    for name in ("templates", "audit.log", "events_2023", "events_2024", "empty_table"):
        assert "TABLE DATA" in listing and (" %s " % name) in listing
    globals_sql = subprocess.run(["zstd", "-dc", str(stored / "globals.sql.zst")], check=True,
                                 capture_output=True, text=True).stdout
    assert "CREATE ROLE postgres" in globals_sql


def test_row_counts_describe_the_dump_under_concurrent_writes(postgres_server, filled, storage, cleanup_databases):
    """Inserts keep running during the whole backup; the recorded counts still match what
    the dump restores, because both come from the same exported snapshot."""
    stop = threading.Event()
    inserted = []

    def writer():
        with postgres_server.connect(filled.name) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO \"Ops\".\"audit.log\" SELECT now(), 'w' FROM generate_series(1, 50)")
                conn.execute("INSERT INTO public.empty_table SELECT 1")
                inserted.append(51)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while len(inserted) < 5:
            time.sleep(0.05)
        manifest = backup(storage, source_options(postgres_server, filled.name))
        while len(inserted) < 10:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    live = tables_state(postgres_server, filled.name)
    assert manifest["stats"]["tables"]["Ops.audit.log"] < live["Ops.audit.log"][0]  # writes went on after
    target = PostgresTarget(target_options(postgres_server, filled.name, restore_database=filled.name + "_c"))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])
    assert all(check["ok"] for check in report["checks"])
    restored = tables_state(postgres_server, filled.name + "_c")
    assert {name: value[0] for name, value in restored.items()} == manifest["stats"]["tables"]


def test_pg_dump_args_are_validated():
    ok = PostgresSource({"database": "x", "pg_dump_args": ["--no-owner", "--lock-wait-timeout=10s"]})
    assert ok.dump_args == ["--no-owner", "--lock-wait-timeout=10s"]
    for bad in (["--table=foo"], ["-f", "/tmp/x"], ["--exclude-table-data=big"], ["--compress=9; rm"],
                ["--host=evil"]):
        with pytest.raises(ConfigError):
            PostgresSource({"database": "x", "pg_dump_args": bad})
    with pytest.raises(ConfigError):
        PostgresSource({"database": "x", "pasword": "typo"})
    with pytest.raises(ConfigError):
        PostgresSource({})


def test_missing_database_is_a_clear_error(postgres_server, storage, tmp_path):
    source = PostgresSource(source_options(postgres_server, "no_such_db_here"))
    with pytest.raises(SourceError, match="database no_such_db_here does not exist"):
        BackupRun(JOB, source, storage).run()
    assert Catalog(storage).scan(JOB) == []


# --------------------------------------------------------------------------- credentials

def test_wrong_password_fails_clearly_without_leaking(postgres_server, filled, password_role, tmp_path, monkeypatch):
    with postgres_server.connect() as conn:
        conn.execute("GRANT pg_read_all_data TO %s" % password_role)  # a read-only backup role
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("BB_TEST_PGPASS", wrong)
    source = PostgresSource(source_options(postgres_server, filled.name, user=password_role,
                                           password_env="BB_TEST_PGPASS"))
    with pytest.raises(SourceError) as failure:
        BackupRun(JOB, source, storage).run()
    message = str(failure.value)
    assert "password authentication failed" in message and password_role in message
    assert wrong not in message
    assert Catalog(storage).scan(JOB) == []
    assert not any(path.is_file() for path in (tmp_path / "store").rglob("*"))

    # The right password from a file works; it appears in no stored byte.
    secret_file = tmp_path / "pgpass"
    secret_file.write_text(PW_SECRET + "\n")
    source = PostgresSource(source_options(postgres_server, filled.name, user=password_role,
                                           password_file=str(secret_file)))
    manifest = backup(storage, source.options, compression={"algorithm": "none"})
    assert manifest["stats"]["tables"]["public.templates"] == 500
    # Not a superuser: the globals come without role password hashes.
    assert manifest["stats"]["globals"] == {"included": True, "role_hashes": False}
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            assert PW_SECRET.encode() not in path.read_bytes(), path
    assert PW_SECRET not in json.dumps(manifest)


# --------------------------------------------------------------------------- restore

def test_restore_into_new_database_equal_and_original_untouched(postgres_server, filled, storage, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    before = tables_state(postgres_server, filled.name)
    target = PostgresTarget(target_options(postgres_server, filled.name))
    target.preflight(manifest)
    report = rs.restore(storage, JOB, target, backup=manifest["id"])
    new = report["restore"]["database"]
    assert new == "%s_restore_%s" % (filled.name, manifest["id"].lower().replace("-", "_"))
    assert report["restore"]["swapped"] is False
    assert report["checks"][0] == {"what": "tables", "expected": len(before), "actual": len(before), "ok": True}
    assert all(check["ok"] for check in report["checks"])
    assert tables_state(postgres_server, new) == before
    assert tables_state(postgres_server, filled.name) == before
    # The same restore again refuses to overwrite the database it made.
    with pytest.raises(ConfigError, match="already exists"):
        rs.restore(storage, JOB, PostgresTarget(target_options(postgres_server, filled.name)), backup=manifest["id"])


def test_swap_keeps_old_database_and_rolls_back(postgres_server, filled, storage, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    backed_up = tables_state(postgres_server, filled.name)
    with postgres_server.connect(filled.name) as conn:
        conn.execute("DELETE FROM public.templates WHERE id % 2 = 0")
        conn.execute("INSERT INTO public.empty_table VALUES (42)")
    changed = tables_state(postgres_server, filled.name)
    assert changed != backed_up

    app = postgres_server.connect(filled.name)  # a client connected to the live database
    target = PostgresTarget(target_options(postgres_server, filled.name, swap=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])["restore"]
    assert report["swapped"] is True and report["database"] == filled.name
    kept = report["kept_database"]
    assert kept.startswith(filled.name + "_pre_restore_")
    assert tables_state(postgres_server, filled.name) == backed_up
    assert tables_state(postgres_server, kept) == changed
    assert report["restored_into"] not in databases(postgres_server)
    with pytest.raises(Exception):  # its session was terminated for the rename
        app.execute("SELECT 1")
    app.close()
    assert target.kept_databases() == [kept]

    rolled = target.rollback(kept)
    assert rolled["database"] == filled.name
    assert tables_state(postgres_server, filled.name) == changed
    assert tables_state(postgres_server, rolled["set_aside"]) == backed_up
    assert kept not in databases(postgres_server)
    with pytest.raises(ConfigError):
        target.drop_kept(filled.name)  # only databases a swap kept may be dropped this way


def test_swap_with_drop_old(postgres_server, filled, storage, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    state = tables_state(postgres_server, filled.name)
    with postgres_server.connect(filled.name) as conn:
        conn.execute("TRUNCATE public.templates")
    before = databases(postgres_server)
    target = PostgresTarget(target_options(postgres_server, filled.name, swap=True, drop_old=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])["restore"]
    assert report["dropped_old"] is True and report["kept_database"] is None
    assert databases(postgres_server) == before
    assert tables_state(postgres_server, filled.name) == state


def test_swap_into_missing_database_just_renames(postgres_server, filled, storage, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    name = "fresh_" + uuid.uuid4().hex[:8]
    target = PostgresTarget(target_options(postgres_server, name, swap=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])["restore"]
    assert report["database"] == name and report["kept_database"] is None
    assert tables_state(postgres_server, name) == tables_state(postgres_server, filled.name)


def test_check_mode_writes_nothing(postgres_server, filled, storage, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    before = databases(postgres_server)
    target = PostgresTarget(target_options(postgres_server, filled.name, swap=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"], check_mode=True)
    assert report["changed"] is False and report["restore"]["check_mode"] is True
    assert databases(postgres_server) == before
    plan = target.restore(rs.restore_context(storage, manifest, [manifest], {}, check_mode=True))
    # The engine's check mode carries the target's own plan.
    assert report["restore"]["would_create"] == plan["would_create"]
    assert plan["would_create"] == "%s_restore_%s" % (filled.name, manifest["id"].lower().replace("-", "_"))
    assert plan["would_rename"][0]["from"] == filled.name
    assert plan["would_rename"][0]["to"].startswith(filled.name + "_pre_restore_")
    assert plan["would_rename"][1] == {"from": plan["would_create"], "to": filled.name}
    assert databases(postgres_server) == before


# --------------------------------------------------------------------------- failures

def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_backup_is_refused_before_the_target_is_touched(
        postgres_server, filled, storage, tmp_path, damage, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name), compression={"algorithm": "zstd"})
    dump = tmp_path / "store" / JOB / manifest["id"] / "database.dump.zst"
    if damage == "flip":
        _flip_byte(dump, os.path.getsize(dump) // 2)
    else:
        dump.write_bytes(dump.read_bytes()[: os.path.getsize(dump) - 100])
    before_dbs = databases(postgres_server)
    before = tables_state(postgres_server, filled.name)
    target = PostgresTarget(target_options(postgres_server, filled.name, swap=True))
    with pytest.raises(IntegrityError, match="database.dump.zst"):
        rs.restore(storage, JOB, target, backup=manifest["id"])
    assert databases(postgres_server) == before_dbs
    assert tables_state(postgres_server, filled.name) == before


def test_failed_row_check_drops_the_new_database(postgres_server, filled, storage, tmp_path, cleanup_databases):
    """A manifest whose stats disagree with its (intact) dump: the restore is built, the
    check fails, the half-way database is dropped and the live one keeps its name and data."""
    manifest = backup(storage, source_options(postgres_server, filled.name))
    path = tmp_path / "store" / JOB / manifest["id"] / mf.MANIFEST_NAME
    edited = json.loads(path.read_text())
    edited["stats"]["tables"]["public.templates"] += 1
    path.write_bytes(mf.dumps(edited))
    (tmp_path / "store" / JOB / "index.json").unlink()
    before_dbs = databases(postgres_server)
    before = tables_state(postgres_server, filled.name)
    target = PostgresTarget(target_options(postgres_server, filled.name, swap=True))
    with pytest.raises(IntegrityError, match="public.templates expected 501 rows, found 500"):
        rs.restore(storage, JOB, target, backup=manifest["id"])
    assert databases(postgres_server) == before_dbs
    assert tables_state(postgres_server, filled.name) == before


def test_failing_pg_restore_drops_the_new_database(postgres_server, postgres_database, storage, cleanup_databases):
    """Objects owned by a role that is gone by restore time: pg_restore stops with an error."""
    role = "bb_owner_" + uuid.uuid4().hex[:8]
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE ROLE %s" % role)
        conn.execute("CREATE TABLE owned (x int)")
        conn.execute("INSERT INTO owned VALUES (1), (2)")
        conn.execute("ALTER TABLE owned OWNER TO %s" % role)
    manifest = backup(storage, source_options(postgres_server, postgres_database.name, include_globals=False))
    assert [obj["payload"] for obj in manifest["objects"]] == ["database.dump"]
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("REASSIGN OWNED BY %s TO postgres" % role)
        conn.execute("DROP ROLE %s" % role)
    before_dbs = databases(postgres_server)
    target = PostgresTarget(target_options(postgres_server, postgres_database.name, swap=True))
    with pytest.raises(SourceError, match="pg_restore failed.*%s" % role):
        rs.restore(storage, JOB, target, backup=manifest["id"])
    assert databases(postgres_server) == before_dbs
    # With no_owner the same backup restores.
    target = PostgresTarget(target_options(postgres_server, postgres_database.name, no_owner=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])
    assert report["checks"][-1] == {"what": "rows public.owned", "expected": 2, "actual": 2, "ok": True}


# --------------------------------------------------------------------------- encryption, S3, stock tools

def test_encrypted_zstd_backup_restores_with_stock_tools(postgres_server, filled, storage, tmp_path,
                                                         cleanup_databases):
    identity = x25519.Identity.generate()
    key_file = tmp_path / "age.key"
    key_file.write_text(str(identity) + "\n")
    manifest = backup(storage, source_options(postgres_server, filled.name),
                      compression={"algorithm": "zstd", "level": 3},
                      encryption={"recipients": [str(identity.to_public())]})
    assert manifest["encryption"] == {"mode": "age", "recipients": [str(identity.to_public())]}
    assert sorted(o["name"] for o in manifest["objects"]) == ["database.dump.zst.age", "globals.sql.zst.age"]
    stored = tmp_path / "store" / JOB / manifest["id"] / "database.dump.zst.age"
    assert b"templates" not in stored.read_bytes()

    # Exactly the disaster-recovery commands: age, zstd, pg_restore.
    listing = subprocess.run("age -d -i %s %s | zstd -d | pg_restore -l" % (key_file, stored), shell=True,
                             check=True, capture_output=True, text=True).stdout
    assert "TABLE DATA public templates" in listing
    assert 'TABLE DATA Ops audit.log' in listing
    dr_db = postgres_server.create_database("dr")
    env = dict(os.environ, **postgres_server.env())
    subprocess.run("set -o pipefail; age -d -i %s %s | zstd -d | pg_restore --exit-on-error -d %s"
                   % (key_file, stored, dr_db.name), shell=True, check=True, executable="/bin/bash", env=env)
    source_state = tables_state(postgres_server, filled.name)
    assert tables_state(postgres_server, dr_db.name) == source_state

    # And the engine's verified restore with the identity.
    target = PostgresTarget(target_options(postgres_server, filled.name))
    report = rs.restore(storage, JOB, target, backup=manifest["id"], identity=str(identity))
    assert tables_state(postgres_server, report["restore"]["database"]) == source_state
    wrong = x25519.Identity.generate()
    before_dbs = databases(postgres_server)
    with pytest.raises(IntegrityError, match="wrong key"):
        rs.restore(storage, JOB, PostgresTarget(target_options(postgres_server, filled.name, restore_database="x_wrong")),
                   backup=manifest["id"], identity=str(wrong))
    assert databases(postgres_server) == before_dbs


def test_s3_backup_restore_and_scratch_verification(postgres_server, filled, s3_server, cleanup_databases):
    storage = open_storage(s3_server.storage_options())
    manifest = backup(storage, source_options(postgres_server, filled.name), compression={"algorithm": "zstd"})
    state = tables_state(postgres_server, filled.name)
    before_dbs = databases(postgres_server)
    result = vf.verify(storage, JOB, backup=manifest["id"], test_restore=True, target_class=PostgresTarget,
                       scratch_options=target_options(postgres_server, filled.name))
    assert result["ok"] is True, result
    checks = result["results"][0]["checks"]
    assert {"what": "rows public.templates", "expected": 500, "actual": 500, "ok": True} in checks
    assert databases(postgres_server) == before_dbs  # the scratch database is gone
    assert Catalog(storage).get(JOB, manifest["id"])["verification"]["result"] == "ok"

    target = PostgresTarget(target_options(postgres_server, filled.name, restore_database=filled.name + "_s3"))
    report = rs.restore(storage, JOB, target, backup="latest")
    assert report["backup_id"] == manifest["id"]
    assert tables_state(postgres_server, filled.name + "_s3") == state


def test_restore_globals_recreates_roles(postgres_server, postgres_database, storage, cleanup_databases):
    role = "bb_glob_" + uuid.uuid4().hex[:8]
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE ROLE %s LOGIN CONNECTION LIMIT 7" % role)
        conn.execute("CREATE TABLE owned (x int)")
        conn.execute("ALTER TABLE owned OWNER TO %s" % role)
    manifest = backup(storage, source_options(postgres_server, postgres_database.name))
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("REASSIGN OWNED BY %s TO postgres" % role)
        conn.execute("DROP ROLE %s" % role)
    target = PostgresTarget(target_options(postgres_server, postgres_database.name, restore_globals=True))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])["restore"]
    assert any("already exists" in line for line in report["globals_messages"])  # role postgres
    with postgres_server.connect(report["database"]) as conn:
        assert conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (7,)
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'owned'").fetchone() == (role,)
    with postgres_server.connect() as conn:
        conn.execute("DROP DATABASE %s WITH (FORCE)" % report["database"])
        conn.execute("DROP ROLE %s" % role)
