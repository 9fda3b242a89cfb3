# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``runner drill``: the point-in-time drill of a ``postgres_base`` job and the drill from the
offsite copy, run as the CronJobs run them (the runner as a process, a job file, metrics on a
real Pushgateway).

1. PITR (a real PostgreSQL 15, wal_level=replica; stream and base backup made with the helpers
   of test_postgres_pitr): the drill recovers to a random time inside the recovery window
   (oldest base backup .. newest stored WAL), reports the window, the seed and the target,
   counts exactly the rows committed at or before the target, and pushes the drill metrics;
   the same seed draws the same target, and a given target between two batches stops before
   the next commit; one damaged WAL object the restore needs fails the
   drill (exit 3) naming the segment, and pushes a drill failure; without the PostgreSQL server
   binaries the drill stops with a message saying so (exit 2).
2. From the offsite copy: ``drill --from-copy`` reads only the copy destination's credentials
   (the primary storage's credential files do not exist) and pushes ``<job>-offsite`` metrics.
"""

import json
import os
import subprocess
import sys
import time
import uuid

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.walstream import WalState
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import parse_iso

from .files_helpers import flip_byte
from .test_postgres_pitr import (  # noqa: F401  pylint: disable=unused-import  # pg and scratch are fixtures
    DB, JOB, WAL_JOB, _base_backup, _insert, _lsn, _streamer, pg, scratch)

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = 20


def run(config, *extra):
    argv = [sys.executable, "-m", RUNNER, "drill", "--config", str(config)] + list(extra)
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                          timeout=300, cwd="/", check=False)


def metric(gateway, name, job):
    for family in text_string_to_metric_families(gateway.metrics_text()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("job") == job:
                return sample.value
    return None


def _server_time(server):
    with server.connect() as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def test_pitr_drill_to_a_random_time_and_a_damaged_segment(pg, tmp_path, scratch, pushgateway_server):
    key = x25519.Identity.generate()
    (tmp_path / "identity").write_text("%s\n" % key)
    store = tmp_path / "store"
    storage = open_storage({"backend": "filesystem", "path": str(store)})
    encryption = {"recipients": [str(key.to_public())]}
    streamer = _streamer(pg, storage, tmp_path / "spool", encryption)
    streamer.prepare()
    _insert(pg, 0, ROWS)
    base = _base_backup(pg, storage, encryption)
    # Batches spread over the window: (server time before the insert, time after its commit).
    batches = {}
    for batch in range(1, 7):
        time.sleep(0.4)
        before = _server_time(pg)
        batches[batch] = (before, _insert(pg, batch, ROWS))
        if batch == 3:
            _lsn(pg, switch=True)
    time.sleep(1.1)  # the newest WAL is stored a whole second after the last commit
    streamer.run(end_lsn=_lsn(pg))
    instance = "drill-%s" % uuid.uuid4().hex[:6]
    config = tmp_path / "job.yaml"
    job_file = {
        "job": JOB, "kind": "postgres_base",
        "source": {"host": pg.host, "port": pg.port, "user": "postgres", "bin_dir": pg.bin_dir, "wal_job": WAL_JOB,
                   "database": DB},
        "storage": {"backend": "filesystem", "path": str(store)},
        "encryption": {"recipients": encryption["recipients"], "identity_file": str(tmp_path / "identity")},
        "drill": {"target": {"scratch_dir": scratch, "recovery_timeout": 120}},
        "metrics": {"pushgateway_url": pushgateway_server.url, "instance": instance},
    }
    config.write_text(yaml.safe_dump(job_file))

    done = run(config)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    window, target = result["window"], parse_iso(result["target_time"])
    oldest, newest = parse_iso(window["oldest"]), parse_iso(window["newest"])
    assert oldest == parse_iso(base["stats"]["completed_at"]) and newest >= batches[6][1], window
    assert result["in_window"] and oldest <= target <= newest, (window, result["target_time"])
    assert result["ok"] and all(check["ok"] for check in result["checks"]), result["checks"]
    last_commit = result["recovered_to"]["last_commit_time"]
    if last_commit is None:  # a target before the first commit after the base backup: none replayed
        assert target < batches[1][1], (result["target_time"], batches[1])
    else:
        assert parse_iso(last_commit) <= target
    # Exactly the batches committed at or before the target (batch 0 predates the base backup).
    included = [batch for batch, (before, after) in batches.items() if after <= target]
    unsure = [batch for batch, (before, after) in batches.items() if before <= target < after]
    counted = result["row_counts"]["public.enrolments"]
    assert counted in [ROWS * (1 + len(included) + extra) for extra in range(len(unsure) + 1)], (
        counted, result["target_time"], batches)
    assert result["rows"] == counted and result["tables"] == 1 and result["database"] == DB
    # The seed and the target are logged: the same seed draws the same target.
    assert "seed %d" % result["seed"] in done.stderr and result["target_time"] in done.stderr
    again = run(config, "--check", "--seed", str(result["seed"]))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["target_time"] == result["target_time"]
    # A target between two batches (given, as when a logged drill is repeated): recovery stops
    # before the next commit, and the rows are exactly those of batches 0 to 2.
    middle = batches[2][1] + (batches[3][0] - batches[2][1]) / 2
    between = run(config, "--point-in-time", middle.isoformat())
    assert between.returncode == 0, between.stderr
    between = json.loads(between.stdout)
    assert between["target_reached"] is True and between["seed"] is None
    assert between["row_counts"] == {"public.enrolments": 3 * ROWS}
    # A target right after the base backup, before any later commit (a random draw can land
    # there, as a CI run's did): nothing is replayed, the base backup's rows alone.
    early = oldest + (batches[1][0] - oldest) / 2
    first = run(config, "--point-in-time", early.isoformat())
    assert first.returncode == 0, first.stderr
    first = json.loads(first.stdout)
    assert first["ok"] and first["recovered_to"]["last_commit_time"] is None
    assert first["row_counts"] == {"public.enrolments": ROWS}
    assert [check["what"] for check in between["checks"] if check["ok"]] == [
        "recovery reached the target", "last replayed commit at or before the target",
        "first transaction not replayed ended after the target", "pg_dump of %s read to the end" % DB]
    # The drill metrics, as every drill pushes them; nothing is left in the scratch directory.
    success = metric(pushgateway_server, "backup_restore_drill_last_success_timestamp_seconds", JOB)
    assert success is not None and abs(success - time.time()) < 300
    assert metric(pushgateway_server, "backup_restore_drill_duration_seconds", JOB) > 0
    assert os.listdir(scratch) == []
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s", (DB + "_%",)).fetchone()[0] == 0

    # One flipped byte in the first segment the base backup needs: the drill fails, naming it.
    victim = WalState.load(storage, WAL_JOB).segments[base["stats"]["wal_start"]]
    obj = next(o for o in victim["objects"] if o.get("payload"))
    flip_byte(str(store / victim["job"] / victim["id"] / obj["name"]))
    failed = run(config)
    assert failed.returncode == 3, failed.stderr
    assert base["stats"]["wal_start"] in failed.stderr and "failed verification" in failed.stderr
    failure = metric(pushgateway_server, "backup_restore_drill_last_failure_timestamp_seconds", JOB)
    assert failure is not None and failure >= success
    assert os.listdir(scratch) == []

    # Without the server binaries (the runner image) the drill says what it needs.
    empty = tmp_path / "no-server-binaries"
    empty.mkdir()
    job_file["source"]["bin_dir"] = str(empty)
    job_file.pop("metrics")
    config.write_text(yaml.safe_dump(job_file))
    refused = run(config)
    assert refused.returncode == 2, refused.stderr
    assert "PostgreSQL server binaries" in refused.stderr and "Traceback" not in refused.stderr


def test_drill_from_the_copy_needs_only_the_copy_credentials(tmp_path, pushgateway_server):
    tree = tmp_path / "data"
    tree.mkdir()
    (tree / "a.txt").write_text("alpha\n" * 100)
    job = "offsite-drill-%s" % uuid.uuid4().hex[:6]
    copy_path = tmp_path / "offsite"
    copy_path.mkdir()
    # The backup as the copy holds it (the copy's layout is the storage layout).
    BackupRun(job, FilesSource({"path": str(tree)}), open_storage({"backend": "filesystem", "path": str(copy_path)})).run()
    missing = tmp_path / "primary-secrets"  # the primary storage's credentials are not there
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "job": job, "kind": "files", "source": {"path": str(tree)},
        "storage": {"backend": "s3", "bucket": "lost", "endpoint_url": "http://127.0.0.1:9", "region": "x",
                    "access_key_file": str(missing / "access_key"), "secret_key_file": str(missing / "secret_key")},
        "copy": {"destination": {"backend": "filesystem", "path": str(copy_path)}},
        "metrics": {"pushgateway_url": pushgateway_server.url, "instance": "offsite-test"},
    }))
    done = run(config, "--from-copy")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["from_copy"] is True
    assert metric(pushgateway_server, "backup_restore_drill_last_success_timestamp_seconds", job + "-offsite")
    assert metric(pushgateway_server, "backup_restore_drill_last_success_timestamp_seconds", job) is None
    # Without --from-copy the same file needs the primary's credentials.
    primary = run(config)
    assert primary.returncode == 2 and "access_key" in primary.stderr, primary.stderr
