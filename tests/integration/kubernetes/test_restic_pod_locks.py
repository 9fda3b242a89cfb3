# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A restic lock whose holder pod has finished is removed at once (engine/podlocks.py).

Real parts only: the session's API server holds the pod and Job objects (created unscheduled,
their status written as the kubelet would), and a real restic takes a lock under the pod's
name as its hostname (a UTS namespace, as a pod has) before it is killed with SIGKILL. To
restic that lock is live for 30 minutes: another host's, fresh. The tests that run pods
(test_seed_pods.py) kill a real backup pod.
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


def _pod(kube_api, namespace, name, phase):
    """A pod no scheduler takes (so no kubelet runs it), its phase written through the status."""
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": name},
        "spec": {"schedulerName": "nobody", "restartPolicy": "Never",
                 "containers": [{"name": "runner", "image": "runner:test"}]}})
    core.patch_namespaced_pod_status(name, namespace, {"status": {"phase": phase}})


def _job(kube_api, namespace, name, managed):
    labels = {"app.kubernetes.io/managed-by": "biometrics.backup"} if managed else {}
    kubernetes.client.BatchV1Api(kube_api).create_namespaced_job(namespace, {
        "metadata": {"name": name, "labels": labels},
        "spec": {"suspend": True, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "runner", "image": "runner:test"}]}}}})


def _repository(tmp_path, holders=None, notices=None):
    options = {"backend": "filesystem", "path": str(tmp_path), "prefix": "repo"}
    return rs.ResticRepository(options, PASSWORD, cache_dir=False, lock_holders=holders,
                               notice=notices.append if notices is not None else None)


def _lock_left_by_killed_restic(repo, hostname):
    """restic backup --stdin under ``hostname``, killed while it holds its lock."""
    command = "hostname %s && exec %s -r %s --no-cache backup --stdin --stdin-filename held" % (
        hostname, repo.binary, repo.url)
    proc = subprocess.Popen(["unshare", "-u", "sh", "-c", command], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=tool_env({"RESTIC_PASSWORD": PASSWORD}))
    deadline = time.monotonic() + 30
    while not repo.locks():
        assert proc.poll() is None and time.monotonic() < deadline, "restic took no lock"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    (lock,) = repo.locks()
    assert lock["hostname"] == hostname and not lock["stale"], lock  # live by restic's rule
    return lock


def _holders(kube_cluster, namespace):
    return PodLockHolders(namespace, {"kubeconfig": str(kube_cluster.kubeconfig)}, own_hostname=socket.gethostname())


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
def test_the_lock_of_a_finished_pod_is_removed_and_the_prune_goes_on(
        kube_cluster, kube_api, namespace, tmp_path, phase):
    pod = "pg-backup-29312345-%s" % uuid.uuid4().hex[:5]
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
    checked = _repository(tmp_path, _holders(kube_cluster, namespace), notices)
    (lock,) = checked.locks()
    assert lock["stale"] and "has finished (%s)" % phase in lock["holder_finished"], lock
    checked.prune()
    assert checked.locks() == []
    assert len(notices) == 1 and left["id"][:12] in notices[0] and pod in notices[0], notices
    checked.check(read_data_subset="all")


def test_the_lock_of_a_running_pod_stays(kube_cluster, kube_api, namespace, tmp_path):
    pod = "pg-backup-29312346-%s" % uuid.uuid4().hex[:5]
    repo = _repository(tmp_path, _holders(kube_cluster, namespace))
    repo.init_if_missing()
    left = _lock_left_by_killed_restic(repo, pod)
    _pod(kube_api, namespace, pod, "Running")
    with pytest.raises(rs.RepositoryLockedError, match="the lock is live"):
        repo.prune()
    assert [lock["id"] for lock in repo.locks()] == [left["id"]]
    # A host outside the cluster (no such pod, no Job of ours) proves nothing either.
    other = _repository(tmp_path, _holders(kube_cluster, namespace))
    assert other.lock_holders.finished({"hostname": "operator-laptop"}, 3600) is None


def test_a_gone_pod_of_our_job_frees_its_lock_once_restic_stopped_refreshing_it(kube_cluster, kube_api, namespace):
    holders = _holders(kube_cluster, namespace)
    _job(kube_api, namespace, "redis-backup-29312347", managed=True)
    _job(kube_api, namespace, "someone-elses-29312347", managed=False)
    gone = {"hostname": "redis-backup-29312347-k2x9q"}
    # restic refreshes a live lock every 5 minutes: younger than two intervals proves nothing.
    assert holders.finished(gone, 9 * 60) is None
    reason = holders.finished(gone, 11 * 60)
    assert reason and "no longer exists (Job redis-backup-29312347)" in reason
    assert holders.finished({"hostname": "someone-elses-29312347-k2x9q"}, 3600) is None
    assert holders.finished({"hostname": "no-such-job-29312347-k2x9q"}, 3600) is None
    assert holders.unusable_reason is None


def test_an_api_server_that_cannot_answer_leaves_restics_rule(tmp_path):
    holders = PodLockHolders("default", {"host": "https://127.0.0.1:9", "request_timeout": 2},
                             own_hostname="here")
    assert holders.finished({"hostname": "pg-backup-1-abcde"}, 3600) is None
    assert holders.unusable_reason and "restic lock check" in holders.unusable_reason
    notices = []
    repo = _repository(tmp_path, holders, notices)
    repo.init_if_missing()
    _lock_left_by_killed_restic(repo, "pg-backup-2-abcde")
    (lock,) = repo.locks()
    assert not lock["stale"] and lock["holder_finished"] is None
    assert len(notices) == 1 and "restic's 30-minute rule stands" in notices[0], notices
