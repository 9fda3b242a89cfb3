# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Grafana dashboard and the alert rules query only metrics the engine emits.

Every PromQL expression of the dashboard (panel targets and template variables) and of the
alert rules template is reduced to the metric names it selects, which must all be in
``engine.metrics.metric_names()``. The dashboard's expressions are also parsed by the real
``promtool`` (as recording rules), so a typo cannot pass as "no metric at all".
"""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO_ROOT, require_or_skip

from ansible_collections.biometrics.backup.plugins.module_utils.engine import metrics

DASHBOARD = os.path.join(REPO_ROOT, "roles", "monitoring", "files", "backup-dashboard.json")
RULES_TEMPLATE = os.path.join(REPO_ROOT, "roles", "monitoring", "templates", "backup-alerts.rules.yml.j2")

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
