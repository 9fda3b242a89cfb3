# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Grafana dashboard and the alert rules query only metrics the engine emits.

Every PromQL expression of the dashboard (panel targets and template variables) and of the
alert rules template is reduced to the metric names it selects, which must all be in
``engine.metrics.metric_names()``. The dashboard's expressions are also parsed by the real
``promtool`` (as recording rules), so a typo cannot pass as "no metric at all".

The panel "Jobs whose last attempt failed" and the alert ``BackupJobFailing`` are evaluated
by ``promtool test rules`` on the same series (the BackupJobFailing case of
tests/promtool/alerts-minutes.test.yml) and must name the same jobs.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from ci_env import REPO_ROOT, require_or_skip

from ansible_collections.biometrics.backup.plugins.module_utils.engine import metrics

DASHBOARD = os.path.join(REPO_ROOT, "roles", "monitoring", "files", "backup-dashboard.json")
RULES_TEMPLATE = os.path.join(REPO_ROOT, "roles", "monitoring", "templates", "backup-alerts.rules.yml.j2")
PROMTOOL_TESTS = os.path.join(REPO_ROOT, "tests", "promtool")
FAILED_JOBS_PANEL = "Jobs whose last attempt failed"
JOB_LABELS = ("job", "kind", "instance")

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-zA-Z]*)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def grafana_to_promql(expr):
    """Replace Grafana's variables ($job, ${job}, $__range, [[job]]) by PromQL-valid stand-ins."""
    expr = re.sub(r"\$__(?:range|rate_interval|interval)\b", "1h", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?|\[\[\w+\]\]", ".*", expr)


def metric_names_in(expr):
    """The metric names a PromQL expression selects (functions, keywords, labels removed)."""
    text = _STRING.sub('""', grafana_to_promql(expr))
    text = re.sub(r"\{[^}]*\}", " ", text)          # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)         # range and subquery durations
    text = _GROUPING.sub(" ", text)                 # by (...), on (...), group_left (...)
    text = _NUMBER.sub(" ", text)                   # numbers and durations (offset 1h)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue                                # a function, aggregation or keyword
        names.add(word)
    return names


def label_values_metric(query):
    """The metric of a Grafana ``label_values(<selector>, label)`` variable query."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    assert match, "unexpected variable query %r" % query
    return metric_names_in(match.group(1))


def load_dashboard():
    with open(DASHBOARD, encoding="utf-8") as handle:
        return json.load(handle)


def all_panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard):
    """[(panel title, expr)] of every query target."""
    return [(panel["title"], target["expr"]) for panel in all_panels(dashboard)
            for target in panel.get("targets", [])]


def alert_exprs():
    """[(alert, expr)] of the rules template, its Ansible placeholders replaced by numbers."""
    with open(RULES_TEMPLATE, encoding="utf-8") as handle:
        text = handle.read()
    text = re.sub(r"\{#.*?#\}", "", text, flags=re.S)
    text = re.sub(r"^\{%.*%\}\n", "", text, flags=re.M)
    text = re.sub(r"\[\[.*?\]\]", "1", text)
    rules = yaml.safe_load(text)["groups"][0]["rules"]
    return [(rule["alert"], rule["expr"]) for rule in rules]


@pytest.mark.parametrize("expr, expected", [
    ('backup_size_bytes{job=~"$job"}', {"backup_size_bytes"}),
    ("time() - backup_last_success_timestamp_seconds", {"backup_last_success_timestamp_seconds"}),
    ('increase(backup_retention_pruned_total{job="a", instance=~"x|y"}[$__range])',
     {"backup_retention_pruned_total"}),
    ("sum by (job, kind) (rate(foo_total[5m])) / on (job) group_left(kind) bar offset 1h",
     {"foo_total", "bar"}),
    ("count(a > b) or vector(0)", {"a", "b"}),
    ('label_replace(up, "x", "$1", "instance", "(.*)") > 1e3', {"up"}),
    ("max_over_time(backup_duration_seconds[1d:5m]) > bool 2", {"backup_duration_seconds"}),
])
def test_metric_name_extraction(expr, expected):
    assert metric_names_in(expr) == expected


def test_every_panel_queries_only_metrics_the_engine_emits():
    exprs = panel_exprs(load_dashboard())
    assert exprs
    emitted = metrics.metric_names()
    for title, expr in exprs:
        used = metric_names_in(expr)
        assert used, "panel %r queries no metric: %s" % (title, expr)
        assert used <= emitted, "panel %r queries %s, not emitted by the engine" % (title, sorted(used - emitted))


def test_the_check_catches_a_metric_the_engine_does_not_emit():
    assert not metric_names_in("time() - backup_last_success{job=~\"$job\"}") <= metrics.metric_names()


def test_dashboard_covers_success_size_duration_verification_and_drills():
    used = set()
    for _title, expr in panel_exprs(load_dashboard()):
        used |= metric_names_in(expr)
    assert {"backup_last_success_timestamp_seconds", "backup_size_bytes", "backup_duration_seconds",
            "backup_last_verified_timestamp_seconds", "backup_restore_drill_duration_seconds"} <= used


def test_dashboard_shows_the_four_offsite_copy_metrics_and_the_copy_failing_selection():
    dashboard = load_dashboard()
    used = set()
    for _title, expr in panel_exprs(dashboard):
        used |= metric_names_in(expr)
    assert {"backup_copy_last_success_timestamp_seconds", "backup_copy_last_failure_timestamp_seconds",
            "backup_copy_lag_seconds", "backup_copy_bytes"} <= used
    # The failing-copies panel counts exactly what the alert BackupCopyFailing selects.
    (failing,) = [expr for title, expr in panel_exprs(dashboard) if title == "Offsite copies whose last run failed"]
    (alert,) = [expr for name, expr in alert_exprs() if name == "BackupCopyFailing"]
    counted = " ".join(re.sub(r"\{[^}]*\}", "", failing).split())
    assert counted == "count(%s) or vector(0)" % " ".join(alert.split())


def test_template_variables_use_engine_metrics_and_panels_use_the_datasource_variable():
    dashboard = load_dashboard()
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "kind", "instance"):
        assert label_values_metric(variables[name]["definition"]) <= metrics.metric_names()
        assert variables[name]["query"]["query"] == variables[name]["definition"]
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in all_panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                # every query is filtered by the dashboard's job selector
                assert 'job=~"$job"' in target["expr"], panel["title"]


def test_alert_rules_query_only_metrics_the_engine_emits():
    exprs = alert_exprs()
    assert {alert for alert, _expr in exprs} >= {"BackupFailed", "BackupJobFailing", "BackupSizeAnomaly",
                                                 "BackupNotVerified", "RestoreDrillFailed", "RetentionNotRunning"}
    for alert, expr in exprs:
        used = metric_names_in(expr)
        assert used and used <= metrics.metric_names(), (alert, sorted(used))


def test_dashboard_expressions_parse_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        require_or_skip("promtool not found (Debian package prometheus; make deps)")
    rules = [{"record": "dashboard:panel_%d" % index, "expr": grafana_to_promql(expr)}
             for index, (_title, expr) in enumerate(panel_exprs(load_dashboard()))]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: %d rules found" % len(rules) in result.stdout


# ------------------------------------------- the failed-jobs panel agrees with BackupJobFailing

def failed_jobs_panel_query(dashboard):
    """(the panel's query, the series it counts), Grafana variables selecting everything."""
    exprs = [expr for title, expr in panel_exprs(dashboard) if title == FAILED_JOBS_PANEL]
    assert len(exprs) == 1, "expected one query in panel %r, found %d" % (FAILED_JOBS_PANEL, len(exprs))
    query = grafana_to_promql(exprs[0])
    match = re.fullmatch(r"\s*count\((.*)\)\s+or\s+vector\(0\)\s*", query, flags=re.S)
    assert match, "panel %r is no longer count(<failing series>) or vector(0): %s" % (FAILED_JOBS_PANEL, query)
    return query, match.group(1)


def backup_job_failing_case():
    """The BackupJobFailing case of alerts-minutes.test.yml (never succeeded, failed after a
    success, recovered, only successes) with, per evaluation time, the jobs the alert names."""
    with open(os.path.join(PROMTOOL_TESTS, "alerts-minutes.test.yml"), encoding="utf-8") as handle:
        suite = yaml.safe_load(handle)
    cases = [case for case in suite["tests"]
             if any(check["alertname"] == "BackupJobFailing" for check in case.get("alert_rule_test", []))]
    assert len(cases) == 1, [case["name"] for case in cases]
    case = cases[0]
    checks = [check for check in case["alert_rule_test"] if check["alertname"] == "BackupJobFailing"]
    return case, checks


def _promql_labels(labels):
    return "{%s}" % ", ".join('%s="%s"' % (name, labels[name]) for name in JOB_LABELS)


def failed_jobs_agreement_tests(panel_query, alert_expr=None, with_annotations=True):
    """promtool tests: on the series of the BackupJobFailing case, at each of its evaluation
    times, the alert fires for the expected jobs, the series the panel counts are exactly
    those jobs, and the panel shows their number (``alert_expr`` too, when given, selects them).
    """
    case, checks = backup_job_failing_case()
    full, counted = panel_query
    expr_tests, alert_tests = [], []
    for check in checks:
        expected = [{name: alert["exp_labels"][name] for name in JOB_LABELS} for alert in check["exp_alerts"]]
        per_job = [{"labels": _promql_labels(labels), "value": 1} for labels in expected]
        selections = [counted] + ([alert_expr] if alert_expr else [])
        for selection in selections:
            expr_tests.append({"expr": "count by (%s) (%s)" % (", ".join(JOB_LABELS), selection),
                               "eval_time": check["eval_time"], "exp_samples": per_job})
        expr_tests.append({"expr": full, "eval_time": check["eval_time"],
                           "exp_samples": [{"labels": "{}", "value": len(expected)}]})
        alert_tests.append({"eval_time": check["eval_time"], "alertname": "BackupJobFailing", "exp_alerts": [
            {key: value for key, value in alert.items() if with_annotations or key != "exp_annotations"}
            for alert in check["exp_alerts"]]})
    assert any(check["exp_alerts"] for check in checks)
    return [{"name": "panel %r and BackupJobFailing name the same jobs" % FAILED_JOBS_PANEL,
             "interval": case["interval"], "input_series": case["input_series"],
             "promql_expr_test": expr_tests, "alert_rule_test": alert_tests}]


def run_promtool_test(directory, rules, tests):
    """``promtool test rules`` of ``tests`` against the rules file ``rules`` (in ``directory``)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        require_or_skip("promtool not found (Debian package prometheus; make deps)")
    path = os.path.join(str(directory), "failed-jobs-panel.test.yml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"rule_files": [os.path.basename(rules)], "evaluation_interval": "1m", "tests": tests},
                       handle, sort_keys=False)
    return subprocess.run([promtool, "test", "rules", os.path.basename(path)], cwd=str(directory),
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_series_of_the_case_cover_never_succeeded_failed_after_success_and_recovered():
    case, checks = backup_job_failing_case()
    series = {}
    for item in case["input_series"]:
        name, labels = item["series"].split("{", 1)
        series.setdefault(re.search(r'job="([^"]+)"', labels).group(1), set()).add(name)
    failure, success = "backup_last_failure_timestamp_seconds", "backup_last_success_timestamp_seconds"
    assert {job for job, names in series.items() if names == {failure}}, "no job that never succeeded"
    assert sum(1 for names in series.values() if names == {failure, success}) >= 2, "need failed and recovered"
    named = {alert["exp_labels"]["job"] for check in checks for alert in check["exp_alerts"]}
    assert named and set(series) - named, "the case needs jobs that fail and jobs that do not"


def test_failed_jobs_panel_and_backupjobfailing_select_the_same_jobs(tmp_path):
    """Never succeeded, failed after a success, recovered: the panel counts what the alert fires for."""
    alert = dict(alert_exprs())["BackupJobFailing"]
    rules = tmp_path / "job-failing.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "biometrics-backup", "rules": [
        {"alert": "BackupJobFailing", "expr": alert, "labels": {"severity": "warning"}}]}]}))
    tests = failed_jobs_agreement_tests(failed_jobs_panel_query(load_dashboard()), alert_expr=alert,
                                        with_annotations=False)
    result = run_promtool_test(tmp_path, str(rules), tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_agreement_check_catches_a_panel_that_ignores_jobs_that_never_succeeded(tmp_path):
    """The panel's former query (failure > success only) must fail the same promtool tests."""
    alert = dict(alert_exprs())["BackupJobFailing"]
    rules = tmp_path / "job-failing.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "biometrics-backup", "rules": [
        {"alert": "BackupJobFailing", "expr": alert, "labels": {"severity": "warning"}}]}]}))
    counted = "backup_last_failure_timestamp_seconds > backup_last_success_timestamp_seconds"
    tests = failed_jobs_agreement_tests(("count(%s) or vector(0)" % counted, counted), with_annotations=False)
    result = run_promtool_test(tmp_path, str(rules), tests)
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert "redis-new" in report  # the job that has only ever failed
