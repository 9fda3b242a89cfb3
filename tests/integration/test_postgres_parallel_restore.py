# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Parallel restore of the postgres target (``jobs`` > 1) against a real PostgreSQL 15.

With ``jobs: 2`` the verified dump is spooled to a private file under ``scratch_dir`` and
``pg_restore --jobs 2`` reads it. Proven here: the restored database equals the live one
(row counts and per-table content checksums); the spool is 0600 and nameless while it exists
and is gone after a success, a damaged dump, a failing ``pg_restore``, a refused start and a
SIGKILL; a scratch file
system without room for the dump is refused before any database is created.
"""

import os
import signal
import stat
import subprocess
import sys
import uuid

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.source import DUMP_PAYLOAD
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres import target as pg_target
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget

from .test_postgres_kind import JOB, backup, databases, fill, source_options, tables_state, target_options


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


@pytest.fixture
def filled(postgres_server, postgres_database):
    fill(postgres_server, postgres_database.name, rows=3000)
    return postgres_database


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return path


class SpoolWatchingTarget(PostgresTarget):
    """The real target; records the spool file's mode, size, links and file system, and what
    the scratch directory lists, just before pg_restore reads it."""

    seen = None

    def _pg_restore_file(self, spool, new, context=None):
        info = os.fstat(spool.fileno())
        self.seen = {"mode": stat.S_IMODE(info.st_mode), "size": info.st_size, "links": info.st_nlink,
                     "device": info.st_dev, "scratch_lists": os.listdir(self.scratch_dir)}
        return super()._pg_restore_file(spool, new, context)


def dump_raw_bytes(manifest):
    return next(obj["raw_bytes"] for obj in manifest["objects"] if obj.get("payload") == DUMP_PAYLOAD)


def test_jobs_2_restore_equals_the_live_database_and_leaves_no_spool(
        postgres_server, filled, storage, scratch, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name), compression={"algorithm": "zstd"})
    before = tables_state(postgres_server, filled.name)
    target = SpoolWatchingTarget(target_options(postgres_server, filled.name, jobs=2, scratch_dir=str(scratch)))
    report = rs.restore(storage, JOB, target, backup=manifest["id"])
    result = report["restore"]
    assert result["jobs"] == 2
    assert result["scratch_bytes"] == dump_raw_bytes(manifest) == target.seen["size"]
    assert result["restore_bytes"] == result["scratch_bytes"]
    # On the scratch file system, private, and without a name even while pg_restore reads it.
    assert target.seen["device"] == os.stat(scratch).st_dev
    assert target.seen["mode"] == 0o600
    assert (target.seen["links"], target.seen["scratch_lists"]) == (0, [])
    assert all(check["ok"] for check in report["checks"])
    assert tables_state(postgres_server, result["database"]) == before
    assert tables_state(postgres_server, filled.name) == before
    assert os.listdir(scratch) == []
    assert report["target"]["jobs"] == 2
    assert report["verification"]["mode"] == "one-pass"   # the dump is checked by the spool's stream


KILLED_RESTORE = """
import os, signal, sys
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget

class KilledTarget(PostgresTarget):
    def _pg_restore_file(self, spool, new, context=None):
        os.kill(os.getpid(), signal.SIGKILL)   # as a node kills the runner: no cleanup runs

