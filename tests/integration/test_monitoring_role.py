# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The biometrics.backup.monitoring role, run with the real ansible-playbook.

Render-only tests write the files into a temporary directory and check them with the real
``promtool`` (Debian ``prometheus``): ``promtool check rules`` on the exact rules file the
role wrote, and ``promtool test rules`` with tests/promtool/*.test.yml placed next to it.
The cluster tests apply the PrometheusRule and the dashboard ConfigMap to the real
kube-apiserver of ``kube_cluster`` (the PrometheusRule CRD comes from hack/crds).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from ci_env import REPO_ROOT, require_or_skip
from unit.test_dashboard import failed_jobs_agreement_tests, failed_jobs_panel_query, run_promtool_test

ROLE_DIR = os.path.join(REPO_ROOT, "roles", "monitoring")
PROMTOOL_TESTS = os.path.join(REPO_ROOT, "tests", "promtool")
RULES_FILE = "biometrics-backup.rules.yml"
DEFAULT_ALERTS = ["BackupFailed", "BackupJobFailing", "BackupSizeAnomaly", "BackupVerificationFailed",
                  "BackupNotVerified", "BackupNotVerified", "RestoreDrillFailed", "RetentionNotRunning",
                  "RetentionNotRunning", "BackupCopyLagging", "BackupCopyFailing", "WalStreamStalled",
                  "WalStreamStalled", "WalGapDetected"]

PLAYBOOK = """\
- name: biometrics.backup.monitoring under test
  hosts: localhost
  gather_facts: false
  roles:
    - role: biometrics.backup.monitoring
"""


def _tool(name):
    path = shutil.which(name)
    if path is None:
        require_or_skip("%s not found (Debian package prometheus; make deps)" % name)
    return path


def promtool(*args, cwd=None):
    return subprocess.run([_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)


def run_role(tmp_path, role_vars, check=False, diff=False, env=None):
    """Run the role through ansible-playbook; returns (returncode, parsed json callback output)."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(role_vars))
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    command = [shutil.which("ansible-playbook") or _tool("ansible-playbook"), "-i", str(inventory),
               "-e", "@%s" % vars_file, str(playbook)]
    if check:
        command.append("--check")
    if diff:
        command.append("--diff")
    run_env = dict(env or os.environ)
    run_env.update(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"), ANSIBLE_RETRY_FILES_ENABLED="0")
    result = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=600, check=False)
    try:
        output = json.loads(result.stdout)
    except ValueError:
        raise AssertionError("ansible-playbook printed no JSON (rc=%s):\n%s\n%s"
                             % (result.returncode, result.stdout[-3000:], result.stderr[-3000:])) from None
    return result.returncode, output


def stats(output):
    return output["stats"]["localhost"]


def task_results(output, name):
    """Results of the task called ``name`` (the items of a loop, or the one result)."""
    for play in output["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].split(" : ", 1)[-1] == name:
                result = task["hosts"]["localhost"]
                return result.get("results", [result])
    raise AssertionError("task %r did not run" % name)


def failure_messages(output):
    messages = []
    for play in output["plays"]:
        for task in play["tasks"]:
            for result in task["hosts"].values():
                if result.get("failed"):
                    messages.append(str(result.get("msg")))
    return messages


def render(tmp_path, extra=None, name="out"):
    out = tmp_path / name
    rc, output = run_role(tmp_path, dict({"monitoring_render_dir": str(out)}, **(extra or {})))
    assert rc == 0, failure_messages(output)
    return out, output


def promtool_unit_tests(rules_dir, *test_files):
    for test_file in test_files:
        shutil.copy(os.path.join(PROMTOOL_TESTS, test_file), rules_dir / test_file)
    result = promtool("test", "rules", *test_files, cwd=str(rules_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(test_files), result.stdout


# ---------------------------------------------------------------------- render only

def test_rendered_rules_file_passes_promtool_check_and_the_alert_unit_tests(tmp_path):
    out, output = render(tmp_path)
    rules_path = out / RULES_FILE
    checked = promtool("check", "rules", str(rules_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: %d rules found" % len(DEFAULT_ALERTS) in checked.stdout
    rules = yaml.safe_load(rules_path.read_text())
    assert [rule["alert"] for group in rules["groups"] for rule in group["rules"]] == DEFAULT_ALERTS
    # firing and non-firing cases of every alert, on exactly this file
    promtool_unit_tests(out, "alerts-minutes.test.yml", "alerts-hours.test.yml", "alerts-copy.test.yml",
                        "alerts-wal.test.yml")
    assert stats(output)["failures"] == 0
    assert sorted(os.listdir(out)) == sorted(["alerts-hours.test.yml", "alerts-minutes.test.yml",
                                              "alerts-copy.test.yml", "alerts-wal.test.yml", RULES_FILE,
                                              "dashboard-configmap.yml", "prometheusrule.yml"])
    # the dashboard the role ships counts the jobs this rules file's BackupJobFailing fires for
    configmap = yaml.safe_load((out / "dashboard-configmap.yml").read_text())
    (dashboard_json,) = configmap["data"].values()
    agreement = run_promtool_test(out, str(rules_path),
                                  failed_jobs_agreement_tests(failed_jobs_panel_query(json.loads(dashboard_json))))
    assert agreement.returncode == 0, agreement.stdout + agreement.stderr


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The alert unit tests fail when the rendered rules differ (here: another size bound)."""
    out, _output = render(tmp_path, {"monitoring_size_ratio_high": 2.4})
    shutil.copy(os.path.join(PROMTOOL_TESTS, "alerts-minutes.test.yml"), out)
    result = promtool("test", "rules", "alerts-minutes.test.yml", cwd=str(out))
    report = result.stdout + result.stderr
    assert result.returncode != 0
    assert "FAILED" in report and "alertname: BackupSizeAnomaly" in report
    assert "alertname: BackupFailed" not in report


def test_the_copy_lag_factor_moves_the_copy_alert_and_its_unit_tests_notice(tmp_path):
    """3 intervals instead of 2: a lag of 3 h on an hourly job no longer fires, a stalled copy later."""
    out, _output = render(tmp_path, {"monitoring_copy_lag_factor": 3})
    rules = yaml.safe_load((out / RULES_FILE).read_text())
    (lagging,) = [rule for rule in rules["groups"][0]["rules"] if rule["alert"] == "BackupCopyLagging"]
    assert "3.0 * backup_schedule_interval_seconds" in lagging["expr"]
    shutil.copy(os.path.join(PROMTOOL_TESTS, "alerts-copy.test.yml"), out)
    result = promtool("test", "rules", "alerts-copy.test.yml", cwd=str(out))
    report = result.stdout + result.stderr
    assert result.returncode != 0
    assert "alertname: BackupCopyLagging, time: 6h" in report and "alertname: BackupCopyFailing" not in report


def test_the_wal_stall_minutes_move_the_stall_alert_and_its_unit_tests_notice(tmp_path):
    """With 20 minutes the stalled stream of alerts-wal.test.yml does not alert at 15 and 16 minutes."""
    out, _output = render(tmp_path, {"monitoring_wal_stall_minutes": 20})
    assert "backup_wal_archive_lag_seconds > 1200" in (out / RULES_FILE).read_text()
    shutil.copy(os.path.join(PROMTOOL_TESTS, "alerts-wal.test.yml"), out)
    result = promtool("test", "rules", "alerts-wal.test.yml", cwd=str(out))
    report = result.stdout + result.stderr
    assert result.returncode != 0
    assert "alertname: WalStreamStalled, time: 15m" in report and "alertname: WalStreamStalled, time: 16m" in report
    assert "alertname: WalGapDetected" not in report


def test_the_copy_alerts_can_be_disabled(tmp_path):
    out, _output = render(tmp_path, {"monitoring_alerts_disabled": ["BackupCopyLagging", "BackupCopyFailing"]})
    rules = yaml.safe_load((out / RULES_FILE).read_text())
    assert [rule["alert"] for rule in rules["groups"][0]["rules"]] == [
        name for name in DEFAULT_ALERTS if name not in ("BackupCopyLagging", "BackupCopyFailing")]


def test_prometheusrule_carries_exactly_the_rules_file(tmp_path):
    out, _output = render(tmp_path, {"monitoring_namespace": "observability",
                                     "monitoring_rule_labels": {"release": "kube-prometheus-stack"}})
    rule = yaml.safe_load((out / "prometheusrule.yml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "biometrics-backup-alerts"
    assert rule["metadata"]["namespace"] == "observability"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((out / RULES_FILE).read_text())
    # the operator hands spec to Prometheus as a rules file: check that form too
    spec_file = tmp_path / "spec.rules.yml"
    spec_file.write_text(yaml.safe_dump(rule["spec"]))
    checked = promtool("check", "rules", str(spec_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_configmap_holds_the_dashboard_with_the_grafana_label(tmp_path):
    out, _output = render(tmp_path, {"monitoring_dashboard_namespace": "grafana",
                                     "monitoring_dashboard_labels": {"team": "storage"},
                                     "monitoring_dashboard_annotations": {"grafana_folder": "Backups"}})
    configmap = yaml.safe_load((out / "dashboard-configmap.yml").read_text())
    assert configmap["kind"] == "ConfigMap" and configmap["apiVersion"] == "v1"
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["labels"]["team"] == "storage"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Backups"}
    (key, text), = configmap["data"].items()
    assert key.endswith(".json")
    with open(os.path.join(ROLE_DIR, "files", "backup-dashboard.json"), encoding="utf-8") as handle:
        assert json.loads(text) == json.load(handle)


def test_options_change_the_rules(tmp_path):
    """Thresholds, for, extra labels, runbook links and disabling, checked by promtool."""
    with open(os.path.join(PROMTOOL_TESTS, "custom-vars.yml"), encoding="utf-8") as handle:
        custom = yaml.safe_load(handle)
    out, _output = render(tmp_path, dict(custom, monitoring_service_monitor_enabled=True,
                                         monitoring_service_monitor_target_namespace="gateway"))
    checked = promtool("check", "rules", str(out / RULES_FILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = yaml.safe_load((out / RULES_FILE).read_text())
    assert "RetentionNotRunning" not in [rule["alert"] for rule in rules["groups"][0]["rules"]]
    assert rules["groups"][0]["interval"] == "1m"
    promtool_unit_tests(out, "alerts-custom.test.yml")
    monitor = yaml.safe_load((out / "servicemonitor.yml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["gateway"]}


def test_check_mode_diff_idempotence_and_removal(tmp_path):
    out = tmp_path / "out"
    base = {"monitoring_render_dir": str(out)}

    rc, output = run_role(tmp_path, base, check=True)
    assert rc == 0, failure_messages(output)
    assert stats(output)["changed"] > 0
    assert not out.exists(), "check mode wrote files"

    rc, output = run_role(tmp_path, base)
    assert rc == 0 and stats(output)["changed"] > 0
    before = (out / RULES_FILE).read_text()

    rc, output = run_role(tmp_path, base)
    assert rc == 0 and stats(output)["changed"] == 0, "second run changed something"

    # a new bound changes the rules file and the PrometheusRule manifest, nothing else
    rc, output = run_role(tmp_path, dict(base, monitoring_size_ratio_high=4), check=True, diff=True)
    assert rc == 0 and stats(output)["changed"] == 2
    manifests = {result["item"]["file"]: result["changed"]
                 for result in task_results(output, "Render the Kubernetes manifests")}
    assert manifests == {"prometheusrule.yml": True, "dashboard-configmap.yml": False}
    (rules_result,) = task_results(output, "Render the alert rules as a plain Prometheus rules file")
    assert rules_result["changed"]
    diff = rules_result["diff"][0] if isinstance(rules_result["diff"], list) else rules_result["diff"]
    assert "backup_size_change_ratio > 2.0" in diff["before"]
    assert "backup_size_change_ratio > 4.0" in diff["after"]
    assert (out / RULES_FILE).read_text() == before, "check mode changed the file"

    rc, output = run_role(tmp_path, dict(base, monitoring_dashboard_enabled=False))
    assert rc == 0
    assert not (out / "dashboard-configmap.yml").exists()

    rc, output = run_role(tmp_path, dict(base, monitoring_state="absent"))
    assert rc == 0 and stats(output)["changed"] > 0
    assert sorted(os.listdir(out)) == []


@pytest.mark.parametrize("bad, message", [
    ({"monitoring_size_ratio_low": 1.5}, "monitoring_size_ratio_low must be below 1"),
    ({"monitoring_alert_labels": {"severity": "page"}}, "must not set alertname"),
    ({"monitoring_alerts_disabled": ["BackupExploded"]}, "BackupExploded"),
    ({"monitoring_staleness_factor": "often"}, "monitoring_staleness_factor"),
])
def test_invalid_options_fail_before_anything_is_written(tmp_path, bad, message):
    out = tmp_path / "out"
    rc, output = run_role(tmp_path, dict({"monitoring_render_dir": str(out)}, **bad))
    assert rc != 0
    assert any(message in text for text in failure_messages(output)), failure_messages(output)
    assert not out.exists()


# ---------------------------------------------------------------------- real cluster

def _custom_objects(kube_api):
    import kubernetes  # pylint: disable=import-outside-toplevel
    return kubernetes.client.CustomObjectsApi(kube_api), kubernetes.client.CoreV1Api(kube_api)


def _get_rule(custom, namespace, name="biometrics-backup-alerts"):
    import kubernetes  # pylint: disable=import-outside-toplevel
    try:
        return custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "prometheusrules", name)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_apply_to_a_real_cluster(tmp_path, kube_cluster, kube_api, kube_namespace):
    custom, core = _custom_objects(kube_api)
    base = {"monitoring_namespace": kube_namespace, "monitoring_kubeconfig": kube_cluster.kubeconfig}

    rc, output = run_role(tmp_path, base, check=True, env=kube_cluster.env)
    assert rc == 0, failure_messages(output)
    assert stats(output)["changed"] > 0
    assert _get_rule(custom, kube_namespace) is None, "check mode created the PrometheusRule"

    rc, output = run_role(tmp_path, base, env=kube_cluster.env)
    assert rc == 0, failure_messages(output)
    rule = _get_rule(custom, kube_namespace)
    rendered, _output = render(tmp_path, {"monitoring_namespace": kube_namespace}, name="rendered")
    assert rule["spec"] == yaml.safe_load((rendered / RULES_FILE).read_text())
    assert rule["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "biometrics.backup"
    configmap = core.read_namespaced_config_map("biometrics-backup-dashboard", kube_namespace)
    assert configmap.metadata.labels["grafana_dashboard"] == "1"
    with open(os.path.join(ROLE_DIR, "files", "backup-dashboard.json"), encoding="utf-8") as handle:
        assert json.loads(configmap.data["biometrics-backup.json"]) == json.load(handle)

    rc, output = run_role(tmp_path, base, env=kube_cluster.env)
    assert rc == 0 and stats(output)["changed"] == 0, "second apply changed something"

    rc, output = run_role(tmp_path, dict(base, monitoring_size_ratio_low=0.2), check=True, diff=True,
                          env=kube_cluster.env)
    assert rc == 0 and stats(output)["changed"] == 1
    assert "backup_size_change_ratio < 0.5" in json.dumps(_get_rule(custom, kube_namespace)["spec"])

    rc, output = run_role(tmp_path, dict(base, monitoring_size_ratio_low=0.2), env=kube_cluster.env)
    assert rc == 0 and stats(output)["changed"] == 1
    assert "backup_size_change_ratio < 0.2" in json.dumps(_get_rule(custom, kube_namespace)["spec"])

    rc, output = run_role(tmp_path, dict(base, monitoring_state="absent"), env=kube_cluster.env)
    assert rc == 0 and stats(output)["changed"] > 0
    assert _get_rule(custom, kube_namespace) is None
    assert "biometrics-backup-dashboard" not in [
        item.metadata.name for item in core.list_namespaced_config_map(kube_namespace).items]
