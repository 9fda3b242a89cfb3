# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner CLI as the CronJob containers run it: ``python -m ...engine.runner`` from a plain
checkout (PYTHONPATH=build/collections), against real PostgreSQL, SeaweedFS S3 and a real
Pushgateway. Secrets reach it only through env vars and files, and never leave it.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from restore_helpers import tree_state

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(command, *configs, extra=(), env=None, timeout=600):
    argv = [sys.executable, "-m", RUNNER, command]
    for config in configs:
        argv += ["--config", str(config)]
    argv += list(extra)
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    environ.update(env or {})
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                          timeout=timeout, cwd="/", check=False)


def write_job(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def samples(text, name):
    """[(labels, value)] of one metric in an exposition."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((sample.labels, sample.value))
    return found


def metric(pushgateway, name, job):
    values = [value for labels, value in samples(pushgateway.metrics_text(), name) if labels.get("job") == job]
    return values[0] if values else None


@pytest.fixture
def keys(tmp_path):
    identity = x25519.Identity.generate()
    (tmp_path / "identity").write_text("# test key\n%s\n" % identity)
    (tmp_path / "recipients").write_text("%s\n" % identity.to_public())
    return {"identity_file": str(tmp_path / "identity"), "recipients_file": str(tmp_path / "recipients")}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n" * 100)
    (root / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    os.chmod(root / "sub" / "b.bin", 0o640)
    os.symlink("a.txt", root / "link")
    return root


@pytest.fixture
def s3_env(s3_server):
    return {"RUNNER_S3_ACCESS": s3_server.access_key, "RUNNER_S3_SECRET": s3_server.secret_key}


def s3_storage(s3_server, prefix):
    return {"backend": "s3", "bucket": s3_server.bucket, "prefix": prefix, "endpoint_url": s3_server.endpoint_url,
            "region": s3_server.region, "access_key_env": "RUNNER_S3_ACCESS", "secret_key_env": "RUNNER_S3_SECRET"}


def engine_storage(s3_server, prefix):
    return open_storage(s3_server.storage_options(prefix=prefix))


def assert_no_secret(result, *secrets):
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr


def test_files_job_on_s3_full_cycle_with_metrics(tmp_path, tree, keys, s3_server, s3_env, pushgateway_server):
    job = "runner-files-%s" % uuid.uuid4().hex[:6]
    prefix = "runner-%s" % uuid.uuid4().hex[:8]
    config = write_job(tmp_path / "job.yaml", {
        "job": job, "kind": "files", "source": {"path": str(tree)},
        "storage": s3_storage(s3_server, prefix), "compression": {"algorithm": "zstd", "level": 3},
        "encryption": dict(keys), "retention": {"keep_last": 1, "min_keep": 1},
        "schedule": "0 3 * * *",
        "metrics": {"pushgateway_url": pushgateway_server.url, "instance": "node-a"},
        "restore": {"target": {"path": str(tmp_path / "restored")}},
        "log_format": "json",
    })
    first = run("backup", config, env=s3_env)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["kind"] == "files" and result["size_bytes"] > 0
    for line in first.stderr.splitlines():
        assert json.loads(line)["job"] == job  # JSON lines only
    assert_no_secret(first, s3_server.secret_key, s3_server.access_key)
    assert metric(pushgateway_server, "backup_size_bytes", job) == result["size_bytes"]
    assert metric(pushgateway_server, "backup_schedule_interval_seconds", job) == 86400
    success = metric(pushgateway_server, "backup_last_success_timestamp_seconds", job)
    assert abs(success - time.time()) < 600
    labels = [sample[0] for sample in samples(pushgateway_server.metrics_text(), "backup_size_bytes")
              if sample[0].get("job") == job]
    assert labels[0]["kind"] == "files" and labels[0]["instance"] == "node-a"

    time.sleep(1.1)
    (tree / "a.txt").write_text("changed\n")
    second = run("backup", config, env=s3_env)
    assert second.returncode == 0, second.stderr
    second_id = json.loads(second.stdout)["backup_id"]
    assert metric(pushgateway_server, "backup_size_change_ratio", job) is not None

    listing = run("list", config, env=s3_env)
    assert listing.returncode == 0, listing.stderr
    listed = json.loads(listing.stdout)
    assert [b["id"] for b in listed["backups"]] == [second_id, result["backup_id"]]

    verify = run("verify", config, extra=["--backup", "all", "--test-restore"], env=s3_env)
    assert verify.returncode == 0, verify.stderr
    outcome = json.loads(verify.stdout)
    assert outcome["verified"] == 2 and all(r["checks"] for r in outcome["results"])
    assert metric(pushgateway_server, "backup_last_verified_timestamp_seconds", job) is not None
    catalog = Catalog(engine_storage(s3_server, prefix))
    assert all(m["verification"]["result"] == "ok" for m in catalog.scan(job))

    restore = run("restore", config, env=s3_env)
    assert restore.returncode == 0, restore.stderr
    report = json.loads(restore.stdout)
    assert report["backup_id"] == second_id and report["verification"]["objects"] >= 1
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(tree))

    drill = run("drill", config, env=s3_env)
    assert drill.returncode == 0, drill.stderr
    assert metric(pushgateway_server, "backup_restore_drill_last_success_timestamp_seconds", job) is not None
    assert metric(pushgateway_server, "backup_restore_drill_duration_seconds", job) > 0

    preview = run("prune", config, extra=["--check"], env=s3_env)
    assert preview.returncode == 0, preview.stderr
    assert [e["id"] for e in json.loads(preview.stdout)["prune"]] == [result["backup_id"]]
    assert len(catalog.scan(job)) == 2
    pruned = run("prune", config, env=s3_env)
    assert pruned.returncode == 0, pruned.stderr
    assert [m["id"] for m in catalog.scan(job)] == [second_id]
    assert metric(pushgateway_server, "backup_retention_kept", job) == 1
    assert metric(pushgateway_server, "backup_retention_pruned_total", job) == 1
    for step in (second, listing, verify, restore, drill, preview, pruned):
        assert_no_secret(step, s3_server.secret_key, s3_server.access_key)


def assert_phases(phases):
    """Phases of a restore (engine/restore.py RestoreClock): all there, each >= 0, their sum <= total."""
    assert sorted(phases) == sorted(["select", "verify", "prepare", "transfer", "load", "checks", "total"])
    assert all(isinstance(value, float) and value >= 0 for value in phases.values()), phases
    assert sum(value for name, value in phases.items() if name != "total") <= phases["total"] + 1e-9, phases
    assert phases["verify"] > 0 and phases["transfer"] > 0, phases   # both passes read every payload


def test_postgres_job_backup_and_drill_into_a_scratch_database(
        tmp_path, keys, postgres_server, postgres_database, pushgateway_server):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, template bytea)")
        conn.execute("INSERT INTO subjects SELECT g, decode(md5(g::text), 'hex') FROM generate_series(1, 321) g")
    job = "runner-pg-%s" % uuid.uuid4().hex[:6]
    source = {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
              "database": postgres_database.name, "bin_dir": postgres_server.bin_dir,
              "password_env": "RUNNER_PG_PASSWORD"}
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    config = write_job(tmp_path / "pg.yaml", {
        "job": job, "kind": "postgres", "source": source, "storage": storage, "encryption": dict(keys),
        "metrics": {"pushgateway_url": pushgateway_server.url}})
    env = {"RUNNER_PG_PASSWORD": "pg-" + uuid.uuid4().hex}
    backup = run("backup", config, env=env)
    assert backup.returncode == 0, backup.stderr
    manifest = json.loads(backup.stdout)["manifest"]
    assert json.dumps(manifest["stats"]).count("321") >= 1
    instance = [sample[0]["instance"] for sample in samples(pushgateway_server.metrics_text(), "backup_size_bytes")
                if sample[0].get("job") == job]
    assert instance == [postgres_server.host]

    drill_config = write_job(tmp_path / "drill.yaml", {
        "job": job + "-drill", "kind": "postgres", "source": source, "storage": storage,
        "encryption": dict(keys), "drill": {"job": job}, "metrics": {"pushgateway_url": pushgateway_server.url}})
    drill = run("drill", drill_config, env=env)
    assert drill.returncode == 0, drill.stderr
    result = json.loads(drill.stdout)["results"][0]
    assert result["id"] == manifest["id"] and result["result"] == "ok"
    rows = [c for c in result["checks"] if c["what"] == "rows public.subjects"]
    assert rows and rows[0]["actual"] == rows[0]["expected"] == 321
    # the scratch database is gone again
    with postgres_server.connect() as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert not [n for n in names if "_verify_" in n]
    assert metric(pushgateway_server, "backup_restore_drill_last_success_timestamp_seconds", job) is not None
    assert_phases(result["phases"])
    assert result["phases"]["total"] <= json.loads(drill.stdout)["duration_seconds"]
    pushed = {labels["phase"]: value for labels, value in
              samples(pushgateway_server.metrics_text(), "backup_restore_drill_phase_seconds") if labels.get("job") == job}
    assert pushed == result["phases"]
    assert "expected recovery time %.1fs" % result["phases"]["total"] in drill.stderr
    assert_no_secret(backup, env["RUNNER_PG_PASSWORD"])
    assert_no_secret(drill, env["RUNNER_PG_PASSWORD"])

    # runner restore into a new database: progress lines of both passes, and the phases
    restored_db = "runner_restored_%s" % uuid.uuid4().hex[:6]
    restore_config = write_job(tmp_path / "restore.yaml", {
        "job": job, "kind": "postgres", "source": source, "storage": storage, "encryption": dict(keys),
        "restore": {"target": dict(source, database=postgres_database.name, restore_database=restored_db)}})
    try:
        restore = run("restore", restore_config, extra=["--progress-interval", "0", "--log-format", "json"], env=env)
        assert restore.returncode == 0, restore.stderr
        report = json.loads(restore.stdout)
        assert_phases(report["phases"])
        assert report["duration_seconds"] == report["phases"]["total"]
        with postgres_server.connect(restored_db) as conn:
            assert conn.execute("SELECT count(*) FROM subjects").fetchone()[0] == 321
        lines = [json.loads(line) for line in restore.stderr.splitlines()]
        progress = [line for line in lines if line["message"].startswith("progress: ")]
        plain = report["verification"]["plain_bytes"]
        # One pass (issue 17): the verify phase reads only what the target does not stream and
        # check on the way (globals.sql, applied in place); the dump is verified as it restores.
        assert report["verification"]["mode"] == "one-pass"
        streamed = sum(d["plain_bytes"] for d in report["verification"]["details"] if d.get("payload") == "database.dump")
        assert 0 < streamed < plain
        for phase, total in (("verify", plain - streamed), ("restore", plain)):
            done = [line["plain_bytes"] for line in progress if line["phase"] == phase]
            assert done and done == sorted(done) and done[-1] <= total, (phase, done)
            assert all(line["total_plain_bytes"] == total for line in progress if line["phase"] == phase)
        assert lines[-1]["phases"] == report["phases"]
        assert_no_secret(restore, env["RUNNER_PG_PASSWORD"])
    finally:
        postgres_server.drop_database(restored_db)


def test_unreachable_source_fails_with_one_clear_line_and_a_failure_metric(tmp_path, pushgateway_server):
    job = "runner-down-%s" % uuid.uuid4().hex[:6]
    import socket
    with socket.socket() as held:   # bound and never listening for the whole run: refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        config = write_job(tmp_path / "job.yaml", {
            "job": job, "kind": "postgres",
            "source": {"host": "127.0.0.1", "port": port, "user": "nobody", "database": "app", "connect_timeout": 3},
            "storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
            "metrics": {"pushgateway_url": pushgateway_server.url, "instance": "x"}})
        result = run("backup", config)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "backup of job %s failed" % job in errors[0] and str(port) in errors[0]
    assert "Traceback" not in result.stderr
    assert metric(pushgateway_server, "backup_last_failure_timestamp_seconds", job) is not None
    assert metric(pushgateway_server, "backup_last_success_timestamp_seconds", job) is None
    assert Catalog(open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})).scan(job) == []


@pytest.mark.parametrize("change, message", [
    ({"storage": {"backend": "filesystem", "path": "relative"}}, "storage.path must be an absolute"),
    ({"retention": {"keep_daily": "x"}}, "retention"),
    ({"source": {"path": "/srv", "password": "literal"}}, "source.password: secrets must not be written"),
    ({"colour": "blue"}, "unknown top-level option"),
])
def test_config_errors_exit_2_before_anything_runs(tmp_path, change, message):
    data = {"job": "cfg", "kind": "files", "source": {"path": str(tmp_path)},
            "storage": {"backend": "filesystem", "path": str(tmp_path / "store")}}
    data.update(change)
    result = run("backup", write_job(tmp_path / "job.yaml", data))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert not (tmp_path / "store").exists()
    assert "literal" not in result.stderr


def test_missing_secret_env_exits_2_and_names_the_variable(tmp_path, tree):
    config = write_job(tmp_path / "job.yaml", {
        "job": "envs", "kind": "files", "source": {"path": str(tree)},
        "storage": {"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9", "secret_key_env": "NOT_SET_X"}})
    result = run("backup", config)
    assert result.returncode == 2
    assert "NOT_SET_X, which is not set" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run("restore", tmp_path / "a.yaml", tmp_path / "b.yaml").returncode == 2
    assert run("backup", tmp_path / "a.yaml", extra=["--point-in-time", "2024-01-01"]).returncode == 2
    missing = run("list", tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "cannot read job file from" in missing.stderr


def _files_job(tmp_path, tree, keys, **extra):
    data = {"job": "guarded", "kind": "files", "source": {"path": str(tree)},
            "storage": {"backend": "filesystem", "path": str(tmp_path / "store")}, "encryption": dict(keys),
            "restore": {"target": {"path": str(tmp_path / "live"), "overwrite": True}}}
    data.update(extra)
    return write_job(tmp_path / ("job-%d.yaml" % len(os.listdir(tmp_path))), data)


def test_restore_with_wrong_key_or_damaged_backup_leaves_the_target_alone(tmp_path, tree, keys):
    config = _files_job(tmp_path, tree, keys)
    backup = run("backup", config)
    assert backup.returncode == 0, backup.stderr
    manifest = json.loads(backup.stdout)["manifest"]
    live = tmp_path / "live"
    live.mkdir()
    (live / "precious.txt").write_text("do not touch")
    before = tree_state(str(live))

    stranger = tmp_path / "stranger"
    stranger.write_text(str(x25519.Identity.generate()) + "\n")
    wrong = _files_job(tmp_path, tree, {"recipients_file": keys["recipients_file"], "identity_file": str(stranger)})
    refused = run("restore", wrong)
    assert refused.returncode == 2, refused.stderr
    assert "wrong key" in refused.stderr
    assert tree_state(str(live)) == before

    payload = next(o for o in manifest["objects"] if o.get("payload"))
    path = tmp_path / "store" / "guarded" / manifest["id"] / payload["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    damaged = run("restore", config)
    assert damaged.returncode == 3
    assert "SHA-256" in damaged.stderr
    assert tree_state(str(live)) == before
    checked = run("restore", config, extra=["--check"])
    assert checked.returncode == 3 and tree_state(str(live)) == before
    verify = run("verify", config)
    assert verify.returncode == 3
    assert json.loads(verify.stdout)["results"][0]["result"] == "failed"


def test_restore_check_mode_and_point_in_time(tmp_path, tree, keys):
    config = _files_job(tmp_path, tree, keys)
    first = json.loads(run("backup", config).stdout)["manifest"]
    time.sleep(1.1)
    (tree / "new.txt").write_text("added later")
    second = json.loads(run("backup", config).stdout)["manifest"]
    plan = run("restore", config, extra=["--check"])
    assert plan.returncode == 0, plan.stderr
    report = json.loads(plan.stdout)
    assert report["check_mode"] and report["backup_id"] == second["id"] and not (tmp_path / "live").exists()
    older = run("restore", config, extra=["--point-in-time", first["finished_at"]])
    assert older.returncode == 0, older.stderr
    assert json.loads(older.stdout)["backup_id"] == first["id"]
    assert not (tmp_path / "live" / "new.txt").exists() and (tmp_path / "live" / "a.txt").exists()


def test_size_anomaly_fail_policy_exits_4_and_pushes_the_ratio(tmp_path, tree, pushgateway_server):
    job = "runner-size-%s" % uuid.uuid4().hex[:6]
    config = write_job(tmp_path / "job.yaml", {
        "job": job, "kind": "files", "source": {"path": str(tree)}, "compression": {"algorithm": "none"},
        "storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
        "size_anomaly": {"fail_below": 0.5}, "metrics": {"pushgateway_url": pushgateway_server.url}})
    assert run("backup", config).returncode == 0
    first_success = metric(pushgateway_server, "backup_last_success_timestamp_seconds", job)
    (tree / "sub" / "b.bin").unlink()
    time.sleep(1.1)
    shrunk = run("backup", config)
    assert shrunk.returncode == 4, shrunk.stderr
    assert "size policy" in shrunk.stderr
    result = json.loads(shrunk.stdout)
    assert result["size_check"]["level"] == "fail" and result["size_change_ratio"] < 0.5
    assert metric(pushgateway_server, "backup_last_success_timestamp_seconds", job) == first_success
    assert metric(pushgateway_server, "backup_last_failure_timestamp_seconds", job) is not None
    assert metric(pushgateway_server, "backup_size_change_ratio", job) == pytest.approx(result["size_change_ratio"])
    # the backup is kept (and listed) for inspection
    listed = json.loads(run("list", config).stdout)["backups"]
    assert listed[0]["id"] == result["backup_id"] and listed[0]["size_check"]["level"] == "fail"


def test_sigterm_mid_backup_leaves_nothing_listed(tmp_path):
    source = tmp_path / "big"
    source.mkdir()
    with open(source / "sparse.img", "wb") as handle:  # reads as zeros, costs no disk
        handle.truncate(8 << 30)
    store = tmp_path / "store"
    config = write_job(tmp_path / "job.yaml", {
        "job": "killed", "kind": "files", "source": {"path": str(source)},
        "storage": {"backend": "filesystem", "path": str(store)}, "compression": {"algorithm": "zstd", "level": 1}})
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    process = subprocess.Popen([sys.executable, "-m", RUNNER, "backup", "--config", str(config),
                                "--progress-interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environ)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        if "progress:" in line or not line:
            break
    assert any("progress:" in line for line in lines), lines
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    catalog = Catalog(open_storage({"backend": "filesystem", "path": str(store)}))
    assert catalog.scan("killed") == [] and catalog.orphans == []
    leftovers = [os.path.join(entry[0], name) for entry in os.walk(store) for name in entry[2]]
    assert leftovers == []
