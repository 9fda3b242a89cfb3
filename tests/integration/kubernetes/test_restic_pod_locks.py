# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A restic lock whose holder pod has finished is removed at once (engine/podlocks.py).

Real parts only: the session's API server holds the pod objects (created unscheduled, their
status written as a kubelet would write it), and a real restic takes a lock under the pod's name
as its hostname (a UTS namespace, as a pod has) before it is killed with SIGKILL. To restic that
lock is live for 30 minutes: another host's, fresh. The checker asks the API server with a real
token: the admin's, or a service account's without permissions. test_seed_pods.py kills a real
backup pod.
"""

import io
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from ci_env import require_or_skip
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.podlocks import PodLockHolders
from ansible_collections.biometrics.backup.plugins.module_utils.engine.procutil import tool_env

kubernetes = pytest.importorskip("kubernetes")

PASSWORD = "pw-podlocks-7Qx"
LABELS = {"app.kubernetes.io/managed-by": "biometrics.backup"}


@pytest.fixture(scope="module", autouse=True)
def _tools():
    for tool in ("restic", "unshare"):
        if shutil.which(tool) is None:
            require_or_skip("%s is not installed" % tool)


@pytest.fixture(scope="module")
def namespace(kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    name = "podlocks-%s" % uuid.uuid4().hex[:8]
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def ca_file(kube_cluster, tmp_path_factory):
    path = tmp_path_factory.mktemp("podlocks-ca") / "ca.crt"
    path.write_text(kube_cluster.ca_pem)
    return str(path)


def _holders(kube_cluster, namespace, ca_file, token=None, timeout=10):
    return PodLockHolders(namespace, kube_cluster.server, token or kube_cluster.token, ca_file,
                          own_hostname=socket.gethostname(), timeout=timeout)


def _pod(kube_api, namespace, name, phase, container_state=None, labels=None):
    """A pod no scheduler takes (so no kubelet runs it), its status written as a kubelet would."""
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": name, "labels": LABELS if labels is None else labels},
        "spec": {"schedulerName": "nobody", "restartPolicy": "Never",
                 "containers": [{"name": "runner", "image": "runner:test"}]}})
    state = container_state or ({"terminated": {"exitCode": 137, "reason": "Error"}} if phase in ("Failed", "Succeeded")
                                else {"running": {}})
    core.patch_namespaced_pod_status(name, namespace, {"status": {"phase": phase, "containerStatuses": [{
        "name": "runner", "image": "runner:test", "imageID": "", "ready": False, "restartCount": 0, "state": state}]}})


def _repository(tmp_path, holders=None, notices=None):
    options = {"backend": "filesystem", "path": str(tmp_path), "prefix": "repo"}
    return rs.ResticRepository(options, PASSWORD, cache_dir=False, lock_holders=holders,
                               notice=notices.append if notices is not None else None)


def _lock_left_by_killed_restic(repo, hostname):
    """restic backup --stdin under ``hostname``, killed while it holds its lock."""
    command = "hostname %s && exec %s -r %s --no-cache backup --stdin --stdin-filename held" % (
        hostname, repo.binary, repo.url)
    # -r: a user namespace too, so that setting the hostname needs no privilege
    proc = subprocess.Popen(["unshare", "-ur", "sh", "-c", command], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=tool_env({"RESTIC_PASSWORD": PASSWORD}))
    deadline = time.monotonic() + 30
    while not [lock for lock in repo.locks() if lock["hostname"] == hostname]:
        assert proc.poll() is None and time.monotonic() < deadline, "restic took no lock"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    (lock,) = [lock for lock in repo.locks() if lock["hostname"] == hostname]
    assert not lock["stale"], lock  # live by restic's rule
    return lock


def _pod_name():
    return "pg-backup-29312345-%s" % uuid.uuid4().hex[:5]


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
def test_the_lock_of_a_finished_pod_is_removed_and_the_prune_goes_on(
        kube_cluster, kube_api, namespace, ca_file, tmp_path, phase):
    pod = _pod_name()
    plain = _repository(tmp_path)
    plain.init_if_missing()
    plain.backup_stream(io.BytesIO(b"x" * 4096), "dump.pgdump", {"job": "pg", "kind": "postgres",
                                                                 "backup_id": "20260101T000000Z-aaaaaa"})
    left = _lock_left_by_killed_restic(plain, pod)
    _pod(kube_api, namespace, pod, phase)

    # Without the pod check the lock is live for 30 minutes: the prune is refused.
    with pytest.raises(rs.RepositoryLockedError, match="the lock is live"):
        plain.prune()

    notices = []
    checked = _repository(tmp_path, _holders(kube_cluster, namespace, ca_file), notices)
    (lock,) = checked.locks()
    assert lock["stale"] and "has finished (%s, every container terminated)" % phase in lock["holder_finished"], lock
    checked.prune()
    assert checked.locks() == []
    assert len(notices) == 1 and left["id"][:12] in notices[0] and pod in notices[0], notices
    assert checked.lock_holders.unusable_reason is None
    checked.check(read_data_subset="all")


@pytest.mark.parametrize("phase, state, labels", [
    ("Running", None, None),
    # a lost node's pod, marked Failed by the pod garbage collector: its container may still run
    ("Failed", {"running": {}}, None),
    # not one of ours (a StatefulSet's pod, another workload's)
    ("Failed", None, {"app": "something-else"}),
], ids=["running", "failed-but-container-running", "not-ours"])
def test_the_lock_stays_unless_the_pod_proves_its_processes_gone(
        kube_cluster, kube_api, namespace, ca_file, tmp_path, phase, state, labels):
    pod = _pod_name()
    repo = _repository(tmp_path, _holders(kube_cluster, namespace, ca_file))
    repo.init_if_missing()
    left = _lock_left_by_killed_restic(repo, pod)
    _pod(kube_api, namespace, pod, phase, state, labels)
    with pytest.raises(rs.RepositoryLockedError, match="the lock is live"):
        repo.prune()
    assert [lock["id"] for lock in repo.locks()] == [left["id"]]
    assert repo.lock_holders.unusable_reason is None  # asked and answered: the answer proved nothing


def test_a_gone_pod_or_a_host_outside_the_cluster_proves_nothing(kube_cluster, namespace, ca_file):
    holders = _holders(kube_cluster, namespace, ca_file)
    assert holders.finished({"hostname": _pod_name()}) is None           # no such pod (deleted)
    assert holders.finished({"hostname": "Operator-Laptop.local"}) is None  # no pod name at all
    assert holders.finished({"hostname": socket.gethostname()}) is None  # this host: restic's own rule
    assert holders.unusable_reason is None


def test_a_token_without_permission_leaves_restics_rule_and_says_so(
        kube_cluster, kube_api, namespace, ca_file, tmp_path):
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "no-rights"}})
    token = core.create_namespaced_service_account_token("no-rights", namespace, {
        "spec": {"audiences": [], "expirationSeconds": 600}}).status.token
    pod = _pod_name()
    _pod(kube_api, namespace, pod, "Failed")
    notices = []
    repo = _repository(tmp_path, _holders(kube_cluster, namespace, ca_file, token=token), notices)
    repo.init_if_missing()
    _lock_left_by_killed_restic(repo, pod)
    (lock,) = repo.locks()
    assert not lock["stale"] and lock["holder_finished"] is None
    assert "HTTP 403" in repo.lock_holders.unusable_reason
    assert len(notices) == 1 and "restic's 30-minute rule stands" in notices[0], notices
    assert token not in notices[0]


def test_an_api_server_that_does_not_answer_is_given_up_after_the_timeout():
    # 192.0.2.0/24 is TEST-NET-1: nothing answers there, the connection attempt just waits.
    holders = PodLockHolders("default", "https://192.0.2.1:6443", "token", own_hostname="here", timeout=2)
    started = time.monotonic()
    assert holders.finished({"hostname": "pg-backup-1-abcde"}) is None
    assert time.monotonic() - started < 30, "the timeout was not applied"
    assert holders.unusable_reason and "192.0.2.1" in holders.unusable_reason
    assert holders.finished({"hostname": "pg-backup-2-abcde"}) is None  # not asked again
