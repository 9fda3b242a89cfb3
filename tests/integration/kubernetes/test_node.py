"""The local cluster's node (hack/node.sh through hack/control-plane.sh): pods really run.

Against the session cluster's node (``kube_node``): a pod's logs come back through the
apiserver, which calls the kubelet with its client certificate (the kubelet refuses anonymous
callers); a pod under Pod Security ``restricted`` completes as uid 65532 on a read-only root
with an emptyDir ``/tmp``; a hostPath PersistentVolume binds and mounts; a pod reaches a TCP
server on the host at the node IP; a ``* * * * *`` CronJob's Job completes.

The first test runs a private cluster with a node of its own and checks that ``stop`` leaves
nothing behind: no process, no mount, no cgroup, no bridge, the sysctls as they were.
"""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import kubernetes
import pytest

from kube_fixtures import (START_TIMEOUT, KubeCluster, _script, import_test_image, script_env,
                           unavailable, wait_for)
from process_helpers import processes_mentioning

client = kubernetes.client
ApiException = kubernetes.client.exceptions.ApiException

REGISTRY = Path(os.environ.get("BIOMETRICS_NODE_REGISTRY") or "/run/biometrics-backup/nodes")
# What the kubelet sets (pkg/kubelet/cm setupKernelTunables); stop puts the old values back.
KUBELET_SYSCTLS = {"vm.overcommit_memory": "1", "vm.panic_on_oom": "0", "kernel.panic": "10",
                   "kernel.panic_on_oops": "1", "kernel.keys.root_maxkeys": "1000000",
                   "kernel.keys.root_maxbytes": "25000000"}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


def _sysctls():
    return {name: Path("/proc/sys", name.replace(".", "/")).read_text().strip() for name in KUBELET_SYSCTLS}


def _mounts_under(folder):
    prefix = str(folder) + "/"
    with open("/proc/mounts", encoding="utf-8") as handle:
        return [line.split()[1] for line in handle if line.split()[1].startswith(prefix)]


def _cgroup_dirs(name):
    with open("/proc/mounts", encoding="utf-8") as handle:
        mounts = [line.split()[1] for line in handle if line.split()[2] in ("cgroup", "cgroup2")]
    return [os.path.join(mount, name) for mount in mounts if os.path.isdir(os.path.join(mount, name))]


