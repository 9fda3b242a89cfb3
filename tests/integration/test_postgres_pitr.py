# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time recovery against a real PostgreSQL 15 (wal_level=replica): the WAL stream
(pg_receivewal + slot) stores segments and partial copies through the pipeline, a base
backup (pg_basebackup, tar, no WAL) is stored as kind postgres_base, and the restore picks
the base backup, verifies every object first, recovers a private server to a time between
two batches of inserts, and copies the database into a new one on the server.

Each test gets its own PostgreSQL (its WAL and slots must not be shared).
"""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, NotFoundError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import prune
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.connection import PgConnection
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.wal import PostgresBaseSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.walstream import WalGapError, WalStreamer, WalState

from servers import server_dir, start_postgres

JOB = "pitr-test"
WAL_JOB = "pitr-test-wal"
DB = "enrol"


@pytest.fixture
def pg():
    with server_dir("pitr") as base:
        server = start_postgres(base)
        try:
            with server.connect() as conn:
                conn.execute("CREATE DATABASE %s" % DB)
            with server.connect(DB) as conn:
                conn.execute("CREATE TABLE enrolments (id serial PRIMARY KEY, batch int NOT NULL, "
                             "payload text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")
            yield server
        finally:
            server.process.stop()


@pytest.fixture
def scratch():
    """A scratch directory the private PostgreSQL's account can reach (tests run as root)."""
    path = tempfile.mkdtemp(prefix="bb-pitr-scratch-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _options(server, **extra):
    return dict({"host": server.host, "port": server.port, "user": "postgres", "bin_dir": server.bin_dir}, **extra)


def _insert(server, batch, rows=50):
    """Insert one committed batch; returns the server time just after the commit.

    The test server runs with synchronous_commit=off (tests/servers.py), where a commit returns
    before its WAL is written: the WAL writer writes it within wal_writer_delay, later when the
    machine is loaded. ``_lsn`` (pg_current_wal_lsn, the write position) could then point before
    this commit, a stream run up to it would stop without the commit, and a target between the
    batches would find no commit after it in the stored WAL (``target_reached`` false). The
    batch commits synchronously, so its commit record is written when this returns."""
    with server.connect(DB) as conn:
        conn.execute("SET synchronous_commit = on")
        conn.execute("INSERT INTO enrolments (batch, payload) SELECT %s, repeat(md5(g::text), 20) "
                     "FROM generate_series(1, %s) g", (batch, rows))
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def _lsn(server, switch=False):
    with server.connect() as conn:
        if switch:
            conn.execute("SELECT pg_switch_wal()")
        return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def _streamer(server, storage, spool, encryption=None, slot="pitr_slot"):
    return WalStreamer(PgConnection(_options(server), "source"), storage, WAL_JOB, str(spool), slot=slot,
                       encryption=encryption, partial_interval=0.5)


def _base_backup(server, storage, encryption=None):
    source = PostgresBaseSource(_options(server, wal_job=WAL_JOB))
    return BackupRun(JOB, source, storage, encryption=encryption).run()


def _target(server, name):
    return PostgresTarget(_options(server, database=DB, restore_database=name))


def _batches(server, database):
    with server.connect(database) as conn:
        return dict(conn.execute("SELECT batch, count(*) FROM enrolments GROUP BY batch ORDER BY batch").fetchall())


def test_point_in_time_restore_between_batches(pg, tmp_path, scratch, monkeypatch):
    """Stream, base backup, batches around a segment switch and a stream restart; restore between them."""
    key = x25519.Identity.generate()
    encryption = {"recipients": [str(key.to_public())]}
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    spool = tmp_path / "spool"
    streamer = _streamer(pg, storage, spool, encryption)
    streamer.prepare()
    _insert(pg, 0)  # before the base backup
    base = _base_backup(pg, storage, encryption)
    stats = base["stats"]
    assert base["kind"] == "postgres_base" and stats["timeline"] == 1 and stats["wal_job"] == WAL_JOB
    assert stats["wal_start"] <= stats["wal_end"] and stats["start_lsn"] and stats["end_lsn"]
    marks = {}
    for batch in (1, 2):
        time.sleep(0.3)
        marks[batch] = _insert(pg, batch)
    _lsn(pg, switch=True)  # batch 3 lands in a new segment
    time.sleep(0.3)
    marks[3] = _insert(pg, 3)
    first = streamer.run(end_lsn=_lsn(pg))
    assert first["segments_stored"] >= 2 and first["gaps"] == []
    # A restart of the stream (new streamer, same spool and slot) continues without a gap.
    time.sleep(0.3)
    marks[4] = _insert(pg, 4)
    second = _streamer(pg, storage, spool, encryption).run(end_lsn=_lsn(pg))
    assert second["gaps"] == [] and second["partials_stored"] >= 1
    state = WalState.load(storage, WAL_JOB)
    assert len(state.partials) == 1, "superseded partial copies are deleted"

    def restore_at(moment, name):
        return pitr.restore_point_in_time(storage, JOB, moment.isoformat(), identity=str(key),
                                          target=_target(pg, name), database=DB, bin_dir=pg.bin_dir,
                                          scratch_dir=scratch)

    # Between batch 1 and 2: the base's batch 0 and batch 1 only.
    middle = marks[1] + (marks[2] - marks[1]) / 2
    report = restore_at(middle, "enrol_b1")
    assert _batches(pg, "enrol_b1") == {0: 50, 1: 50}, (report["recovered_to"], report["plan"], report.get("target_reached"), marks)
    assert report["target_reached"] is True and report["recovered_to"]["lsn"]
    assert report["plan"]["base_backup"] == base["id"]
    assert all(check["ok"] for check in report["target"]["checks"])
    # Between 3 and 4: across the segment switch, and 4 lives in the partial copy.
    report = restore_at(marks[3] + (marks[4] - marks[3]) / 2, "enrol_b3")
    assert _batches(pg, "enrol_b3") == {0: 50, 1: 50, 2: 50, 3: 50}
    # Latest: batch 4, read from the partial copy of the segment in progress.
    report = pitr.restore_point_in_time(storage, JOB, "latest", identity=str(key), target=_target(pg, "enrol_all"),
                                        database=DB, bin_dir=pg.bin_dir, scratch_dir=scratch)
    assert _batches(pg, "enrol_all") == {0: 50, 1: 50, 2: 50, 3: 50, 4: 50}
    assert report["plan"]["wal_partial"] is True
    # Under a deep scratch directory (a volume's path) <scratch>/pitr-XXXXXXXX/sock/.s.PGSQL.<port>
    # is longer than a unix socket address holds: the private server listens in a short
    # directory of its own under the temp directory, removed with it.
    deep = os.path.join(scratch, "d" * (100 - len(scratch) - 1))
    os.mkdir(deep, 0o711)
    private_tmp = tempfile.mkdtemp(prefix="bb-pitr-tmp-")  # like /tmp, the server's account can reach it
    os.chmod(private_tmp, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", private_tmp)
    report = pitr.restore_point_in_time(storage, JOB, marks[1].isoformat(), identity=str(key),
                                        target=_target(pg, "enrol_deep"), database=DB, bin_dir=pg.bin_dir,
                                        scratch_dir=deep)
    assert _batches(pg, "enrol_deep") == {0: 50, 1: 50} and report["target_reached"] is True
    assert os.listdir(deep) == [] and os.listdir(private_tmp) == []
    # A temp directory the server's account cannot enter: refused by name, nothing created.
    os.chmod(private_tmp, 0o700)
    with pytest.raises(ConfigError, match="temp directory .* cannot enter .*set TMPDIR"):
        pitr.restore_point_in_time(storage, JOB, marks[1].isoformat(), identity=str(key),
                                   target=_target(pg, "enrol_unreachable"), database=DB, bin_dir=pg.bin_dir,
                                   scratch_dir=deep)
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'enrol_unreachable'").fetchone()[0] == 0
    assert os.listdir(deep) == [] and os.listdir(private_tmp) == []
    os.rmdir(deep)
    os.rmdir(private_tmp)
    monkeypatch.undo()
    # A full-cluster restore leaves the recovered (promoted, stopped) data directory at a path.
    data_dir = os.path.join(scratch, "recovered")
    report = pitr.restore_point_in_time(storage, JOB, marks[2].isoformat(), identity=str(key), data_dir=data_dir,
                                        bin_dir=pg.bin_dir, scratch_dir=scratch)
    assert report["data_dir"] == data_dir and report["target_reached"] is True
    assert os.path.isfile(os.path.join(data_dir, "PG_VERSION"))
    assert not os.path.exists(os.path.join(data_dir, "recovery.signal")), "recovery finished and promoted"
    assert sorted(os.listdir(scratch)) == ["recovered"], "nothing else is left behind"
    # The live database is untouched.
    assert _batches(pg, DB) == {0: 50, 1: 50, 2: 50, 3: 50, 4: 50}


def test_missing_or_corrupt_segment_fails_before_touching_anything(pg, tmp_path, scratch):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    spool = tmp_path / "spool"
    streamer = _streamer(pg, storage, spool)
    streamer.prepare()
    _base_backup(pg, storage)
    for batch in (1, 2, 3):
        _insert(pg, batch)
        _lsn(pg, switch=True)
    time.sleep(0.2)
    late = _insert(pg, 4)
    streamer.run(end_lsn=_lsn(pg))
    state = WalState.load(storage, WAL_JOB)
    names = sorted(state.segments)
    assert len(names) >= 3
    victim = state.segments[names[1]]

    def attempt(name):
        with pytest.raises(IntegrityError) as info:
            pitr.restore_point_in_time(storage, JOB, late.isoformat(), target=_target(pg, name), database=DB,
                                       bin_dir=pg.bin_dir, scratch_dir=scratch)
        with pg.connect() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 0
        assert os.listdir(scratch) == [], "the scratch directory is removed"
        return str(info.value)

    # One flipped byte in the stored object: verification names the segment.
    obj = next(o for o in victim["objects"] if o.get("payload"))
    path = tmp_path / "store" / victim["job"] / victim["id"] / obj["name"]
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert names[1] in attempt("enrol_corrupt")
    path.write_bytes(original)
    # The segment deleted: the plan refuses, naming it, before reading anything.
    Catalog(storage).delete_backup(victim)
    message = attempt("enrol_missing")
    assert names[1] in message and "missing" in message


def test_lost_slot_is_reported_as_a_gap(pg, tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    spool = tmp_path / "spool"
    streamer = _streamer(pg, storage, spool, slot="gap_slot")
    streamer.prepare()
    _insert(pg, 1)
    _lsn(pg, switch=True)
    _insert(pg, 2)
    streamer.run(end_lsn=_lsn(pg))
    assert WalState.load(storage, WAL_JOB).segments
    # The slot is dropped and the spool lost while the server moves on by several segments.
    with pg.connect() as conn:
        conn.execute("SELECT pg_drop_replication_slot('gap_slot')")
    shutil.rmtree(spool)
    for batch in (3, 4, 5):
        _insert(pg, batch)
        _lsn(pg, switch=True)
    with pg.connect() as conn:
        conn.execute("CHECKPOINT")  # the new slot's restart point (the redo pointer) moves past the stored WAL
    with pytest.raises(WalGapError) as info:
        _streamer(pg, storage, spool, slot="gap_slot").prepare()
    assert "never stored" in str(info.value)
    assert info.value.result["gaps"][0]["missing_from"]


def test_base_backup_records_wal_range(pg, tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    manifest = _base_backup(pg, storage)
    stats = manifest["stats"]
    assert stats["segment_size"] == 16 << 20
    assert stats["wal_start"].startswith("00000001") and len(stats["wal_end"]) == 24
    assert manifest["objects"][0]["payload"] == "base.tar" and manifest["raw_bytes"] > 1 << 20
    # Without stored WAL the restore plan refuses.
    with pytest.raises(Exception) as info:
        pitr.plan_restore(storage, JOB, "latest")
    assert "no WAL" in str(info.value)


RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runner_argv(config, *argv):
    return [sys.executable, "-m", RUNNER] + list(argv) + ["--config", str(config)]


def _runner_env():
    return dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))


def test_runner_commands(pg, tmp_path, scratch):
    """backup (base), wal-stream, restore --point-in-time and wal-fetch as the runner CLI runs them."""
    key = x25519.Identity.generate()
    (tmp_path / "identity").write_text(str(key) + "\n")
    job = {"job": JOB, "kind": "postgres_base",
           "source": _options(pg, wal_job=WAL_JOB, slot="runner_slot", spool_dir=str(tmp_path / "spool"),
                              partial_interval=0.5),
           "storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
           "copy": {"destination": {"backend": "filesystem", "path": str(tmp_path / "offsite")}},
           "encryption": {"recipients": [str(key.to_public())], "identity_file": str(tmp_path / "identity")},
           "restore": {"target": _options(pg, database=DB, restore_database="enrol_cli", scratch_dir=scratch)}}
    config = tmp_path / "job.yml"
    config.write_text(yaml.safe_dump(job))

    def run(*argv):
        done = subprocess.run(_runner_argv(config, *argv), capture_output=True, text=True, env=_runner_env(),
                              timeout=600, check=False, cwd="/")
        return done.returncode, done.stdout, done.stderr

    code, out, err = run("wal-stream", "--duration", "1")  # creates the slot before the base backup
    assert code == 0, err
    code, out, err = run("backup")
    assert code == 0, err
    before = _insert(pg, 1)
    time.sleep(0.3)
    _insert(pg, 2)
    code, out, err = run("wal-stream", "--end-lsn", _lsn(pg))
    assert code == 0, err
    assert json.loads(out)["gaps"] == []
    code, out, err = run("restore", "--check", "--point-in-time", before.isoformat())
    assert code == 0, err
    plan = json.loads(out)
    assert plan["check_mode"] is True and plan["target"]["would_create"] == "enrol_cli"
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'enrol_cli'").fetchone()[0] == 0
    # A restore point the stored WAL does not hold is refused by the plan (the stream recorded none).
    code, out, err = run("restore", "--check", "--restore-point", "never-created")
    assert code != 0 and "restore point 'never-created' is not in the stored WAL" in err, (code, err)
    code, out, err = run("list", "--restore-point", "x")
    assert code == 2 and "--restore-point is for restore only" in err
    code, out, err = run("restore", "--point-in-time", (before + datetime.timedelta(milliseconds=100)).isoformat())
    assert code == 0, err
    report = json.loads(out)
    assert report["recovered_to"]["lsn"] and report["target"]["database"] == "enrol_cli"
    assert _batches(pg, "enrol_cli") == {1: 50}
    assert "recovered base backup" in err
    # wal-fetch: a stored segment (verified, decrypted), and PostgreSQL's "not stored" exit code.
    name = report["plan"]["wal_first"]
    code, out, err = run("wal-fetch", name, str(tmp_path / "fetched"))
    assert code == 0, err
    assert (tmp_path / "fetched").stat().st_size == 16 << 20
    code, out, err = run("wal-fetch", "00000009.history", str(tmp_path / "nothing"))
    assert code == 1 and not (tmp_path / "nothing").exists()
    # The offsite copy: the base backup and its WAL job go to copy.destination, and a restore to a
    # point in time from the copy alone (the job's storage moved away) gives the same rows.
    code, out, err = run("copy")
    assert code == 0, err
    copied = json.loads(out)
    assert len(copied["copied"]) == 1 and copied["wal"][0]["job"] == WAL_JOB and copied["ok"]
    assert len(copied["wal"][0]["copied"]) >= 2 and "WAL job %s:" % WAL_JOB in err
    code, out, err = run("copy")
    assert code == 0 and json.loads(out)["changed"] is False, err
    (tmp_path / "copy-target.yml").write_text(yaml.safe_dump({"restore_database": "enrol_copy"}))
    os.rename(tmp_path / "store", tmp_path / "store-away")
    try:
        code, out, err = run("restore", "--from-copy", "--target-file", str(tmp_path / "copy-target.yml"),
                             "--point-in-time", (before + datetime.timedelta(milliseconds=100)).isoformat())
    finally:
        os.rename(tmp_path / "store-away", tmp_path / "store")
    assert code == 0, err
    assert json.loads(out)["target"]["database"] == "enrol_copy"
    assert _batches(pg, "enrol_copy") == {1: 50}
    # A damaged identity file: recovery must abort (exit > 125), not end early.
    (tmp_path / "identity").write_text("AGE-SECRET-KEY-1BROKEN\n")
    code, out, err = run("wal-fetch", name, str(tmp_path / "fetched2"))
    assert code == 126, (code, err)


def test_streamer_killed_mid_segment_loses_nothing(pg, tmp_path, scratch):
    """SIGKILL of the running stream (a daemon, no bound) mid-segment; a restart resumes from the
    slot and the spool, and the restore reaches the last commit."""
    job = {"job": JOB, "kind": "postgres_base",
           "source": _options(pg, wal_job=WAL_JOB, slot="kill_slot", spool_dir=str(tmp_path / "spool"),
                              partial_interval=0.5),
           "storage": {"backend": "filesystem", "path": str(tmp_path / "store")}}
    config = tmp_path / "job.yml"
    config.write_text(yaml.safe_dump(job))
    storage = open_storage(job["storage"])
    assert subprocess.run(_runner_argv(config, "wal-stream", "--duration", "0.5"), env=_runner_env(),
                          capture_output=True, check=False, timeout=300).returncode == 0
    assert subprocess.run(_runner_argv(config, "backup"), env=_runner_env(), capture_output=True,
                          check=False, timeout=300).returncode == 0
    daemon = subprocess.Popen(_runner_argv(config, "wal-stream"), env=_runner_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _insert(pg, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until a partial copy holding batch 1 is stored
            partials = WalState.load(storage, WAL_JOB).partials
            if any((m[0]["stats"].get("last_xact_time") for m in partials.values())):
                break
            time.sleep(0.3)
        else:
            pytest.fail("no partial copy with a commit was stored within 60 s")
        _insert(pg, 2)
        os.killpg(daemon.pid, signal.SIGKILL)  # the runner and its pg_receivewal, mid-segment
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
    _insert(pg, 3)
    done = subprocess.run(_runner_argv(config, "wal-stream", "--end-lsn", _lsn(pg)), env=_runner_env(),
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    report = pitr.restore_point_in_time(storage, JOB, "latest", target=_target(pg, "enrol_killed"), database=DB,
                                        bin_dir=pg.bin_dir, scratch_dir=scratch)
    assert _batches(pg, "enrol_killed") == {1: 50, 2: 50, 3: 50}
    assert report["plan"]["wal_partial"] is True


def test_twenty_random_targets(pg, tmp_path, scratch):
    """Eight batches with known commit windows, a segment switch and a stream restart between them;
    twenty random targets: each restore holds exactly the batches committed before its target."""
    import random
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    spool = tmp_path / "spool"
    streamer = _streamer(pg, storage, spool, slot="random_slot")
    streamer.prepare()
    base = _base_backup(pg, storage)
    windows = {}
    for batch in range(1, 9):
        time.sleep(0.25)
        with pg.connect(DB) as conn:
            started = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        ended = _insert(pg, batch, rows=10 * batch)
        windows[batch] = (started, ended)
        if batch == 3:
            _lsn(pg, switch=True)
        if batch == 5:
            streamer.run(end_lsn=_lsn(pg))  # the first stream stops here; a new one continues
            streamer = _streamer(pg, storage, spool, slot="random_slot")
    streamer.run(end_lsn=_lsn(pg))
    low = datetime.datetime.fromisoformat(base["finished_at"].replace("Z", "+00:00")) + datetime.timedelta(seconds=1)
    low = max(low, windows[1][0] - datetime.timedelta(milliseconds=200))
    # The partial copy stored again 20 ms into a second, as a restarted stream does. Targets
    # run up to the moment it was read from the spool (recorded to the microsecond): the one
    # 1 ms before lies in the last second of the stored WAL, after the copy's whole-second
    # manifest time, which alone would refuse it ("cannot be recovered yet").
    again = _streamer(pg, storage, spool, slot="random_slot")
    again.prepare()
    time.sleep(1.02 - time.time() % 1.0)
    again.sweep(final=True)
    last = max(WalState.load(storage, WAL_JOB).partials.values(), key=lambda m: m[0]["stats"]["segno"])[0]
    captured = datetime.datetime.fromisoformat(last["stats"]["captured_at"].replace("Z", "+00:00"))
    assert captured - datetime.timedelta(milliseconds=1) > windows[8][1]
    stored_whole = max(datetime.datetime.fromisoformat(m["finished_at"].replace("Z", "+00:00"))
                       for m in Catalog(storage).scan(WAL_JOB, with_orphans=False))
    assert stored_whole < captured - datetime.timedelta(milliseconds=1), ("the copy took a second to store", last)
    high = min(windows[8][1] + datetime.timedelta(milliseconds=200), captured)
    rng = random.Random(14)
    targets = [captured - datetime.timedelta(milliseconds=1)]
    while len(targets) < 21:
        moment = low + (high - low) * rng.random()
        if moment <= datetime.datetime.fromisoformat(base["finished_at"].replace("Z", "+00:00")):
            continue
        if any(start <= moment <= end for start, end in windows.values()):
            continue  # inside a commit window: which side the commit falls on is unknown
        targets.append(moment)
    for index, moment in enumerate(sorted(targets)):
        name = "enrol_r%d" % index
        pitr.restore_point_in_time(storage, JOB, moment.isoformat(), target=_target(pg, name), database=DB,
                                   bin_dir=pg.bin_dir, scratch_dir=scratch)
        expected = {batch: 10 * batch for batch, (start, end) in windows.items() if end < moment}
        assert _batches(pg, name) == expected, (moment, windows)
        pg.drop_database(name)


def test_wal_stored_without_transaction_times_still_stops_at_the_target(pg, tmp_path, scratch):
    """A runner image without pg_waldump stores WAL without commit times: the planner then
    replays all stored WAL and PostgreSQL's recovery_target_time stops at the right commit."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    streamer = _streamer(pg, storage, tmp_path / "spool", slot="notimes_slot")
    streamer._waldump = ""  # pylint: disable=protected-access  # as if pg_waldump were not installed
    streamer.prepare()
    _base_backup(pg, storage)
    first = _insert(pg, 1)
    with pg.connect() as conn:
        conn.execute("SELECT pg_create_restore_point('between')")
    time.sleep(0.3)
    second = _insert(pg, 2)
    streamer.run(end_lsn=_lsn(pg))
    state = WalState.load(storage, WAL_JOB)
    assert all(m["stats"]["xact_times_known"] is False for m in state.segments.values())
    report = pitr.restore_point_in_time(storage, JOB, (first + datetime.timedelta(milliseconds=100)).isoformat(),
                                        target=_target(pg, "enrol_notimes"), database=DB, bin_dir=pg.bin_dir,
                                        scratch_dir=scratch)
    assert _batches(pg, "enrol_notimes") == {1: 50}
    assert report["target_reached"] is True
    # Without pg_waldump the stream does not know where a restore point lies: a restore to a
    # name needs a time after it as an upper bound, and PostgreSQL finds the point.
    with pytest.raises(ConfigError) as info:
        pitr.plan_restore(storage, JOB, restore_point="between")
    assert "point_in_time" in str(info.value)
    report = pitr.restore_point_in_time(storage, JOB, (second + datetime.timedelta(milliseconds=100)).isoformat(),
                                        restore_point="between", target=_target(pg, "enrol_notimes_rp"),
                                        database=DB, bin_dir=pg.bin_dir, scratch_dir=scratch)
    assert _batches(pg, "enrol_notimes_rp") == {1: 50}
    assert report["plan"]["restore_point"] == "between" and report["plan"]["restore_point_lsn"] is None


def test_wal_without_commit_times_and_nothing_committed_after_the_target_recovers_to_its_end(pg, tmp_path, scratch):
    """WAL stored without commit times, a target after the last commit and before the end of the
    stored WAL: PostgreSQL, given the target, replays everything without meeting it and stops
    ("recovery ended before configured recovery target was reached"). The stored WAL holds every
    commit up to its end, so the end is the target's state: the restore recovers to it. A target
    after the end is refused as not stored yet, and nothing is created."""
    with pg.connect() as conn:  # no autovacuum commit may land after the target
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        conn.execute("SELECT pg_reload_conf()")
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    streamer = _streamer(pg, storage, tmp_path / "spool", slot="quiet_slot")
    streamer._waldump = ""  # pylint: disable=protected-access  # as if pg_waldump were not installed
    streamer.prepare()
    _base_backup(pg, storage)
    _insert(pg, 1)
    last_commit = _insert(pg, 2)
    time.sleep(0.5)
    streamer.run(end_lsn=_lsn(pg))
    target = last_commit + datetime.timedelta(milliseconds=200)
    plan = pitr.plan_restore(storage, JOB, target.isoformat())
    assert plan.times_unknown and not plan.no_commit_after_target
    assert plan.covers_target(), plan.describe()
    messages = []
    report = pitr.restore_point_in_time(storage, JOB, target.isoformat(), target=_target(pg, "enrol_quiet"),
                                        database=DB, bin_dir=pg.bin_dir, scratch_dir=scratch, log=messages.append)
    assert _batches(pg, "enrol_quiet") == {1: 50, 2: 50}
    assert report["target_reached"] is False
    assert report["plan"]["no_commit_after_target"] is True and report["plan"]["wal_times_known"] is False
    recovered_commit = pitr.parse_target(report["recovered_to"]["last_commit_time"])
    assert last_commit - datetime.timedelta(seconds=1) < recovered_commit <= target, report["recovered_to"]
    assert any("recovering to its end" in message for message in messages), messages

    beyond = pitr.parse_target(plan.stored_until) + datetime.timedelta(seconds=30)
    with pytest.raises(NotFoundError) as info:
        pitr.restore_point_in_time(storage, JOB, beyond.isoformat(), target=_target(pg, "enrol_beyond"),
                                   database=DB, bin_dir=pg.bin_dir, scratch_dir=scratch)
    assert "cannot be recovered yet" in str(info.value) and plan.stored_until in str(info.value)
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'enrol_beyond'").fetchone()[0] == 0


def test_restore_to_a_named_restore_point(pg, tmp_path, scratch):
    """pg_create_restore_point between two batches: the stream records where it lies, the restore
    picks the base backup that ended before it and replays exactly up to it."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    streamer = _streamer(pg, storage, tmp_path / "spool", slot="point_slot")
    streamer.prepare()
    early = _base_backup(pg, storage)
    _insert(pg, 1)
    with pg.connect() as conn:
        point = conn.execute("SELECT pg_create_restore_point('before-batch-2')::text").fetchone()[0]
    _insert(pg, 2)
    _lsn(pg, switch=True)
    late = _base_backup(pg, storage)  # ends after the point: not usable for it
    _insert(pg, 3)
    streamer.run(end_lsn=_lsn(pg))
    recorded = [p for m in WalState.load(storage, WAL_JOB).segments.values()
                for p in m["stats"].get("restore_points", [])]
    assert [p["name"] for p in recorded] == ["before-batch-2"]
    report = pitr.restore_point_in_time(storage, JOB, None, restore_point="before-batch-2",
                                        target=_target(pg, "enrol_point"), database=DB, bin_dir=pg.bin_dir,
                                        scratch_dir=scratch)
    assert _batches(pg, "enrol_point") == {1: 50}
    plan = report["plan"]
    assert plan["base_backup"] == early["id"] != late["id"] and report["target_reached"] is True
    assert plan["restore_point_lsn"] == recorded[0]["lsn"] and plan["target_time"] is None
    # The record starts before the LSN pg_create_restore_point returns (the end of the record).
    assert pitr.pgwal.parse_lsn(plan["restore_point_lsn"]) < pitr.pgwal.parse_lsn(point)
    assert plan["wal_last"] == pitr.pgwal.segment_of_lsn(1, plan["restore_point_lsn"]), "no WAL after the point"
    with pytest.raises(NotFoundError) as info:
        pitr.plan_restore(storage, JOB, restore_point="never-created")
    assert "not in the stored WAL" in str(info.value)


def test_prune_keeps_the_wal_of_every_kept_base_backup(pg, tmp_path, scratch):
    """Three base backups with WAL between them; keeping two prunes the first and the WAL only it
    needed (dry run first, the rails), and both kept base backups still restore."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    streamer = _streamer(pg, storage, tmp_path / "spool", slot="prune_slot")
    streamer.prepare()
    bases, marks = [], {}
    for batch in (1, 2, 3):
        bases.append(_base_backup(pg, storage))
        marks[batch] = _insert(pg, batch)
        _lsn(pg, switch=True)
    streamer.run(end_lsn=_lsn(pg))
    stored = sorted(WalState.load(storage, WAL_JOB).segments)
    keep_from = bases[1]["stats"]["wal_start"]
    assert stored[0] < keep_from, "the first base backup needs WAL the second does not"
    policy = {"keep_last": 2, "semantics": "restic"}
    preview = prune(storage, JOB, policy, dry_run=True)
    assert sorted(WalState.load(storage, WAL_JOB).segments) == stored, "a dry run deletes nothing"
    assert [e["id"] for e in preview["prune"]] == [bases[0]["id"]]
    assert [e["file"] for e in preview["wal"][0]["prune"]] == [name for name in stored if name < keep_from]
    oldest_kept = next(e for e in preview["keep"] if e["id"] == bases[1]["id"])
    assert "kept from %s on" % keep_from in oldest_kept["reasons"][-1]
    # min_keep=3 keeps the first base backup, and so its WAL: only what precedes it may go.
    first_needs = bases[0]["stats"]["wal_start"]
    assert [e["file"] for e in prune(storage, JOB, policy, min_keep=3, dry_run=True)["wal"][0]["prune"]] == [
        name for name in stored if name < first_needs]
    with pytest.raises(ConfigError) as info:
        prune(storage, WAL_JOB, policy, dry_run=True)
    assert "not independent backups" in str(info.value)
    result = prune(storage, JOB, policy)
    assert result["deleted"] == [bases[0]["id"]] and result["counts"]["wal_pruned"] >= 1
    remaining = sorted(WalState.load(storage, WAL_JOB).segments)
    assert remaining == [name for name in stored if name >= keep_from]
    # The oldest kept base backup restores to a time after it (before the newest finished) ...
    report = pitr.restore_point_in_time(storage, JOB, (marks[2] + datetime.timedelta(milliseconds=1)).isoformat(),
                                        target=_target(pg, "enrol_kept_oldest"), database=DB, bin_dir=pg.bin_dir,
                                        scratch_dir=scratch)
    assert report["plan"]["base_backup"] == bases[1]["id"]
    assert _batches(pg, "enrol_kept_oldest") == {1: 50, 2: 50}
    # ... and the newest to the latest stored WAL.
    report = pitr.restore_point_in_time(storage, JOB, "latest", target=_target(pg, "enrol_kept_newest"),
                                        database=DB, bin_dir=pg.bin_dir, scratch_dir=scratch)
    assert report["plan"]["base_backup"] == bases[2]["id"]
    assert _batches(pg, "enrol_kept_newest") == {1: 50, 2: 50, 3: 50}


def test_backup_restore_module_point_in_time(pg, tmp_path, scratch):
    """backup_restore with kind postgres_base: check mode plans, then the database comes back as of the time."""
    import contextlib
    import importlib
    import io
    from ansible.module_utils.testing import patch_module_args
    storage_option = {"backend": "filesystem", "path": str(tmp_path / "store")}
    storage = open_storage(storage_option)
    streamer = _streamer(pg, storage, tmp_path / "spool", slot="module_slot")
    streamer.prepare()
    _base_backup(pg, storage)
    first = _insert(pg, 1)
    time.sleep(0.3)
    _insert(pg, 2)
    streamer.run(end_lsn=_lsn(pg))
    module = importlib.import_module("ansible_collections.biometrics.backup.plugins.modules.backup_restore")

    def call(check_mode=False, **extra):
        args = dict({"job": JOB, "kind": "postgres_base", "storage": storage_option,
                     "point_in_time": (first + datetime.timedelta(milliseconds=100)).isoformat(),
                     "target": _options(pg, database=DB, restore_database="enrol_module", scratch_dir=scratch)},
                    **extra)
        if check_mode:
            args["_ansible_check_mode"] = True
        out = io.StringIO()
        with patch_module_args(args), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main()
        return json.loads(out.getvalue())

    plan = call(check_mode=True)
    assert not plan.get("failed"), plan
    assert plan["changed"] is True and plan["target"]["would_create"] == "enrol_module"
    assert "enrol_module" not in _databases(pg)
    result = call()
    assert not result.get("failed"), result
    assert result["target_reached"] is True and result["recovered_to"]["lsn"]
    assert _batches(pg, "enrol_module") == {1: 50}
    refused = call(backup="latest", point_in_time=None)
    assert refused["failed"] and "point_in_time" in refused["msg"]
    unknown = call(check_mode=True, point_in_time=None, restore_point="never-created")
    assert unknown["failed"] and "not in the stored WAL" in unknown["msg"]
    wrong_kind = call(kind="postgres", point_in_time=None, restore_point="x")
    assert wrong_kind["failed"] and "restore_point is for kind postgres_base" in wrong_kind["msg"]


def _databases(server):
    with server.connect() as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_server_position_reads_reuse_one_connection_and_a_lasting_failure_is_logged_once(pg, tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    streamer = _streamer(pg, storage, tmp_path / "spool")
    first = streamer._server_position()
    connection = streamer._position_db
    _insert(pg, 1)
    second = streamer._server_position()
    assert first is not None and second is not None
    assert streamer._position_db is connection  # no new connection per partial copy
    assert second[0] > first[0] and second[1] > first[1]
    # The connection dies (server restart, failover): the next reading reconnects.
    with pg.connect() as conn:
        pid = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    logged = []
    streamer.log = logged.append
    assert streamer._server_position() is None and len(logged) == 1
    assert streamer._server_position() is not None and streamer._position_db is not connection

    # A server that cannot be reached at all: conservative (None) every time, said once.
    unreachable = WalStreamer(PgConnection(_options(pg, port=1), "source"), storage, WAL_JOB, str(tmp_path / "spool2"),
                              slot="pitr_slot", partial_interval=0.5, log=logged.append)
    del logged[:]
    assert [unreachable._server_position() for dummy in range(3)] == [None] * 3
    assert len(logged) == 1 and "could not read the server's WAL position" in logged[0]


def _twice_named(pg, storage, tmp_path, slot, switch_between, name):
    """Base backup, batch 1, restore point ``name``, base backup, batch 2 (the bound just after it),
    batch 3, ``name`` again, batch 4; with ``switch_between`` batch 3 and the second recording lie
    in later WAL files. Returns (early base, middle base, bound, recordings)."""
    streamer = _streamer(pg, storage, tmp_path / ("spool-" + slot), slot=slot)
    streamer.prepare()
    early = _base_backup(pg, storage)
    _insert(pg, 1)
    with pg.connect() as conn:
        conn.execute("SELECT pg_create_restore_point(%s)", (name,))
    middle = _base_backup(pg, storage)  # after the first recording, before the bound
    bound = _insert(pg, 2) + datetime.timedelta(milliseconds=1)
    time.sleep(0.05)
    if switch_between:
        _lsn(pg, switch=True)
    _insert(pg, 3)
    if switch_between:
        _lsn(pg, switch=True)
    with pg.connect() as conn:
        conn.execute("SELECT pg_create_restore_point(%s)", (name,))
    _insert(pg, 4)
    streamer.run(end_lsn=_lsn(pg, switch=True))
    recorded = [p for m in WalState.load(storage, WAL_JOB).segments.values()
                for p in m["stats"].get("restore_points", []) if p["name"] == name]
    assert len(recorded) == 2  # (the new slot's stream may start before this test's WAL)
    return early, middle, bound, recorded


def test_a_restore_point_recorded_again_after_the_bound_is_not_used(pg, tmp_path, scratch):
    """The name is created twice and point_in_time (the upper bound) lies between the two. When a
    commit stamped after the bound lies in a WAL file before the second recording, the plan knows
    that recording is not the one asked for and stops at the first (from the base backup before
    it). When both lie in one WAL file the plan cannot tell; the recovered state is checked
    against the bound before anything is copied, and the restore is refused."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    early, middle, bound, recorded = _twice_named(pg, storage, tmp_path, "twice_slot", True, "nightly")
    report = pitr.restore_point_in_time(storage, JOB, bound, restore_point="nightly",
                                        target=_target(pg, "enrol_nightly"), database=DB, bin_dir=pg.bin_dir,
                                        scratch_dir=scratch)
    assert _batches(pg, "enrol_nightly") == {1: 50}
    assert report["plan"]["base_backup"] == early["id"] != middle["id"]
    assert report["plan"]["restore_point_lsn"] == min(recorded, key=lambda p: pitr.pgwal.parse_lsn(p["lsn"]))["lsn"]

    same_file = open_storage({"backend": "filesystem", "path": str(tmp_path / "store2")})
    dummy, middle, bound, recorded = _twice_named(pg, same_file, tmp_path, "twice_slot2", False, "weekly")
    with pytest.raises(NotFoundError) as info:
        pitr.restore_point_in_time(same_file, JOB, bound, restore_point="weekly",
                                   target=_target(pg, "enrol_nightly2"), database=DB, bin_dir=pg.bin_dir,
                                   scratch_dir=scratch)
    assert "after point_in_time" in str(info.value)
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'enrol_nightly2%'").fetchone()[0] == 0
