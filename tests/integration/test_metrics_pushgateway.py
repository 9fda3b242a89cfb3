# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/metrics.py against a real Pushgateway, and what a real Prometheus makes of it.

The engine pushes to the ``pushgateway_server`` fixture (Debian prometheus-pushgateway) and
the tests read the values back from the gateway's /metrics. Then a real Prometheus (Debian
``prometheus``) scrapes that gateway with honor_labels, loads the rules file rendered by the
monitoring role, and the tests check that the alerts fire (and stay quiet) for what the
engine pushed, and that every dashboard query returns the pushed values.
"""

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ci_env import require_or_skip
from server_fixtures import ServerProcess, ServerStartError, _http_status, free_port, start_with_port_retry

from ansible_collections.biometrics.backup.plugins.module_utils.engine import metrics, pitr
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.metrics import BackupMetrics, MetricsError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from integration import test_monitoring_role as monitoring_role
from unit.test_dashboard import failed_jobs_panel_query, load_dashboard

DASHBOARD = os.path.join(monitoring_role.ROLE_DIR, "files", "backup-dashboard.json")


def unique(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def gateway_samples(gateway, job):
    """{(sample name, instance, kind): (value, family type)} of one job on the gateway."""
    found = {}
    for family in text_string_to_metric_families(gateway.metrics_text()):
        for sample in family.samples:
            if sample.labels.get("job") == job and sample.name.startswith("backup_"):
                found[(sample.name, sample.labels["instance"], sample.labels["kind"])] = (sample.value, family.type)
    return found


def test_pushed_metrics_read_back_from_the_gateway(pushgateway_server):
    job = unique("pg")
    m = BackupMetrics(job, "postgres", "db1")
    m.record_backup_result(True, 1_700_000_000, duration_seconds=12.5, size_bytes=4096, size_change_ratio=1.25,
                           stored_new_bytes=1024, repository_bytes=1 << 20)
    m.record_backup_result(False, 1_700_000_100)
    m.record_schedule(cron_expression="0 2 * * *")
    m.record_verification(True, 1_700_000_200)
    m.record_verification(False, 1_700_000_300)
    m.record_drill(True, 1_700_000_400, duration_seconds=30)
    m.record_drill(False, 1_700_000_500)
    phases = {"select": 0.05, "verify": 6.5, "prepare": 0.4, "transfer": 14.25, "load": 5.0, "checks": 0.3,
              "total": 26.5}
    m.record_drill_phases(phases)
    m.record_retention(kept=7, pruned=2, finished_at=1_700_000_600)
    m.record_copy(True, 1_700_000_700, lag_seconds=3600, bytes_copied=1 << 20)
    m.record_copy(False, 1_700_000_800)
    m.record_wal_gap(1_700_000_850)
    m.record_wal_stream(True, reported_at=1_700_000_900, last_archived_at=1_700_000_890, lag_bytes=8192,
                        lag_seconds=2.5, segments_stored=4, window_start=1_699_900_000, window_end=1_700_000_890)
    assert m.push(pushgateway_server.url) == {"job": job, "kind": "postgres", "instance": "db1"}

    got = gateway_samples(pushgateway_server, job)
    assert {key[0] for key in got} == metrics.metric_names()
    expected = dict(m.recorded, backup_schedule_interval_seconds=86400.0)
    assert expected.pop("backup_restore_drill_phase_seconds") == phases
    pushed_phases = {sample.labels["phase"]: sample.value
                     for family in text_string_to_metric_families(pushgateway_server.metrics_text())
                     for sample in family.samples
                     if sample.name == "backup_restore_drill_phase_seconds" and sample.labels.get("job") == job}
    assert pushed_phases == phases
    for name, value in expected.items():
        read_value, family_type = got[(name, "db1", "postgres")]
        assert read_value == value, name
        assert family_type == metrics.METRICS[name][0], name


def test_a_failed_run_merges_into_the_group_and_keeps_the_last_success(pushgateway_server):
    job = unique("redis")
    first = BackupMetrics(job, "redis", "cache")
    first.record_backup_result(True, 1_000, duration_seconds=2, size_bytes=100)
    first.push(pushgateway_server.url)
    second = BackupMetrics(job, "redis", "cache")
    second.record_backup_result(False, 2_000)
    second.push(pushgateway_server.url)

    got = gateway_samples(pushgateway_server, job)
    assert got[("backup_last_success_timestamp_seconds", "cache", "redis")][0] == 1_000
    assert got[("backup_last_failure_timestamp_seconds", "cache", "redis")][0] == 2_000
    assert got[("backup_size_bytes", "cache", "redis")][0] == 100


def test_the_pruned_counter_continues_across_runs_per_instance(pushgateway_server):
    job = unique("files")
    for pruned in (2, 3):
        run = BackupMetrics(job, "files", "node1")
        run.record_retention(kept=5, pruned=pruned, finished_at=time.time())
        run.push(pushgateway_server.url)
    other = BackupMetrics(job, "files", "node2")
    other.record_retention(kept=5, pruned=4, finished_at=time.time())
    other.push(pushgateway_server.url)

    got = gateway_samples(pushgateway_server, job)
    assert got[("backup_retention_pruned_total", "node1", "files")] == (5.0, "counter")
    assert got[("backup_retention_pruned_total", "node2", "files")] == (4.0, "counter")


def test_grouping_key_values_with_slashes_survive(pushgateway_server):
    job = unique("pg")
    instance = "db1.example.org:5432/main"
    m = BackupMetrics(job, "postgres", instance)
    m.record_backup_result(True, 5_000, size_bytes=1)
    m.push(pushgateway_server.url)
    assert gateway_samples(pushgateway_server, job)[("backup_size_bytes", instance, "postgres")][0] == 1


def test_an_unreachable_gateway_raises_without_leaking_the_password(monkeypatch):
    monkeypatch.setenv(metrics.ENV_USERNAME, "pusher")
    monkeypatch.setenv(metrics.ENV_PASSWORD, "s3cr3t-pa55")
    m = BackupMetrics("pg", "postgres", "db1")
    m.record_backup_result(True, 1)
    with socket.socket() as held:   # bound and never listening: refused, and no other test can take it
        held.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d" % held.getsockname()[1]
        with pytest.raises(MetricsError) as err:
            m.push(url, timeout=5)
    assert url in str(err.value) and "s3cr3t-pa55" not in str(err.value)
    with pytest.raises(ConfigError):
        m.push("http://pusher:s3cr3t-pa55@127.0.0.1:1")


# ---------------------------------------------------------------------- real Prometheus

@pytest.fixture(scope="module")
def alert_rules(tmp_path_factory):
    """The rules file as the monitoring role renders it with its defaults."""
    out, _output = monitoring_role.render(tmp_path_factory.mktemp("rules"))
    return str(out / monitoring_role.RULES_FILE)


@pytest.fixture(scope="module")
def prometheus(pushgateway_server, alert_rules):
    """A real Prometheus scraping the Pushgateway every second, with the role's rules."""
    if shutil.which("prometheus") is None:
        require_or_skip("prometheus not found (Debian package prometheus; make deps)")
    base = tempfile.mkdtemp(prefix="bb-prometheus-")
    config = os.path.join(base, "prometheus.yml")
    with open(config, "w", encoding="utf-8") as handle:
        yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [alert_rules],
            "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                                "static_configs": [{"targets": ["%s:%d" % (pushgateway_server.host,
                                                                           pushgateway_server.port)]}]}],
        }, handle)

    def start():
        # The free port may be taken by the other xdist worker before Prometheus binds it.
        port = free_port()
        started = ServerProcess("prometheus", [
            "prometheus", "--config.file=%s" % config, "--storage.tsdb.path=%s" % os.path.join(base, "data"),
            "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
            os.path.join(base, "prometheus.log"), cwd=base)
        address = "http://127.0.0.1:%d" % port
        try:
            started.start()
            started.wait_ready(lambda: _http_status(address + "/-/ready") == 200)
        except ServerStartError:
            started.stop()
            raise
        return started, address

    try:
        process, url = start_with_port_retry(start)
    except ServerStartError as exc:
        shutil.rmtree(base, ignore_errors=True)
        require_or_skip("prometheus could not start: %s" % exc)
    try:
        yield url
    finally:
        process.stop()
        shutil.rmtree(base, ignore_errors=True)


def api(prometheus_url, path, **params):
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(prometheus_url + path + query, timeout=10) as response:  # noqa: S310
        body = json.loads(response.read().decode("utf-8"))
    assert body["status"] == "success", body
    return body["data"]


def wait_until(probe, what, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(1)


def firing(prometheus_url, jobs):
    """{(alertname, job, reason)} of the firing alerts about ``jobs``."""
    alerts = api(prometheus_url, "/api/v1/alerts")["alerts"]
    return {(a["labels"]["alertname"], a["labels"]["job"], a["labels"].get("reason"))
            for a in alerts if a["state"] == "firing" and a["labels"].get("job") in jobs}


def test_alerts_fire_in_prometheus_for_what_the_engine_pushed(pushgateway_server, prometheus):
    now = time.time()
    failing, shrunk, stale, healthy, recovered = (unique(name) for name in
                                                  ("failing", "shrunk", "stale", "healthy", "recovered"))

    m = BackupMetrics(failing, "postgres", "db1")
    m.record_backup_result(True, now - 600, duration_seconds=3, size_bytes=1000)
    m.record_backup_result(False, now)
    m.record_schedule(interval_seconds=3600)
    m.push(pushgateway_server.url)

    m = BackupMetrics(shrunk, "redis", "cache")   # the size policy failed this run; the ratio still ships
    m.record_backup_result(False, now)
    m.record_size_change_ratio(0.1)
    m.push(pushgateway_server.url)

    m = BackupMetrics(stale, "files", "node1")     # hourly job, last success 3 h ago
    m.record_backup_result(True, now - 3 * 3600, duration_seconds=3, size_bytes=1000)
    m.record_schedule(cron_expression="0 * * * *")
    m.record_verification(True, now - 3 * 3600)
    m.record_retention(kept=3, pruned=0, finished_at=now - 3 * 3600)
    m.push(pushgateway_server.url)

    m = BackupMetrics(healthy, "postgres", "db2")
    m.record_backup_result(True, now, duration_seconds=3, size_bytes=1000, size_change_ratio=1.1)
    m.record_schedule(cron_expression="0 2 * * *")
    m.record_verification(True, now)
    m.record_drill(True, now, duration_seconds=40)
    m.record_retention(kept=3, pruned=1, finished_at=now)
    m.push(pushgateway_server.url)

    m = BackupMetrics(recovered, "files", "node2")  # failed, then succeeded
    m.record_backup_result(False, now - 600)
    m.record_backup_result(True, now, duration_seconds=3, size_bytes=1000)
    m.push(pushgateway_server.url)

    jobs = {failing, shrunk, stale, healthy, recovered}
    expected = {("BackupJobFailing", failing, None), ("BackupJobFailing", shrunk, None),
                ("BackupSizeAnomaly", shrunk, None), ("BackupFailed", stale, None)}
    seen = wait_until(lambda: expected <= firing(prometheus, jobs) and firing(prometheus, jobs),
                      "BackupJobFailing, BackupSizeAnomaly and BackupFailed to fire")
    assert not {alert for alert in seen if alert[1] in (healthy, recovered)}, seen
    assert seen == expected, seen
    # the dashboard's "Jobs whose last attempt failed" counts exactly the jobs BackupJobFailing fires for:
    # one that failed after a success and one that never succeeded, not the recovered one
    failing_jobs = {job for alertname, job, _reason in seen if alertname == "BackupJobFailing"}
    assert failing_jobs == {failing, shrunk}
    full, counted = failed_jobs_panel_query(load_dashboard())
    only_these = '{job=~"%s"' % "|".join(sorted(jobs))
    selected = {item["metric"]["job"] for item in api(
        prometheus, "/api/v1/query", query=counted.replace('{job=~".*"', only_these))["result"]}
    assert selected == failing_jobs, selected
    counts = [float(item["value"][1]) for item in api(
        prometheus, "/api/v1/query", query=full.replace('{job=~".*"', only_these))["result"]]
    assert counts == [float(len(failing_jobs))], counts
    # the pushed grouping key survives the scrape (honor_labels) and reaches the alert
    labels = [a["labels"] for a in api(prometheus, "/api/v1/alerts")["alerts"] if a["labels"].get("job") == stale]
    assert labels and all(item["kind"] == "files" and item["instance"] == "node1" for item in labels)


DRILL_PHASES = {"select": 0.5, "verify": 20.0, "prepare": 1.5, "transfer": 45.0, "load": 15.0, "checks": 3.0,
                "total": 85.0}


def test_every_dashboard_query_returns_the_pushed_values(pushgateway_server, prometheus):
    job = unique("dash")
    now = time.time()
    for pruned in (2, 3):   # two runs so the counter increases between scrapes
        m = BackupMetrics(job, "postgres", "db1")
        m.record_backup_result(True, now, duration_seconds=12, size_bytes=4096, size_change_ratio=1.5)
        m.record_backup_result(False, now - 60)
        m.record_schedule(interval_seconds=86400)
        m.record_verification(True, now - 7200)
        m.record_drill(True, now - 3600, duration_seconds=95)
        m.record_drill_phases(DRILL_PHASES)
        m.record_retention(kept=7, pruned=pruned, finished_at=now)
        m.record_copy(False, now - 900)   # an older failed copy, then a good one
        m.record_copy(True, now - 300, lag_seconds=0, bytes_copied=8192)
        m.record_wal_gap(now - 7200)   # an old gap, WAL stored since
        m.record_wal_stream(True, reported_at=now, last_archived_at=now - 30, lag_bytes=16384, lag_seconds=4,
                            segments_stored=pruned, window_start=now - 86400, window_end=now - 30)
        m.push(pushgateway_server.url)
        if pruned == 2:
            wait_until(lambda: api(prometheus, "/api/v1/query",
                                   query='backup_retention_pruned_total{job="%s"}' % job)["result"],
                       "the first push to be scraped")
            time.sleep(2)   # at least one more scrape of the first value before the second push

    with open(DASHBOARD, encoding="utf-8") as handle:
        dashboard = json.load(handle)
    panels = [p for p in dashboard["panels"] + [c for p in dashboard["panels"] for c in p.get("panels", [])]
              if p.get("targets")]
    assert panels
    for panel in panels:
        for target in panel["targets"]:
            expr = (target["expr"].replace("$job", job).replace("$kind", ".*").replace("$instance", ".*")
                    .replace("$__range", "10m"))

            def values(expr=expr):
                return [float(item["value"][1]) for item in api(prometheus, "/api/v1/query", query=expr)["result"]]

            if "backup_retention_pruned_total" in expr or "backup_wal_segments_stored_total" in expr:
                got = wait_until(lambda: [v for v in values() if v > 0], "an increase of the counter")
            else:
                got = wait_until(values, "panel %r to return data" % panel["title"])
            assert len(got) == 1, (panel["title"], got)
            if expr.startswith("backup_size_bytes"):
                assert got == [4096.0]
            elif expr.startswith("backup_restore_drill_duration_seconds"):
                assert got == [95.0]
            elif expr.startswith("backup_restore_drill_phase_seconds"):
                phase = expr.split('phase="')[1].split('"')[0]
                assert got == [DRILL_PHASES[phase]], phase
            elif expr.startswith("backup_duration_seconds"):
                assert got == [12.0]
            elif expr.startswith("backup_retention_kept"):
                assert got == [7.0]
            elif expr.startswith("time() - backup_last_verified_timestamp_seconds"):
                assert 7200 <= got[0] < 7200 + 600
            elif expr.startswith("count("):
                assert got == [0.0]   # the failure is older than the success
            elif expr.startswith("backup_copy_bytes"):
                assert got == [8192.0]
            elif expr.startswith("backup_copy_lag_seconds"):
                assert got == [0.0]
            elif expr.startswith("time() - backup_copy_last_success_timestamp_seconds"):
                assert 300 <= got[0] < 300 + 600
            elif expr.startswith("backup_wal_recovery_window_start_timestamp_seconds"):
                assert got[0] == pytest.approx((now - 86400) * 1000, abs=1)
            elif expr.startswith("backup_wal_recovery_window_end_timestamp_seconds"):
                if "- backup_wal_recovery_window_start" in expr:
                    assert got[0] == pytest.approx(86400 - 30, abs=0.01)
                else:
                    assert got[0] == pytest.approx((now - 30) * 1000, abs=1)
            elif expr.startswith("backup_wal_archive_lag_seconds"):
                assert got == [4.0]
            elif expr.startswith("backup_wal_archive_lag_bytes"):
                assert got == [16384.0]
            elif expr.startswith("time() - backup_wal_last_archived_timestamp_seconds"):
                assert 30 <= got[0] < 30 + 600


# -- the WAL stream's metrics (runner wal-stream against a real PostgreSQL 15) -----------------

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def wal_server():
    from servers import server_dir, start_postgres
    with server_dir("walmetrics") as base:
        try:
            server = start_postgres(base)
        except ServerStartError as exc:
            require_or_skip(str(exc))
        try:
            yield server
        finally:
            server.process.stop()


def _write(server, rows=2000, switch=False):
    with server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (id serial, payload text)")
        conn.execute("INSERT INTO t (payload) SELECT repeat(md5(g::text), 10) FROM generate_series(1, %s) g" % rows)
        if switch:
            conn.execute("SELECT pg_switch_wal()")
        return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def test_wal_stream_pushes_lag_window_and_gaps_while_it_runs(wal_server, pushgateway_server, tmp_path):
    """A bounded wal-stream pushes its metrics every report interval; a lost slot sets the gap metrics."""
    job = unique("walm")
    wal_job = job + "-wal"
    heartbeat = tmp_path / "heartbeat"
    options = {"host": wal_server.host, "port": wal_server.port, "user": "postgres", "bin_dir": wal_server.bin_dir,
               "slot": "metrics_slot", "spool_dir": str(tmp_path / "spool"), "partial_interval": 1}
    config = tmp_path / "job.yml"
    config.write_text(yaml.safe_dump({
        "job": job, "kind": "postgres_base", "source": options,
        "storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
        "metrics": {"pushgateway_url": pushgateway_server.url, "instance": "db1"}}))
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"), BACKUP_HEARTBEAT_FILE=str(heartbeat))

    def run(*argv, **kwargs):
        return subprocess.run([sys.executable, "-m", RUNNER, *argv, "--config", str(config)], env=env, cwd="/",
                              capture_output=True, text=True, timeout=300, check=False, **kwargs)

    def wal_samples():
        return {name: value for (name, instance, kind), (value, _type)
                in gateway_samples(pushgateway_server, wal_job).items()
                if instance == "db1" and kind == "postgres_base"}

    def samples_when(condition):
        found = wal_samples()
        return found if condition(found) else None

    done = run("wal-stream", "--duration", "1")   # the slot, before the base backup
    assert done.returncode == 0, done.stderr
    done = run("backup")
    assert done.returncode == 0, done.stderr
    base_done = json.loads(done.stdout)["stats"]["completed_at"]
    _write(wal_server, switch=True)

    started = time.time()
    stream = subprocess.Popen([sys.executable, "-m", RUNNER, "wal-stream", "--duration", "40", "--config",
                               str(config)], env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        # While it runs: up, a fresh heartbeat, the window from the base backup to the newest WAL.
        seen = wait_until(lambda: samples_when(lambda s: s.get("backup_wal_stream_up") == 1
                                               and "backup_wal_archive_lag_bytes" in s
                                               and "backup_wal_recovery_window_start_timestamp_seconds" in s),
                          "a report of the running stream with the recovery window", timeout=30)
        assert seen["backup_wal_stream_heartbeat_timestamp_seconds"] >= started - 1
        assert seen["backup_wal_recovery_window_start_timestamp_seconds"] == pytest.approx(
            datetime.datetime.fromisoformat(base_done.replace("Z", "+00:00")).timestamp(), abs=0.001)
        assert (seen["backup_wal_recovery_window_start_timestamp_seconds"]
                < seen["backup_wal_recovery_window_end_timestamp_seconds"] <= time.time())
        # The window ends where a restore could reach (a partial copy's reach_time or last commit),
        # at most when the newest file was stored (whole seconds in the manifest).
        assert (seen["backup_wal_recovery_window_end_timestamp_seconds"]
                < seen["backup_wal_last_archived_timestamp_seconds"] + 1)
        assert seen["backup_wal_segments_stored_total"] >= 1   # the switched segment
        assert seen["backup_wal_archive_lag_seconds"] >= 0 and seen["backup_wal_archive_lag_bytes"] >= 0
        assert time.time() - heartbeat.stat().st_mtime < 5
        # The server writes two segments' worth: the stream catches up, the counter moves and the
        # lag comes back to (about) nothing once the partial copy holds the last write.
        before = seen["backup_wal_segments_stored_total"]
        for _round in range(4):
            _write(wal_server, rows=40000)
        _write(wal_server, rows=10)
        caught_up = wait_until(lambda: samples_when(lambda s: s.get("backup_wal_segments_stored_total", 0) >= before + 2
                                                    and s.get("backup_wal_archive_lag_bytes") == 0),
                               "the stream to store the new segments and catch up", timeout=30)
        assert caught_up["backup_wal_archive_lag_seconds"] == 0
        assert caught_up["backup_wal_last_archived_timestamp_seconds"] >= started
        # A write the stream has not stored yet shows as lag: pg_receivewal is held (SIGSTOP) while
        # the runner goes on reporting. (Holding the runner itself would show nothing: on waking it
        # stores the partial copy before its next report.)
        children = _read("/proc/%d/task/%d/children" % (stream.pid, stream.pid)).split()
        receiver = next(int(pid) for pid in children if _read("/proc/%s/comm" % pid).strip() == "pg_receivewal")
        os.kill(receiver, signal.SIGSTOP)
        try:
            _write(wal_server, rows=500)
            lagging = wait_until(lambda: samples_when(lambda s: s.get("backup_wal_archive_lag_bytes", 0) > 0),
                                 "a report with the write not stored yet", timeout=30)
        finally:
            os.kill(receiver, signal.SIGCONT)
        assert lagging["backup_wal_archive_lag_seconds"] > 0
        out, err = stream.communicate(timeout=120)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.communicate()
    assert stream.returncode == 0, err
    result = json.loads(out)
    final = wal_samples()
    assert final["backup_wal_stream_up"] == 0     # a bounded run ends: the stream is down
    assert final["backup_wal_archive_lag_bytes"] == 0 and final["backup_wal_archive_lag_seconds"] == 0
    assert final["backup_wal_segments_stored_total"] >= before + 2 and result["gaps"] == []
    assert "backup_wal_gaps_total" not in final
    # The last report's window end is what a restore to "latest" reaches, to the microsecond.
    reach = pitr.plan_restore(open_storage({"backend": "filesystem", "path": str(tmp_path / "store")}), job,
                              pitr.LATEST).stored_until
    assert final["backup_wal_recovery_window_end_timestamp_seconds"] == pytest.approx(
        datetime.datetime.fromisoformat(reach.replace("Z", "+00:00")).timestamp(), abs=1e-6)

    # The slot dropped and the spool lost while the server moves on: a gap, exit 3.
    with wal_server.connect() as conn:
        conn.execute("SELECT pg_drop_replication_slot('metrics_slot')")
    shutil.rmtree(tmp_path / "spool")
    for _round in range(3):
        _write(wal_server, rows=10, switch=True)
    with wal_server.connect() as conn:
        conn.execute("CHECKPOINT")
    detected = time.time()
    done = run("wal-stream", "--duration", "5")
    assert done.returncode == 3, done.stderr
    assert "gap" in done.stderr
    gap = wal_samples()
    assert gap["backup_wal_gaps_total"] == 1 and gap["backup_wal_stream_up"] == 0
    assert detected - 1 <= gap["backup_wal_last_gap_timestamp_seconds"] <= time.time()
    assert gap["backup_wal_last_gap_timestamp_seconds"] > gap["backup_wal_last_archived_timestamp_seconds"]
    # Each run that meets the gap counts it: the counter continues on the gateway.
    assert run("wal-stream", "--duration", "5").returncode == 3
    assert wal_samples()["backup_wal_gaps_total"] == 2


def _slot_holder(server, slot):
    with server.connect() as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        return row[0] if row else None  # the stream creates its slot when it starts


def test_a_daemon_stream_that_reconnects_is_not_left_failing(wal_server, pushgateway_server, tmp_path):
    """A lost connection whose first retry works records no failed attempt; a retry that fails too
    records one, and the first file stored after reconnecting records a success, so that
    BackupJobFailing (failure newer than success) ends with the outage."""
    job = unique("walr")
    wal_job = job + "-wal"
    slot = "reconnect_slot"
    config = tmp_path / "job.yml"
    config.write_text(yaml.safe_dump({
        "job": job, "kind": "postgres_base",
        "source": {"host": wal_server.host, "port": wal_server.port, "user": "postgres", "bin_dir": wal_server.bin_dir,
                   "slot": slot, "spool_dir": str(tmp_path / "spool"), "partial_interval": 1},
        "storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
        "metrics": {"pushgateway_url": pushgateway_server.url, "instance": "db1"}}))
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    errors = tmp_path / "stream.log"

    def samples():
        return {name: value for (name, instance, kind), (value, _type)
                in gateway_samples(pushgateway_server, wal_job).items() if instance == "db1"}

    def holder_changed(old):
        pid = _slot_holder(wal_server, slot)
        return pid if pid not in (None, old) else None

    with open(errors, "w", encoding="utf-8") as log_file:
        stream = subprocess.Popen([sys.executable, "-m", RUNNER, "wal-stream", "--config", str(config)], env=env,
                                  cwd="/", stdout=subprocess.DEVNULL, stderr=log_file)
    blocker = None
    try:
        first = wait_until(lambda: holder_changed(None), "the daemon's walsender on the slot", timeout=60)
        _write(wal_server, rows=10)
        wait_until(lambda: samples().get("backup_wal_stream_up") == 1, "the running stream's report", timeout=30)
        # 1. The connection is cut once: the retry connects again, no failed attempt is recorded.
        with wal_server.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (first,))
        second = wait_until(lambda: holder_changed(first), "the daemon to reconnect", timeout=60)
        assert errors.read_text().count("streaming again") == 1
        assert "backup_last_failure_timestamp_seconds" not in samples()
        # 2. Cut again, and another receiver takes the slot: the retry fails, a failure is recorded.
        with wal_server.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (second,))
        blocker_dir = tmp_path / "blocker"
        blocker_dir.mkdir()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            blocker = subprocess.Popen(
                [os.path.join(wal_server.bin_dir, "pg_receivewal"), "--host", wal_server.host, "--port",
                 str(wal_server.port), "--username", "postgres", "--slot", slot, "--directory", str(blocker_dir),
                 "--no-loop", "--no-password"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            if blocker.poll() is None:
                break
        assert blocker.poll() is None, "no second receiver could take the slot"
        failed = wait_until(lambda: samples().get("backup_last_failure_timestamp_seconds"),
                            "a failed attempt after the retry failed", timeout=60)
        # The next retry fails too (its first sweep may store what the spool held: that is no
        # sign of a working stream, and no success may be recorded for it). The retries wait 5,
        # 10, 30, 60 s: how many happened by a fixed time depended on when the failure was seen
        # (a fixed 12 s sleep failed now and then), so the test waits for the fourth attempt.
        wait_until(lambda: errors.read_text().count("streaming again") >= 4, "a retry that fails again",
                   timeout=90)
        assert samples().get("backup_last_success_timestamp_seconds", 0) < failed
        # 3. The slot is free again: the daemon reconnects, stores a file, and records a success.
        blocker.terminate()
        blocker.wait(timeout=30)
        wait_until(lambda: holder_changed(None), "the daemon to take the slot back", timeout=120)
        _write(wal_server, rows=10)
        recovered = wait_until(lambda: samples_when_success_after(samples(), failed), "a success after the failure",
                               timeout=60)
        assert recovered["backup_wal_stream_up"] == 1
        assert stream.poll() is None  # a daemon: it never gave up
    finally:
        if blocker is not None and blocker.poll() is None:
            blocker.kill()
            blocker.wait()
        stream.terminate()
        try:
            stream.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stream.kill()
            stream.wait()


def samples_when_success_after(found, failed):
    return found if found.get("backup_last_success_timestamp_seconds", 0) >= failed else None