store, job, backup_id, options = sys.argv[1], sys.argv[2], sys.argv[3], eval(sys.argv[4])
rs.restore(open_storage({"backend": "filesystem", "path": store}), job, KilledTarget(options), backup=backup_id)
"""


def test_a_killed_restore_leaves_no_decrypted_spool(
        postgres_server, filled, storage, tmp_path, scratch, cleanup_databases):
    """Review finding: a SIGKILLed runner left the whole decrypted dump in scratch_dir."""
    manifest = backup(storage, source_options(postgres_server, filled.name))
    options = target_options(postgres_server, filled.name, jobs=2, scratch_dir=str(scratch))
    killed = subprocess.run([sys.executable, "-c", KILLED_RESTORE, str(tmp_path / "store"), JOB, manifest["id"],
                             repr(options)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_counts_the_tables_pg_restore_loaded(postgres_server, filled, storage, scratch, cleanup_databases,
                                                      jobs):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    # Every table with data of its own (a partitioned parent has none): what pg_restore loads.
    with postgres_server.connect(filled.name) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                              "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                              "AND n.nspname !~ '^pg_toast'").fetchone()[0]
    assert tables >= 2
    reports = []
    rs.restore(storage, JOB, PostgresTarget(target_options(postgres_server, filled.name, jobs=jobs,
                                                           scratch_dir=str(scratch))),
               backup=manifest["id"], progress=lambda *args, **kwargs: reports.append((args, kwargs)),
               progress_interval=0)
    counted = [kwargs["items"]["tables"] for args, kwargs in reports if "items" in kwargs]
    loaded = [done for done, total in counted]   # bytes reports repeat the count: non-decreasing
    assert loaded == sorted(loaded) and sorted(set(loaded)) == list(range(1, tables + 1)), reports[-3:]
    assert {total for done, total in counted} == {None}


def test_jobs_1_streams_without_a_spool(postgres_server, filled, storage, scratch, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    target = SpoolWatchingTarget(target_options(postgres_server, filled.name, jobs=1, scratch_dir=str(scratch)))
    result = rs.restore(storage, JOB, target, backup=manifest["id"])["restore"]
    assert (result["jobs"], result["scratch_bytes"], target.seen) == (1, 0, None)
    assert tables_state(postgres_server, result["database"]) == tables_state(postgres_server, filled.name)


def test_too_small_scratch_is_refused_before_anything_is_created(
        postgres_server, filled, storage, scratch, cleanup_databases, monkeypatch):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    raw = dump_raw_bytes(manifest)
    needed = pg_target.spool_needed_bytes(raw)
    asked = []

    def free_bytes(path):
        asked.append(path)
        return needed - 1   # one byte short of the dump plus the margin

    monkeypatch.setattr(pg_target, "scratch_free_bytes", free_bytes)
    before_dbs = databases(postgres_server)
    target = PostgresTarget(target_options(postgres_server, filled.name, jobs=2, scratch_dir=str(scratch), swap=True))
    with pytest.raises(ConfigError, match=r"jobs: 2 spools .* to %s, which has .* free; it needs .*jobs: 1"
                       % str(scratch)):
        rs.restore(storage, JOB, target, backup=manifest["id"])
    assert asked and set(asked) == {str(scratch)}
    assert databases(postgres_server) == before_dbs
    assert os.listdir(scratch) == []
    # The restore step itself refuses too (a caller that skipped preflight), before CREATE DATABASE.
    context = rs.restore_context(storage, manifest, [manifest], {})
    with pytest.raises(ConfigError, match="it needs"):
        target.restore(context)
    assert databases(postgres_server) == before_dbs
    # Check mode says so as well, and with room the plan names the spool's size.
    with pytest.raises(ConfigError, match="it needs"):
        rs.restore(storage, JOB, target, backup=manifest["id"], check_mode=True)
    monkeypatch.setattr(pg_target, "scratch_free_bytes", lambda path: needed)
    plan = rs.restore(storage, JOB, target, backup=manifest["id"], check_mode=True)["restore"]
    assert (plan["jobs"], plan["scratch_bytes"]) == (2, raw)
    assert databases(postgres_server) == before_dbs


def test_damaged_dump_fails_in_the_spool_before_any_database_exists(
        postgres_server, filled, storage, tmp_path, scratch, cleanup_databases):
    """The target's own check at the end of the spool (the one-pass path hands it unverified
    streams): a flipped byte is caught before CREATE DATABASE, and the spool is removed."""
    manifest = backup(storage, source_options(postgres_server, filled.name))
    name = next(obj["name"] for obj in manifest["objects"] if obj.get("payload") == DUMP_PAYLOAD)
    dump = tmp_path / "store" / JOB / manifest["id"] / name
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    before_dbs = databases(postgres_server)
    target = SpoolWatchingTarget(target_options(postgres_server, filled.name, jobs=2, scratch_dir=str(scratch)))
    context = rs.restore_context(storage, manifest, [manifest], {})  # no verification pass before
    with pytest.raises(IntegrityError, match="database.dump"):
        target.restore(context)
    assert target.seen is None  # pg_restore never started
    assert databases(postgres_server) == before_dbs
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_one_pass_restore_of_a_damaged_dump_changes_nothing(
        postgres_server, filled, storage, tmp_path, scratch, cleanup_databases, jobs):
    """Through the engine (one pass: the dump is not read before the target runs): a byte
    flipped near the end of the stored dump fails the restore, no database is left, the live
    one is unchanged and the scratch directory is empty."""
    manifest = backup(storage, source_options(postgres_server, filled.name), compression={"algorithm": "zstd"})
    name = next(obj["name"] for obj in manifest["objects"] if obj.get("payload") == DUMP_PAYLOAD)
    dump = tmp_path / "store" / JOB / manifest["id"] / name
    data = bytearray(dump.read_bytes())
    data[len(data) * 9 // 10] ^= 0x01
    dump.write_bytes(bytes(data))
    before_dbs = databases(postgres_server)
    before = tables_state(postgres_server, filled.name)
    target = PostgresTarget(target_options(postgres_server, filled.name, jobs=jobs, scratch_dir=str(scratch),
                                           swap=True))
    with pytest.raises(IntegrityError, match=name):
        rs.restore(storage, JOB, target, backup=manifest["id"])
    assert databases(postgres_server) == before_dbs
    assert tables_state(postgres_server, filled.name) == before
    assert os.listdir(scratch) == []


def test_failing_pg_restore_drops_the_new_database_and_the_spool(
        postgres_server, postgres_database, storage, scratch, cleanup_databases):
    role = "bb_owner_" + uuid.uuid4().hex[:8]
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE ROLE %s" % role)
        conn.execute("CREATE TABLE owned (x int)")
        conn.execute("INSERT INTO owned VALUES (1), (2)")
        conn.execute("ALTER TABLE owned OWNER TO %s" % role)
    manifest = backup(storage, source_options(postgres_server, postgres_database.name, include_globals=False))
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("REASSIGN OWNED BY %s TO postgres" % role)
        conn.execute("DROP ROLE %s" % role)
    before_dbs = databases(postgres_server)
    target = SpoolWatchingTarget(target_options(postgres_server, postgres_database.name, jobs=2,
                                                scratch_dir=str(scratch), swap=True))
    with pytest.raises(SourceError, match="pg_restore failed.*%s" % role) as failed:
        rs.restore(storage, JOB, target, backup=manifest["id"])
    # --verbose (the table progress) adds no chatter to the message: the error and its context only.
    assert "processing data" not in str(failed.value) and "creating " not in str(failed.value)
    assert target.seen is not None   # it failed in pg_restore, after the spool was written
    assert databases(postgres_server) == before_dbs
    assert os.listdir(scratch) == []


def test_missing_scratch_dir_is_a_clear_error(postgres_server, filled, storage, tmp_path, cleanup_databases):
    manifest = backup(storage, source_options(postgres_server, filled.name))
    before_dbs = databases(postgres_server)
    target = PostgresTarget(target_options(postgres_server, filled.name, jobs=2,
                                           scratch_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="scratch_dir .*nowhere is not a directory"):
        rs.restore(storage, JOB, target, backup=manifest["id"])
    assert databases(postgres_server) == before_dbs


@pytest.mark.parametrize("value, expected", [(None, 1), (1, 1), (2, 2), ("3", 3), (" auto ", None)])
def test_jobs_values(value, expected):
    target = PostgresTarget({"database": "db", "jobs": value})
    if expected is None:
        expected = min(pg_target.usable_cores(), pg_target.AUTO_JOBS_MAX)
    assert target.jobs == expected and target.describe()["jobs"] == expected


@pytest.mark.parametrize("value", [0, -1, 65, True, 2.5, "two", "", [2]])
def test_bad_jobs_values_are_refused(value):
    with pytest.raises(ConfigError, match="target.jobs must be an integer from 1 to 64 or 'auto'"):
        PostgresTarget({"database": "db", "jobs": value})


def test_one_pass_declares_the_dump_only_when_nothing_changes_before_it_is_checked():
    manifest = {"id": "20260101T000000Z-abcd", "objects": []}
    for options in ({}, {"restore_globals": True, "jobs": 2}):
        target = PostgresTarget(dict(options, database="db"))
        assert target.one_pass_payloads(manifest, [manifest]) == {(manifest["id"], DUMP_PAYLOAD)}, options
    # One job with the globals: they are applied to the live server before the dump stream is
    # read, so the restore takes two passes (review finding: roles reset by a damaged backup).
    target = PostgresTarget({"database": "db", "restore_globals": True})
    assert target.one_pass_payloads(manifest, [manifest]) is None


def test_a_point_in_time_restore_refuses_jobs_before_anything(tmp_path):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "never-read")})
    with pytest.raises(ConfigError, match="leave jobs at 1"):
        pitr.restore_point_in_time(storage, "db", None, target=PostgresTarget({"database": "db", "jobs": 2}),
                                   database="db")
    assert not os.path.exists(tmp_path / "never-read")
