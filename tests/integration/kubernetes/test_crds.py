"""The CRDs of hack/crds are installed by the control plane and validate what they store."""

import kubernetes
import pytest

client = kubernetes.client
ApiException = kubernetes.client.exceptions.ApiException

MONITORING = ("monitoring.coreos.com", "v1")
VELERO = ("velero.io", "v1")


def _create(kube_api, namespace, group_version, plural, body):
    group, version = group_version
    return client.CustomObjectsApi(kube_api).create_namespaced_custom_object(group, version, namespace, plural, body)


def _refused(kube_api, namespace, group_version, plural, body):
    with pytest.raises(ApiException) as refused:
        _create(kube_api, namespace, group_version, plural, body)
    assert refused.value.status == 422, refused.value.body
    return refused.value.body


def _prometheus_rule(name, rule):
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": name},
        "spec": {"groups": [{"name": "backup", "interval": "1m", "rules": [rule]}]},
    }


def test_crds_are_established(kube_api):
    extensions = client.ApiextensionsV1Api(kube_api)
    for name in ("prometheusrules.monitoring.coreos.com", "servicemonitors.monitoring.coreos.com",
                 "backups.velero.io"):
        crd = extensions.read_custom_resource_definition(name)
        conditions = {item.type: item.status for item in crd.status.conditions}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NonStructuralSchema") is None, (name, conditions)


def test_prometheus_rule_valid_and_invalid(kube_api, kube_namespace):
    alert = {"alert": "BackupFailed", "expr": "time() - backup_last_success_timestamp_seconds > 86400",
             "for": "10m", "labels": {"severity": "critical"}, "annotations": {"summary": "backup is late"}}
    stored = _create(kube_api, kube_namespace, MONITORING, "prometheusrules", _prometheus_rule("ok", alert))
    assert stored["spec"]["groups"][0]["rules"][0]["for"] == "10m"
    record = {"record": "job:backup_size_bytes:max", "expr": "max by (job) (backup_size_bytes)"}
    _create(kube_api, kube_namespace, MONITORING, "prometheusrules", _prometheus_rule("record", record))

    body = _refused(kube_api, kube_namespace, MONITORING, "prometheusrules",
                    _prometheus_rule("both", dict(alert, record="x:y")))
    assert "exactly one of alert or record" in body
    body = _refused(kube_api, kube_namespace, MONITORING, "prometheusrules",
                    _prometheus_rule("no-expr", {"alert": "NoExpr"}))
    assert "expr" in body
    body = _refused(kube_api, kube_namespace, MONITORING, "prometheusrules",
                    _prometheus_rule("bad-for", dict(alert, **{"for": "ten minutes"})))
    assert "for" in body
    names = [item["metadata"]["name"] for item in client.CustomObjectsApi(kube_api).list_namespaced_custom_object(
        *MONITORING, kube_namespace, "prometheusrules")["items"]]
    assert sorted(names) == ["ok", "record"]


def test_service_monitor_valid_and_invalid(kube_api, kube_namespace):
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": "pushgateway"},
        "spec": {"selector": {"matchLabels": {"app": "pushgateway"}},
                 "endpoints": [{"port": "http", "interval": "30s", "honorLabels": True}]},
    }
    stored = _create(kube_api, kube_namespace, MONITORING, "servicemonitors", monitor)
    assert stored["spec"]["endpoints"][0]["honorLabels"] is True

    no_selector = dict(monitor, metadata={"name": "no-selector"}, spec={"endpoints": [{"port": "http"}]})
    assert "selector" in _refused(kube_api, kube_namespace, MONITORING, "servicemonitors", no_selector)
    bad_scheme = dict(monitor, metadata={"name": "bad-scheme"},
                      spec=dict(monitor["spec"], endpoints=[{"port": "http", "scheme": "gopher"}]))
    assert "scheme" in _refused(kube_api, kube_namespace, MONITORING, "servicemonitors", bad_scheme)


def test_velero_backup_valid_and_invalid(kube_api, kube_namespace):
    backup = {
        "apiVersion": "velero.io/v1", "kind": "Backup",
        "metadata": {"name": "nightly"},
        "spec": {"includedNamespaces": ["biometrics"], "snapshotVolumes": True, "ttl": "720h0m0s"},
    }
    stored = _create(kube_api, kube_namespace, VELERO, "backups", backup)
    assert stored["spec"]["includedNamespaces"] == ["biometrics"]

    bad_ttl = dict(backup, metadata={"name": "bad-ttl"}, spec=dict(backup["spec"], ttl="30 days"))
    assert "ttl" in _refused(kube_api, kube_namespace, VELERO, "backups", bad_ttl)
    bad_namespaces = dict(backup, metadata={"name": "bad-ns"}, spec={"includedNamespaces": "biometrics"})
    assert "includedNamespaces" in _refused(kube_api, kube_namespace, VELERO, "backups", bad_namespaces)

    # Status is written on the object itself (no status subresource, as upstream): a known
    # phase is stored, an unknown one is refused.
    objects = client.CustomObjectsApi(kube_api)
    patched = objects.patch_namespaced_custom_object(*VELERO, kube_namespace, "backups", "nightly",
                                                     {"status": {"phase": "Completed"}})
    assert patched["status"]["phase"] == "Completed"
    with pytest.raises(ApiException) as refused:
        objects.patch_namespaced_custom_object(*VELERO, kube_namespace, "backups", "nightly",
                                               {"status": {"phase": "Done"}})
    assert refused.value.status == 422
    assert objects.get_namespaced_custom_object(*VELERO, kube_namespace, "backups", "nightly")["status"] == {
        "phase": "Completed"}

    # Velero 1.18 queues a new Backup before starting it.
    _create(kube_api, kube_namespace, VELERO, "backups", dict(backup, metadata={"name": "queued"}))
    for phase in ("Queued", "ReadyToStart"):
        patched = objects.patch_namespaced_custom_object(*VELERO, kube_namespace, "backups", "queued",
                                                         {"status": {"phase": phase, "queuePosition": 2}})
        assert patched["status"] == {"phase": phase, "queuePosition": 2}
    with pytest.raises(ApiException) as refused:
        objects.patch_namespaced_custom_object(*VELERO, kube_namespace, "backups", "queued",
                                               {"status": {"queuePosition": "second"}})
    assert refused.value.status == 422 and "queuePosition" in refused.value.body