def _restricted_container(name, image, command, **extra):
    container = {
        "name": name, "image": image, "imagePullPolicy": "Never", "command": command,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    container.update(extra)
    return container


def _restricted_pod_spec(containers, volumes=()):
    return {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": containers,
        "volumes": list(volumes),
    }


def _diagnose(core, namespace, name):
    """Events and container states of a pod, for an assertion message."""
    lines = []
    try:
        pod = core.read_namespaced_pod(name, namespace)
        lines.append("phase %s" % pod.status.phase)
        for status in pod.status.container_statuses or []:
            lines.append("container %s: %s" % (status.name, status.state))
    except ApiException as exc:
        lines.append("reading the pod: %s" % exc.status)
    for event in core.list_namespaced_event(namespace).items:
        if event.involved_object.name == name:
            lines.append("event %s %s: %s" % (event.type, event.reason, event.message))
    return "\n".join(lines)


def _run_pod(core, namespace, name, spec, timeout=120):
    """Create a pod, wait until it ends; returns its log. Fails (with events) unless Succeeded."""
    core.create_namespaced_pod(namespace, {"apiVersion": "v1", "kind": "Pod",
                                           "metadata": {"name": name}, "spec": spec})

    def finished():
        phase = core.read_namespaced_pod(name, namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    try:
        phase = wait_for(finished, timeout, 0.3, "pod %s/%s to finish" % (namespace, name))
    except AssertionError as exc:
        raise AssertionError("%s\n%s" % (exc, _diagnose(core, namespace, name))) from None
    log = core.read_namespaced_pod_log(name, namespace)
    assert phase == "Succeeded", "pod %s/%s %s; log:\n%s\n%s" % (
        namespace, name, phase, log, _diagnose(core, namespace, name))
    return log


# ---------------------------------------------------------------- start and stop


@pytest.fixture
def short_tmp():
    """A directory with a short path: pytest's tmp_path grows with its run counter, and the
    kubelet's unix sockets below a state dir there can pass the 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="bbn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _api_rules(slot):
    rules = subprocess.run(["iptables", "-t", "nat", "-S", "PREROUTING"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return [rule for rule in rules if "biometrics-node-%d-api" % slot in rule]


def _route_localnet(bridge):
    return Path("/proc/sys/net/ipv4/conf/%s/route_localnet" % bridge).read_text().strip()


def test_prerequisite_missing_fails_naming_it(tmp_path):
    state_dir = tmp_path / "cluster"
    result = _script("start", state_dir, 120, RUNC=str(tmp_path / "no-such-runc"))
    assert result.returncode != 0
    assert "node prerequisite missing: runc" in result.stderr, result.stderr
    assert str(tmp_path / "no-such-runc") in result.stderr
    # Checked before anything starts: no process of that state dir, no pid file.
    assert processes_mentioning(str(state_dir.resolve()) + "/") == []
    assert not list(state_dir.glob("pids/*.pid"))


def test_state_dir_too_long_for_the_kubelet_sockets_is_refused(tmp_path):
    state_dir = tmp_path / ("c" * 90)
    result = _script("start", state_dir, 120)
    assert result.returncode != 0
    assert "node prerequisite missing: a shorter state dir" in result.stderr, result.stderr
    assert processes_mentioning(str(state_dir.resolve()) + "/") == []


def test_start_stop_leaves_nothing_behind(short_tmp):
    """A private cluster with its own node; `stop` puts the machine back as it was."""
    state_dir = (short_tmp / "cluster").resolve()
    sysctls_before = _sysctls()
    # Another node of this machine (a developer's cluster, the session's) keeps the kubelet's
    # sysctls; the registry's record of the originals shows one runs.
    other_node = (REGISTRY / "sysctl.orig").exists()
    marker = "biometrics-node-test-%s" % uuid.uuid4().hex[:12]

    t0 = time.monotonic()
    started = _script("start", state_dir, START_TIMEOUT)
    start_seconds = time.monotonic() - t0
    if started.returncode != 0:
        _script("stop", state_dir, 300)
        unavailable("hack/control-plane.sh start (with the node) failed:\n%s" % started.stderr[-3000:])
    try:
        ready = re.search(r"node (\S+) ready in ([\d.]+)s", started.stderr)
        assert ready, started.stderr
        print("start: %.1fs in all, node ready %ss after containerd started" % (start_seconds, ready.group(2)))
        exported = script_env(state_dir)
        node_ip = exported["BIOMETRICS_NODE_IP"]
        assert node_ip == ready.group(1)
        slot = int(node_ip.split(".")[2])
        bridge, cgroup = "bmnode%d" % slot, "biometrics-node-%d" % slot

        cluster = KubeCluster(state_dir / "kubeconfig")
        node = json.loads(cluster.kubectl("get", "node", node_ip, "-o", "json").stdout)
        conditions = {item["type"]: item["status"] for item in node["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        assert not node["spec"].get("taints")
        assert {"type": "InternalIP", "address": node_ip} in node["status"]["addresses"]
        assert (state_dir / "pids" / "kubelet.pid").is_file()

        # A running pod, so that there are mounts (emptyDir, token), a sandbox and a process.
        image = import_test_image(state_dir)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": "default"},
               "spec": {"terminationGracePeriodSeconds": 30, "containers": [{
                   "name": "c", "image": image, "imagePullPolicy": "Never",
                   "command": ["/bin/sh", "-c", "echo %s; sleep 300; echo %s" % (marker, marker)],
                   "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                   "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}]}}
        cluster.kubectl("apply", "-f", "-", input_text=json.dumps(pod))
        cluster.kubectl("wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s", timeout=150)
        assert processes_mentioning(marker)
        assert _mounts_under(state_dir)
        assert subprocess.run(["ip", "link", "show", bridge], capture_output=True, check=False).returncode == 0
        assert _cgroup_dirs(cgroup)
        assert _sysctls() == KUBELET_SYSCTLS
        assert (REGISTRY / ("slot-%d" % slot)).read_text().strip() == str(state_dir)
        assert _api_rules(slot), "no DNAT rule takes the node's pods to the API server"
        assert _route_localnet(bridge) == "1"
    finally:
        stopped = _script("stop", state_dir, 300)
    assert stopped.returncode == 0, stopped.stderr

    assert processes_mentioning(marker) == []
    assert processes_mentioning(str(state_dir) + "/") == []
    assert _mounts_under(state_dir) == []
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True, check=False).returncode != 0
    assert _cgroup_dirs(cgroup) == []
    assert _api_rules(slot) == []
    assert not [link for link in Path("/var/log/containers").glob("*.log")
                if os.readlink(link).startswith(str(state_dir) + "/")]
    slot_file = REGISTRY / ("slot-%d" % slot)
    assert not slot_file.exists() or slot_file.read_text().strip() != str(state_dir)
    if other_node:
        assert _sysctls() == KUBELET_SYSCTLS  # still needed by the other node
    else:
        assert _sysctls() == sysctls_before
        assert not (REGISTRY / "sysctl.orig").exists()
    assert _script("status", state_dir, 60).returncode != 0


# ---------------------------------------------------------------- pods on the session node


def test_pod_runs_and_its_log_comes_through_the_apiserver(kube_node, kube_api, kube_namespace):
    core = client.CoreV1Api(kube_api)
    token = uuid.uuid4().hex
    log = _run_pod(core, kube_namespace, "hello", {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "c", "image": kube_node.image, "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "echo hello $TOKEN; hostname"],
                        "env": [{"name": "TOKEN", "value": token}]}]})
    assert log.splitlines() == ["hello %s" % token, "hello"]
    pod = core.read_namespaced_pod("hello", kube_namespace)
    assert pod.spec.node_name == kube_node.name
    assert pod.status.pod_ip.startswith(kube_node.ip.rsplit(".", 1)[0] + ".")

    # The log came from the kubelet through the apiserver's client certificate; the kubelet
    # itself refuses a caller without one.
    port = core.read_node(kube_node.name).status.daemon_endpoints.kubelet_endpoint.port
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    url = "https://%s:%d/containerLogs/%s/hello/c" % (kube_node.ip, port, kube_namespace)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=insecure, timeout=10)  # nosec B310 - fixed https URL
    assert refused.value.code == 401


def test_restricted_pod_completes_as_nonroot_on_a_read_only_root(kube_node, kube_api, make_kube_namespace):
    core = client.CoreV1Api(kube_api)
    namespace = make_kube_namespace("node-psa", labels=RESTRICTED)
    script = ("id -u; id -g; echo scratch > /tmp/written && cat /tmp/written; "
              "if touch /rootfs-probe 2>/dev/null; then echo root-writable; else echo root-read-only; fi")
    log = _run_pod(core, namespace, "restricted", _restricted_pod_spec(
        [_restricted_container("c", kube_node.image, ["/bin/sh", "-c", script],
                               volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}])],
        [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]))
    assert log.splitlines() == ["65532", "65532", "scratch", "root-read-only"]


def test_hostpath_persistent_volume_binds_and_mounts(kube_node, kube_api, make_kube_namespace, tmp_path):
    core = client.CoreV1Api(kube_api)
    namespace = make_kube_namespace("node-pv", labels=RESTRICTED)
    data = tmp_path / "pv"
    data.mkdir()
    os.chmod(data, 0o777)  # fsGroup does not apply to hostPath volumes
    (data / "seed.txt").write_text("from the host\n")
    name = "bt-pv-%s" % uuid.uuid4().hex[:10]
    storage_class = name  # no StorageClass object: static binding by class name
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": storage_class,
                 "hostPath": {"path": str(data), "type": "Directory"}}})
    try:
        core.create_namespaced_persistent_volume_claim(namespace, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        wait_for(lambda: core.read_namespaced_persistent_volume_claim("data", namespace).status.phase == "Bound",
                 60, 0.3, "the PVC to bind (persistentvolume-binder-controller)")
        assert core.read_namespaced_persistent_volume_claim("data", namespace).spec.volume_name == name

        log = _run_pod(core, namespace, "writer", _restricted_pod_spec(
            [_restricted_container("c", kube_node.image, [
                "/bin/sh", "-c", "cat /data/seed.txt && echo written-by-pod > /data/out.txt && echo pv-ok"],
                volumeMounts=[{"name": "data", "mountPath": "/data"}])],
            [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]))
        assert log.splitlines() == ["from the host", "pv-ok"]
        assert (data / "out.txt").read_text() == "written-by-pod\n"
        assert (data / "out.txt").stat().st_uid == 65532
    finally:
        core.delete_persistent_volume(name)


def test_pod_reaches_a_tcp_server_on_the_host_at_the_node_ip(kube_node, kube_api, kube_namespace):
    core = client.CoreV1Api(kube_api)
    token = uuid.uuid4().hex
    received = []
    server = socket.socket()
    server.bind((kube_node.ip, 0))
    server.listen(1)
    server.settimeout(120)
    port = server.getsockname()[1]

    def serve():
        try:
            conn = server.accept()[0]
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            received.append(conn.recv(200))
            conn.sendall(("reply %s\n" % token).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        log = _run_pod(core, kube_namespace, "client", {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": kube_node.image, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", "echo ping-from-pod | nc -w 5 %s %d" % (kube_node.ip, port)]}]})
    finally:
        server.close()
        thread.join(10)
    assert received == [b"ping-from-pod\n"]
    assert log.strip() == "reply %s" % token


def test_every_minute_cronjob_job_completes(kube_node, kube_api, make_kube_namespace):
    core = client.CoreV1Api(kube_api)
    batch = client.BatchV1Api(kube_api)
    namespace = make_kube_namespace("node-cron", labels=RESTRICTED)
    batch.create_namespaced_cron_job(namespace, {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick"},
        "spec": {"schedule": "* * * * *", "concurrencyPolicy": "Forbid",
                 "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": _restricted_pod_spec(
                     [_restricted_container("c", kube_node.image, ["/bin/sh", "-c", "id -u; echo cron-ok"])])}}}}})

    def succeeded_job():
        return [job for job in batch.list_namespaced_job(namespace).items if (job.status.succeeded or 0) >= 1]

    # The schedule fires at the next full minute; allow for a loaded machine beyond that.
    try:
        job = wait_for(succeeded_job, 150, 1, "a Job of the CronJob to complete")[0]
    except AssertionError as exc:
        pods = core.list_namespaced_pod(namespace).items
        details = "\n".join(_diagnose(core, namespace, pod.metadata.name) for pod in pods)
        raise AssertionError("%s\n%s" % (exc, details)) from None
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=%s" % job.metadata.name).items
    assert [pod.status.phase for pod in pods] == ["Succeeded"]
    assert core.read_namespaced_pod_log(pods[0].metadata.name, namespace).splitlines() == ["65532", "cron-ok"]
    batch.delete_namespaced_cron_job("tick", namespace, propagation_policy="Background")
