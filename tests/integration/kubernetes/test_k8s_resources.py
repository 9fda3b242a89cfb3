# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The k8s_resources kind against the real control plane (``kube_cluster``).

A namespace is filled with the seed's kinds (workloads, services, config maps, secrets,
ingresses) plus RBAC, a PVC and a PrometheusRule, including objects a controller owns
(which must not be exported). It is backed up through BackupRun into filesystem storage,
encrypted with age, and restored with server-side apply into mapped namespaces; objects are
compared field by field with the originals. Failure paths prove the cluster is left as it
was: a restore the API server's dry run refuses changes nothing, payloads that disagree with
their manifest are refused before any request, and the stock-tool path (age, zstd, kubectl)
recreates a deleted namespace.
"""

import base64
import subprocess
import tempfile
import uuid

import kubernetes
import pytest
import yaml
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import keys as backup_keys
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun, open_payload
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.k8s_resources.source import (
    RESOURCES_PAYLOAD, K8sResourcesSource, clean_object)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import RestoreContext
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.k8s_resources.target import (
    K8sResourcesTarget)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.verify import verify as verify_backups

from kube_fixtures import wait_for

JOB = "k8s-test"
SECRET_VALUE = "s3cr3t-" + uuid.uuid4().hex
RESOURCES = ["all", "configmaps", "secrets", "ingresses", "services", "serviceaccounts", "persistentvolumeclaims",
             "roles", "rolebindings", "prometheusrules"]
EXPECTED_KINDS = {
    "configmaps": 1, "secrets": 2, "serviceaccounts": 2, "roles.rbac.authorization.k8s.io": 1,
    "rolebindings.rbac.authorization.k8s.io": 1, "services": 3, "pods": 1, "deployments.apps": 1,
    "replicasets.apps": 0, "statefulsets.apps": 0, "daemonsets.apps": 0, "jobs.batch": 1, "cronjobs.batch": 1,
    "horizontalpodautoscalers.autoscaling": 0, "ingresses.networking.k8s.io": 1, "persistentvolumeclaims": 1,
    "prometheusrules.monitoring.coreos.com": 1,
}
SERVER_FIELDS = ("uid", "resourceVersion", "managedFields", "creationTimestamp", "generation", "ownerReferences",
                 "selfLink")


# --------------------------------------------------------------------------- helpers

def _container(name="main", image="registry.invalid/app:1"):
    return {"name": name, "image": image, "command": ["sleep", "3600"]}


def _pod_spec(**extra):
    return dict({"containers": [_container()]}, **extra)


def seed_objects(namespace):
    """The objects of the seeded namespace, in creation order (owned ones are added later)."""
    labels = {"app": "web"}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "labels": {"tier": "config"}},
         "data": {"mode": "strict", "retention": "7"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-credentials"}, "type": "Opaque",
         "stringData": {"password": SECRET_VALUE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "app"}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
         "metadata": {"name": "app-token", "annotations": {"kubernetes.io/service-account.name": "app"}}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "reader"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "app-reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": namespace}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": labels},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": _pod_spec(serviceAccountName="app")}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-nodeport"},
         "spec": {"type": "NodePort", "selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-headless"},
         "spec": {"clusterIP": "None", "selector": labels, "ports": [{"port": 80}]}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
         "spec": {"schedule": "0 0 1 1 *", "jobTemplate": {"spec": {"template": {
             "spec": _pod_spec(restartPolicy="Never")}}}}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
         "spec": {"backoffLimit": 0, "template": {"spec": _pod_spec(restartPolicy="Never")}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runner", "labels": {"role": "runner"}},
         "spec": _pod_spec()},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
         "spec": {"rules": [{"host": "web.example.test", "http": {"paths": [
             {"path": "/", "pathType": "Prefix",
              "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
                  "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "alerts"},
         "spec": {"groups": [{"name": "backup", "rules": [
             {"alert": "BackupLate", "expr": "time() - backup_last_success_timestamp_seconds > 90000"}]}]}},
    ]


class Api:
    """Generic create/get/delete of any kind through the dynamic client (test side only)."""

    def __init__(self, kube_api, tmp_path):
        self.dynamic = kubernetes.dynamic.DynamicClient(kube_api, cache_file=str(tmp_path / "discovery.json"))

    def resource(self, api_version, kind):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def create(self, namespace, body):
        return self.resource(body["apiVersion"], body["kind"]).create(body=body, namespace=namespace).to_dict()

    def get(self, namespace, api_version, kind, name):
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except kubernetes.dynamic.exceptions.NotFoundError:
            return None

    def names(self, namespace, api_version, kind):
        return sorted(item["metadata"]["name"] for item in
                      self.resource(api_version, kind).get(namespace=namespace).to_dict()["items"])


@pytest.fixture
def api(kube_api, tmp_path):
    return Api(kube_api, tmp_path)


@pytest.fixture
def seeded(api, make_kube_namespace):
    """A namespace with every seed kind, RBAC, a PVC, a PrometheusRule and controller-owned objects."""
    namespace = make_kube_namespace("src", labels={"pod-security.kubernetes.io/enforce": "baseline",
                                                   "team": "biometrics"})
    created = {}
    for body in seed_objects(namespace):
        created[(body["kind"], body["metadata"]["name"])] = api.create(namespace, body)
    deployment = created[("Deployment", "web")]
    # What the deployment controller would make (it does not run here): a ReplicaSet owned by
    # the Deployment and a Pod owned by the ReplicaSet. Neither may be exported.
    replicaset = api.create(namespace, {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-5d8f", "labels": {"app": "web"}, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": deployment["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": _pod_spec()}}})
    api.create(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-5d8f-abcde", "labels": {"app": "web"}, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": replicaset["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]},
        "spec": _pod_spec()})
    # The token controller fills the legacy token Secret; the backup must not carry its token.
    wait_for(lambda: (api.get(namespace, "v1", "Secret", "app-token").get("data") or {}).get("token"),
             timeout=30, what="the token controller to fill app-token")
    return namespace


def storage_at(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


def source_options(kube_cluster, namespace, **extra):
    return dict({"namespaces": [namespace], "resources": RESOURCES, "kubeconfig": kube_cluster.kubeconfig}, **extra)


def encrypted_backup(kube_cluster, namespace, tmp_path, **extra):
    identity = x25519.Identity.generate()
    storage = storage_at(tmp_path)
    manifest = BackupRun(JOB, K8sResourcesSource(source_options(kube_cluster, namespace, **extra)), storage,
                         encryption={"recipients": [str(identity.to_public())]}).run()
    return storage, manifest, identity


def payload_documents(storage, manifest, identity=None):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.codecs import (  # pylint: disable=import-outside-toplevel
        identities_for)
    identities = identities_for(manifest["encryption"], str(identity)) if identity is not None else None
    stream = open_payload(storage, manifest, RESOURCES_PAYLOAD, identities)
    data = b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        data += chunk
    stream.finish()
    return [doc for doc in yaml.safe_load_all(data) if doc]


def resource_key(doc):
    plural = {"ConfigMap": "configmaps", "Secret": "secrets", "ServiceAccount": "serviceaccounts", "Service": "services",
              "Pod": "pods", "PersistentVolumeClaim": "persistentvolumeclaims"}
    group = doc["apiVersion"].rpartition("/")[0]
    names = {"Role": "roles", "RoleBinding": "rolebindings", "Deployment": "deployments", "Job": "jobs",
             "CronJob": "cronjobs", "Ingress": "ingresses", "PrometheusRule": "prometheusrules"}
    return plural[doc["kind"]] if not group else "%s.%s" % (names[doc["kind"]], group)


def target_options(kube_cluster, **extra):
    return dict({"kubeconfig": kube_cluster.kubeconfig}, **extra)


def assert_same_objects(api, documents, source_namespace, dest_namespace):
    """Every backed-up object exists in ``dest_namespace`` and equals the backup once cleaned."""
    for doc in documents:
        if doc["kind"] == "Namespace":
            continue
        live = api.get(dest_namespace, doc["apiVersion"], doc["kind"], doc["metadata"]["name"])
        assert live is not None, "%s %s missing in %s" % (doc["kind"], doc["metadata"]["name"], dest_namespace)
        cleaned, reason = clean_object(live, resource_key(doc))
        assert reason is None
        cleaned["metadata"]["namespace"] = source_namespace
        for subject in cleaned.get("subjects") or []:
            if subject.get("namespace") == dest_namespace:
                subject["namespace"] = source_namespace
        assert cleaned == doc, "%s %s differs after restore" % (doc["kind"], doc["metadata"]["name"])


# --------------------------------------------------------------------------- backup side

def test_secrets_are_only_stored_encrypted(kube_cluster, seeded, tmp_path):
    storage = storage_at(tmp_path)
    with pytest.raises(ConfigError, match="without encryption"):
        BackupRun(JOB, K8sResourcesSource(source_options(kube_cluster, seeded)), storage)
    with pytest.raises(ConfigError, match="without encryption"):  # the seed's default set holds secrets
        BackupRun(JOB, K8sResourcesSource({"namespaces": [seeded], "kubeconfig": kube_cluster.kubeconfig}), storage)

    # Excluding Secrets explicitly makes an unencrypted backup acceptable, and none is stored.
    source = K8sResourcesSource(source_options(kube_cluster, seeded, exclude_resources=["secret"]))
    assert source.requires_encryption is False
    manifest = BackupRun(JOB, source, storage).run()
    documents = payload_documents(storage, manifest)
    assert [doc for doc in documents if doc["kind"] == "Secret"] == []
    assert "secrets" not in manifest["stats"]["kinds"]
    assert manifest["stats"]["secrets_included"] is False
    assert [doc["metadata"]["name"] for doc in documents if doc["kind"] == "ConfigMap"] == ["settings"]


def test_export_is_clean_complete_and_counted(kube_cluster, seeded, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    stats = manifest["stats"]
    assert stats["namespaces"] == [seeded]
    assert stats["kinds"] == EXPECTED_KINDS
    assert stats["per_namespace"] == {seeded: EXPECTED_KINDS}
    assert stats["objects"] == sum(EXPECTED_KINDS.values())
    assert stats["skipped"]["owned"] >= 2  # the ReplicaSet, its Pod (and the Job's Pod once created)
    assert stats["skipped"]["managed"] == 1  # kube-root-ca.crt
    assert stats["namespace_objects"] == [seeded]
    assert stats["secrets_included"] is True
    assert manifest["encryption"]["mode"] == "age"

    # The stored object is age ciphertext: neither the secret nor its base64 appears in it.
    stored = [obj for obj in manifest["objects"] if obj.get("payload") == RESOURCES_PAYLOAD][0]
    raw = storage.get_bytes(mf.object_key(JOB, manifest["id"], stored["name"]))
    assert raw.startswith(b"age-encryption.org/v1")
    assert SECRET_VALUE.encode() not in raw and base64.b64encode(SECRET_VALUE.encode()) not in raw

    documents = payload_documents(storage, manifest, identity)
    counted = {}
    for doc in documents:
        if doc["kind"] != "Namespace":
            counted[resource_key(doc)] = counted.get(resource_key(doc), 0) + 1
    assert counted == {key: value for key, value in EXPECTED_KINDS.items() if value}
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    assert ("ReplicaSet", "web-5d8f") not in by_name and ("Pod", "web-5d8f-abcde") not in by_name
    assert ("ConfigMap", "kube-root-ca.crt") not in by_name
    for doc in documents:
        assert "status" not in doc
        assert not set(SERVER_FIELDS) & set(doc["metadata"]), doc["metadata"]
        assert "kubectl.kubernetes.io/last-applied-configuration" not in doc["metadata"].get("annotations", {})
    namespace_doc = by_name[("Namespace", seeded)]
    assert namespace_doc["metadata"]["labels"] == {"pod-security.kubernetes.io/enforce": "baseline",
                                                   "team": "biometrics"}
    assert base64.b64decode(by_name[("Secret", "db-credentials")]["data"]["password"]).decode() == SECRET_VALUE
    assert "data" not in by_name[("Secret", "app-token")]  # the token controller refills it
    assert "clusterIP" not in by_name[("Service", "web")]["spec"]
    assert "clusterIPs" not in by_name[("Service", "web")]["spec"]
    assert by_name[("Service", "web-headless")]["spec"]["clusterIP"] == "None"
    assert all("nodePort" not in port for port in by_name[("Service", "web-nodeport")]["spec"]["ports"])
    job = by_name[("Job", "once")]
    assert "selector" not in job["spec"]
    assert not {"controller-uid", "batch.kubernetes.io/controller-uid"} & set(
        job["spec"]["template"]["metadata"]["labels"])
    runner = by_name[("Pod", "runner")]["spec"]
    assert "nodeName" not in runner
    assert not [volume for volume in runner.get("volumes", []) if volume["name"].startswith("kube-api-access-")]
    assert by_name[("PrometheusRule", "alerts")]["spec"]["groups"][0]["rules"][0]["alert"] == "BackupLate"
    assert manifest["tool_versions"]["kube-apiserver"].startswith("v1.")


def test_preflight_names_unknown_types_and_missing_namespaces(kube_cluster, kube_namespace, tmp_path):
    storage = storage_at(tmp_path)
    with pytest.raises(ConfigError, match="no resource type 'widgets'"):
        BackupRun(JOB, K8sResourcesSource({"namespaces": [kube_namespace], "resources": ["configmaps", "widgets"],
                                           "kubeconfig": kube_cluster.kubeconfig}), storage).run()
    with pytest.raises(ConfigError, match="namespace nowhere-%s does not exist" % JOB):
        BackupRun(JOB, K8sResourcesSource({"namespaces": ["nowhere-%s" % JOB], "resources": ["configmaps"],
                                           "kubeconfig": kube_cluster.kubeconfig}), storage).run()
    with pytest.raises(ConfigError, match="not a namespaced resource"):
        BackupRun(JOB, K8sResourcesSource({"namespaces": [kube_namespace], "resources": ["nodes"],
                                           "kubeconfig": kube_cluster.kubeconfig}), storage).run()
    assert Catalog(storage).scan(JOB) == []
    assert storage.list("%s/" % JOB) == []  # nothing stored, not even a partial payload


def test_least_privilege_identity_exports_with_namespaced_rbac_only(kube_cluster, kube_api, seeded, tmp_path):
    """The CronJob's ServiceAccount may only get/list the exported kinds in its namespace."""
    core = kubernetes.client.CoreV1Api(kube_api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(seeded, {"metadata": {"name": "exporter"}})
    rbac.create_namespaced_role(seeded, {"metadata": {"name": "exporter"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(seeded, {
        "metadata": {"name": "exporter"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "exporter"},
        "subjects": [{"kind": "ServiceAccount", "name": "exporter", "namespace": seeded}]})
    token = core.create_namespaced_service_account_token("exporter", seeded, {"spec": {"expirationSeconds": 600}})
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(kube_cluster.ca_pem)
    token_file = tmp_path / "token"
    token_file.write_text(token.status.token)
    options = {"namespaces": [seeded], "resources": ["configmaps", "services"], "host": kube_cluster.server,
               "token_file": str(token_file), "ca_cert": str(ca_file)}
    storage = storage_at(tmp_path)
    manifest = BackupRun(JOB, K8sResourcesSource(options), storage).run()
    assert manifest["stats"]["kinds"] == {"configmaps": 1, "services": 3}
    assert manifest["stats"]["namespace_objects"] == []  # may not read its Namespace: tolerated
    assert "token" not in str(manifest["source"])

    # Secrets are not granted: the run fails naming the denial, and no backup is listed.
    with pytest.raises(SourceError, match="list secrets in namespace %s failed: HTTP 403" % seeded):
        BackupRun(JOB, K8sResourcesSource(dict(options, resources=["configmaps", "secrets"])), storage,
                  encryption={"recipients": [str(x25519.Identity.generate().to_public())]}).run()
    assert [item["id"] for item in Catalog(storage).scan(JOB)] == [manifest["id"]]


# --------------------------------------------------------------------------- restore side

def test_round_trip_into_a_mapped_namespace(kube_cluster, api, seeded, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    documents = payload_documents(storage, manifest, identity)
    dest = "restored-" + uuid.uuid4().hex[:8]
    try:
        report = rs.restore(storage, JOB, K8sResourcesTarget(target_options(
            kube_cluster, namespace_map={seeded: dest})), backup="latest", identity=str(identity))
        result = report["restore"]
        assert report["changed"] is True
        # Everything is new, except the ServiceAccount "default" the controller made in the
        # new namespace (the backup's copy of it carries nothing else).
        actions = {(item["resource"], item["name"]): item["action"] for item in result["objects"]}
        assert actions.pop(("serviceaccounts", "default")) == "unchanged"
        assert set(actions.values()) == {"create"}
        assert result["created"] == manifest["stats"]["objects"] - 1
        assert (result["updated"], result["unchanged"]) == (0, 1)
        assert result["created_namespaces"] == [dest]
        assert all(check["ok"] for check in report["checks"])
        assert {check["what"] for check in report["checks"]} >= {
            "deployments.apps present in namespace %s" % dest, "secrets present in namespace %s" % dest}
        # The namespace got the backed-up labels (Pod Security level included).
        labels = api.get(None, "v1", "Namespace", dest)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "baseline" and labels["team"] == "biometrics"
        wait_for(lambda: (api.get(dest, "v1", "Secret", "app-token").get("data") or {}).get("token"), timeout=30,
                 what="the token controller to refill the restored app-token")
        assert_same_objects(api, documents, seeded, dest)
        binding = api.get(dest, "rbac.authorization.k8s.io/v1", "RoleBinding", "app-reader")
        assert binding["subjects"][0]["namespace"] == dest
        managers = {entry["manager"] for entry in api.get(dest, "apps/v1", "Deployment", "web")["metadata"][
            "managedFields"]}
        assert "biometrics-backup" in managers

        # Restoring again changes nothing.
        again = rs.restore(storage, JOB, K8sResourcesTarget(target_options(
            kube_cluster, namespace_map={seeded: dest})), backup="latest", identity=str(identity))
        assert again["changed"] is False
        assert again["restore"]["unchanged"] == manifest["stats"]["objects"]
        assert again["restore"]["created"] == again["restore"]["updated"] == 0
    finally:
        kubernetes.client.CoreV1Api(api.dynamic.client).delete_namespace(dest)


def test_restore_over_drifted_objects_needs_force(kube_cluster, api, seeded, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    core = kubernetes.client.CoreV1Api(api.dynamic.client)
    # Someone edits the live ConfigMap and deletes another object after the backup.
    core.patch_namespaced_config_map("settings", seeded, {"data": {"mode": "lenient"}}, field_manager="kubectl-edit")
    core.delete_namespaced_service("web-headless", seeded)
    before = api.get(seeded, "v1", "ConfigMap", "settings")

    with pytest.raises(SourceError, match="dry run .*conflict") as refused:
        rs.restore(storage, JOB, K8sResourcesTarget(target_options(kube_cluster)), backup="latest",
                   identity=str(identity))
    assert "nothing was changed" in str(refused.value)
    assert api.get(seeded, "v1", "ConfigMap", "settings")["metadata"]["resourceVersion"] == \
        before["metadata"]["resourceVersion"]
    assert api.get(seeded, "v1", "Service", "web-headless") is None  # not re-created either

    report = rs.restore(storage, JOB, K8sResourcesTarget(target_options(kube_cluster, force_conflicts=True)),
                        backup="latest", identity=str(identity))
    result = report["restore"]
    assert (result["created"], result["updated"]) == (1, 1)
    assert result["unchanged"] == manifest["stats"]["objects"] - 2
    actions = {(item["resource"], item["name"]): item["action"] for item in result["objects"]}
    assert actions[("configmaps", "settings")] == "update"
    assert actions[("services", "web-headless")] == "create"
    assert api.get(seeded, "v1", "ConfigMap", "settings")["data"] == {"mode": "strict", "retention": "7"}
    assert api.get(seeded, "v1", "Service", "web-headless")["spec"]["clusterIP"] == "None"


def test_check_mode_is_a_server_side_dry_run(kube_cluster, api, seeded, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    kubernetes.client.CoreV1Api(api.dynamic.client).delete_namespaced_config_map("settings", seeded)
    keys = backup_keys.chain_identities(storage, [manifest], identity=str(identity))

    # Into the source namespace: the deleted ConfigMap would be created, nothing is written.
    target = K8sResourcesTarget(target_options(kube_cluster))
    target.preflight(manifest)
    plan = target.restore(rs.restore_context(storage, manifest, [manifest], keys, check_mode=True))
    assert plan["dry_run"] is True and plan["changed"] is False
    assert plan["created"] == 1 and plan["updated"] == 0
    assert plan["unchanged"] == manifest["stats"]["objects"] - 1
    assert api.get(seeded, "v1", "ConfigMap", "settings") is None

    # Into a namespace that does not exist: it is reported, not created.
    dest = "planned-" + uuid.uuid4().hex[:8]
    target = K8sResourcesTarget(target_options(kube_cluster, namespace_map={seeded: dest}, dry_run=True))
    plan = target.restore(rs.restore_context(storage, manifest, [manifest], keys))
    assert plan["created_namespaces"] == [dest]
    assert plan["created"] == manifest["stats"]["objects"]
    assert api.get(None, "v1", "Namespace", dest) is None
    # The orchestrator's check mode runs the same server-side dry run and touches nothing.
    report = rs.restore(storage, JOB, K8sResourcesTarget(target_options(kube_cluster, namespace_map={seeded: dest})),
                        backup="latest", identity=str(identity), check_mode=True)
    assert report["changed"] is False
    assert report["restore"]["dry_run"] is True and report["restore"]["created_namespaces"] == [dest]
    assert report["restore"]["created"] == manifest["stats"]["objects"]
    assert report["checks"] and all(check["ok"] for check in report["checks"])
    assert api.get(None, "v1", "Namespace", dest) is None


def test_refused_dry_run_leaves_every_namespace_as_it_was(kube_cluster, api, seeded, make_kube_namespace, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    # A destination that enforces Pod Security "restricted": the backed-up pod "runner"
    # (fine under "baseline") is refused there, so nothing at all may be applied.
    strict = make_kube_namespace("strict", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    with pytest.raises(SourceError, match="violates PodSecurity"):
        rs.restore(storage, JOB, K8sResourcesTarget(target_options(kube_cluster, namespace_map={seeded: strict})),
                   backup="latest", identity=str(identity))
    assert api.names(strict, "v1", "ConfigMap") == ["kube-root-ca.crt"]
    assert api.names(strict, "v1", "Secret") == []
    assert api.names(strict, "apps/v1", "Deployment") == []

    # A destination the restore creates itself is deleted again when the dry run refuses:
    # here the NodePort kept with preserve_node_ports is still taken by the source Service.
    storage2, manifest2, identity2 = encrypted_backup(kube_cluster, seeded, tmp_path / "second",
                                                      preserve_node_ports=True)
    dest = "doomed-" + uuid.uuid4().hex[:8]
    with pytest.raises(SourceError, match="already allocated"):
        rs.restore(storage2, JOB, K8sResourcesTarget(target_options(kube_cluster, namespace_map={seeded: dest})),
                   backup=manifest2["id"], identity=str(identity2))
    gone = api.get(None, "v1", "Namespace", dest)
    assert gone is None or gone["status"]["phase"] == "Terminating"


def test_payload_that_disagrees_with_its_manifest_is_refused_before_any_request(kube_cluster, api, seeded, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    keys = backup_keys.chain_identities(storage, [manifest], identity=str(identity))
    dest = "never-" + uuid.uuid4().hex[:8]
    forged = dict(manifest, stats=dict(manifest["stats"], per_namespace={
        seeded: dict(manifest["stats"]["per_namespace"][seeded], configmaps=2)}))
    genuine = rs.restore_context(storage, manifest, [manifest], keys)
    context = RestoreContext(forged, [forged], lambda _which, name: genuine.open_payload(manifest, name))
    target = K8sResourcesTarget(target_options(kube_cluster, namespace_map={seeded: dest}))
    with pytest.raises(IntegrityError, match="configmaps in namespace %s of the backup: expected 2, found 1" % seeded):
        target.restore(context)
    assert api.get(None, "v1", "Namespace", dest) is None


def test_scratch_verification_dry_runs_into_throwaway_namespaces(kube_cluster, api, seeded, tmp_path):
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    keys = backup_keys.chain_identities(storage, [manifest], identity=str(identity))
    before = set(api.names(None, "v1", "Namespace"))
    with K8sResourcesTarget.scratch(manifest, source_options(kube_cluster, seeded)) as target:
        report = rs.restore_verified(storage, manifest, [manifest], keys, target)
        scratch_namespace = report["namespaces"][seeded]
        assert scratch_namespace != seeded and scratch_namespace.startswith(seeded[:20])
        assert report["dry_run"] is True and report["changed"] is False
        assert report["created"] == manifest["stats"]["objects"] - 1  # all but ServiceAccount "default"
        assert report["unchanged"] == 1
        assert all(check["ok"] for check in report["checks"])
        assert any(check["what"] == "pods accepted by dry run in namespace %s" % scratch_namespace
                   for check in report["checks"])
        assert api.names(scratch_namespace, "apps/v1", "Deployment") == []  # dry run: nothing runs
    phase = (api.get(None, "v1", "Namespace", scratch_namespace) or {}).get("status", {}).get("phase")
    assert phase in (None, "Terminating")
    assert set(api.names(None, "v1", "Namespace")) - before <= {scratch_namespace}


def test_stock_tools_recreate_a_deleted_namespace(kube_cluster, api, seeded, tmp_path):
    """Disaster recovery without the collection: age -d | zstd -d | kubectl apply --server-side."""
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    documents = payload_documents(storage, manifest, identity)
    stored = [obj for obj in manifest["objects"] if obj.get("payload") == RESOURCES_PAYLOAD][0]
    assert stored["name"] == RESOURCES_PAYLOAD + ".zst.age"
    key_file = tmp_path / "key.txt"
    key_file.write_text(str(identity) + "\n")
    encrypted = tmp_path / stored["name"]
    encrypted.write_bytes(storage.get_bytes(mf.object_key(JOB, manifest["id"], stored["name"])))

    core = kubernetes.client.CoreV1Api(api.dynamic.client)
    core.delete_namespace(seeded)
    wait_for(lambda: api.get(None, "v1", "Namespace", seeded) is None, timeout=120, interval=1,
             what="namespace %s to be deleted" % seeded)

    plain = subprocess.run("age -d -i %s %s | zstd -d -q -c" % (key_file, encrypted), shell=True, check=True,
                           capture_output=True).stdout
    applied = kube_cluster.kubectl("apply", "--server-side", "--field-manager", "disaster-recovery", "-f", "-",
                                   input_text=plain.decode())
    assert applied.returncode == 0, applied.stderr
    assert api.get(None, "v1", "Namespace", seeded)["metadata"]["labels"]["team"] == "biometrics"
    wait_for(lambda: (api.get(seeded, "v1", "Secret", "app-token").get("data") or {}).get("token"), timeout=30,
             what="the token controller to refill app-token")
    assert_same_objects(api, documents, seeded, seeded)


def test_backup_restore_and_verify_leave_no_discovery_cache_behind(kube_cluster, api, seeded, tmp_path, monkeypatch):
    # Each connection keeps the API discovery in a private temporary file; a runner or module
    # run that did not close its connections left one per run in /tmp for ever.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    storage, manifest, identity = encrypted_backup(kube_cluster, seeded, tmp_path)
    dest = "restored-" + uuid.uuid4().hex[:8]
    try:
        report = rs.restore(storage, JOB, K8sResourcesTarget(target_options(kube_cluster, namespace_map={seeded: dest})),
                            backup=manifest["id"], identity=str(identity))
        assert report["restore"]["created_namespaces"] == [dest]
        verdict = verify_backups(storage, JOB, manifest["id"], identity=str(identity), test_restore=True,
                                 scratch_options=target_options(kube_cluster), record=False)
        assert verdict["ok"] is True and verdict["verified"] == 1
    finally:
        kubernetes.client.CoreV1Api(api.dynamic.client).delete_namespace(dest)
    assert sorted(path.name for path in private_tmp.iterdir() if path.name.startswith("bb-kube-discovery-")) == []
