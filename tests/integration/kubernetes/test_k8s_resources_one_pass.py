# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The k8s_resources target on the one-pass restore path, against the real control plane.

The target declares ``resources.yaml``: its first read (parse and count) is the stream's
verification, and it ends before a namespace is created or an object applied. A payload
damaged in the middle (right size, so the engine's listing check passes) must be found inside
the target, with the destination namespace never created; a good backup restores on that
path.
"""

import json
import os
import uuid

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ObjectMismatchError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.k8s_resources.source import K8sResourcesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.k8s_resources.target import K8sResourcesTarget

JOB = "k8s-one-pass"
CONFIGMAPS = 150  # ~1.5 MB of YAML: several age chunks and zstd blocks before the damaged byte


def namespace_exists(kube_cluster, name):
    found = kube_cluster.kubectl("get", "namespace", name, "-o", "name", check=False)
    return found.returncode == 0


@pytest.fixture
def filled(kube_cluster, make_kube_namespace):
    """A namespace with CONFIGMAPS config maps of 10 KB each."""
    namespace = make_kube_namespace("onepass")
    items = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm-%03d" % index},
              "data": {"blob": os.urandom(5000).hex()}} for index in range(CONFIGMAPS)]
    kube_cluster.kubectl("apply", "-n", namespace, "-f", "-",
                         input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return namespace


def backup(kube_cluster, namespace, tmp_path):
    identity = x25519.Identity.generate()
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    source = K8sResourcesSource({"namespaces": [namespace], "resources": ["configmaps"],
                                 "kubeconfig": kube_cluster.kubeconfig})
    manifest = BackupRun(JOB, source, storage, encryption={"recipients": [str(identity.to_public())]}).run()
    return storage, manifest, identity


def test_damaged_resources_are_found_before_any_namespace_is_created(kube_cluster, filled, tmp_path):
    storage, manifest, identity = backup(kube_cluster, filled, tmp_path)
    obj = next(o for o in manifest["objects"] if o.get("payload") == "resources.yaml")
    path = os.path.join(str(tmp_path / "store"), JOB, manifest["id"], obj["name"])
    size = os.path.getsize(path)
    assert size > 200_000
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        byte = handle.read(1)[0]
        handle.seek(size // 2)
        handle.write(bytes([byte ^ 0x20]))
    dest = "never-" + uuid.uuid4().hex[:8]
    lines = []
    target = K8sResourcesTarget({"kubeconfig": kube_cluster.kubeconfig, "namespace_map": {filled: dest}})
    with pytest.raises(ObjectMismatchError):
        rs.restore(storage, JOB, target, identity=str(identity), log=lines.append)
    assert any("verifying the whole backup" in line for line in lines), lines  # failed inside the target
    assert not namespace_exists(kube_cluster, dest)


def test_a_good_backup_restores_in_one_pass(kube_cluster, filled, tmp_path):
    storage, manifest, identity = backup(kube_cluster, filled, tmp_path)
    dest = "onepass-" + uuid.uuid4().hex[:8]
    target = K8sResourcesTarget({"kubeconfig": kube_cluster.kubeconfig, "namespace_map": {filled: dest}})
    try:
        report = rs.restore(storage, JOB, target, identity=str(identity))
        assert report["verification"]["mode"] == "one-pass"
        assert report["restore"]["created"] == CONFIGMAPS
        assert all(check["ok"] for check in report["checks"])
        names = kube_cluster.kubectl("get", "configmaps", "-n", dest, "-o", "name").stdout.split()
        assert len([name for name in names if name.startswith("configmap/cm-")]) == CONFIGMAPS
    finally:
        kube_cluster.kubectl("delete", "namespace", dest, "--wait=false", check=False)
