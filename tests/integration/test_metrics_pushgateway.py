# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/metrics.py against a real Pushgateway, and what a real Prometheus makes of it.

The engine pushes to the ``pushgateway_server`` fixture (Debian prometheus-pushgateway) and
the tests read the values back from the gateway's /metrics. Then a real Prometheus (Debian
``prometheus``) scrapes that gateway with honor_labels, loads the rules file rendered by the
monitoring role, and the tests check that the alerts fire (and stay quiet) for what the
engine pushed, and that every dashboard query returns the pushed values.
"""

import json
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_or_skip
from server_fixtures import ServerProcess, ServerStartError, _http_status, free_port

from ansible_collections.biometrics.backup.plugins.module_utils.engine import metrics
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.metrics import BackupMetrics, MetricsError

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
    m.record_backup_result(True, 1_700_000_000, duration_seconds=12.5, size_bytes=4096, size_change_ratio=1.25)
    m.record_backup_result(False, 1_700_000_100)
    m.record_schedule(cron_expression="0 2 * * *")
    m.record_verification(True, 1_700_000_200)
    m.record_verification(False, 1_700_000_300)
    m.record_drill(True, 1_700_000_400, duration_seconds=30)
    m.record_drill(False, 1_700_000_500)
    m.record_retention(kept=7, pruned=2, finished_at=1_700_000_600)
    m.record_copy(True, 1_700_000_700, lag_seconds=3600, bytes_copied=1 << 20)
    m.record_copy(False, 1_700_000_800)
    assert m.push(pushgateway_server.url) == {"job": job, "kind": "postgres", "instance": "db1"}

    got = gateway_samples(pushgateway_server, job)
    assert {key[0] for key in got} == metrics.metric_names()
    expected = dict(m.recorded, backup_schedule_interval_seconds=86400.0)
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
    url = "http://127.0.0.1:%d" % free_port()      # nothing listens there
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
    port = free_port()
    process = ServerProcess("prometheus", [
        "prometheus", "--config.file=%s" % config, "--storage.tsdb.path=%s" % os.path.join(base, "data"),
        "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
        os.path.join(base, "prometheus.log"), cwd=base)
    url = "http://127.0.0.1:%d" % port
    try:
        process.start()
        process.wait_ready(lambda: _http_status(url + "/-/ready") == 200)
    except ServerStartError as exc:
        process.stop()
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
        m.record_retention(kept=7, pruned=pruned, finished_at=now)
        m.record_copy(False, now - 900)   # an older failed copy, then a good one
        m.record_copy(True, now - 300, lag_seconds=0, bytes_copied=8192)
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

            if "backup_retention_pruned_total" in expr:
                got = wait_until(lambda: [v for v in values() if v > 0], "an increase of the pruned counter")
            else:
                got = wait_until(values, "panel %r to return data" % panel["title"])
            assert len(got) == 1, (panel["title"], got)
            if expr.startswith("backup_size_bytes"):
                assert got == [4096.0]
            elif expr.startswith("backup_restore_drill_duration_seconds"):
                assert got == [95.0]
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
