# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""When the runner asks the API server about a lock's pod, and what proves the pod finished.
(The questions themselves go to a real API server in tests/integration/kubernetes/test_restic_pod_locks.py.)"""

from ansible_collections.biometrics.backup.plugins.module_utils.engine import podlocks


def _service_account(tmp_path, token="tok-123", namespace="backups", ca=True):
    if token is not None:
        (tmp_path / "token").write_text(token + "\n")
    if namespace is not None:
        (tmp_path / "namespace").write_text(namespace)
    if ca:
        (tmp_path / "ca.crt").write_text("")
    return str(tmp_path)


def test_in_cluster_needs_the_service_host_and_a_mounted_token(tmp_path):
    directory = _service_account(tmp_path, ca=False)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    holders = podlocks.PodLockHolders.in_cluster(directory, env)
    assert holders.namespace == "backups" and holders.server == "https://10.96.0.1:443"
    assert holders.timeout == podlocks.TIMEOUT
    assert holders._token == "tok-123" and holders._token_file == directory + "/token"
    assert podlocks.PodLockHolders.in_cluster(directory, {}) is None  # not in a pod
    ipv6 = podlocks.PodLockHolders.in_cluster(directory, {"KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert ipv6.server == "https://[fd00::1]:443"


def test_without_a_token_or_namespace_nothing_is_asked(tmp_path):
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    for name, missing in (("no-token", {"token": None}), ("empty-token", {"token": ""}),
                          ("no-namespace", {"namespace": None})):
        directory = tmp_path / name
        directory.mkdir()
        assert podlocks.PodLockHolders.in_cluster(_service_account(directory, ca=False, **missing), env) is None, name


def _pod(phase="Failed", labels=None, states=("terminated",), init_states=()):
    def statuses(names):
        return [{"name": "c%d" % index, "state": {state: {}}} for index, state in enumerate(names)]
    return {"metadata": {"labels": {"app.kubernetes.io/managed-by": "biometrics.backup"} if labels is None else labels},
            "status": {"phase": phase, "containerStatuses": statuses(states),
                       "initContainerStatuses": statuses(init_states)}}


def test_a_finished_pod_is_ours_terminal_and_has_every_container_terminated():
    assert "has finished (Failed, every container terminated)" in podlocks._finished_pod(_pod(), "ns", "p")
    assert podlocks._finished_pod(_pod("Succeeded", init_states=("terminated",)), "ns", "p")
    assert podlocks._finished_pod(_pod("Running", states=("running",)), "ns", "p") is None
    assert podlocks._finished_pod(_pod("Unknown"), "ns", "p") is None
    assert podlocks._finished_pod(_pod(states=("terminated", "running")), "ns", "p") is None
    assert podlocks._finished_pod(_pod(init_states=("waiting",)), "ns", "p") is None
    assert podlocks._finished_pod(_pod(states=()), "ns", "p") is None  # no status reported yet
    assert podlocks._finished_pod(_pod(labels={}), "ns", "p") is None
    assert podlocks._finished_pod(None, "ns", "p") is None
    assert podlocks._finished_pod({"status": "odd"}, "ns", "p") is None


def test_hostnames_that_are_no_pod_names_are_not_asked_about():
    holders = podlocks.PodLockHolders("ns", "https://192.0.2.1:6443", "t", own_hostname="me", timeout=0.01)
    for hostname in ("me", "Laptop", "a_b", "", None, "x" * 254):
        assert holders.finished({"hostname": hostname}) is None
    assert holders.unusable_reason is None  # none of them needed a request


def test_the_token_is_read_again_before_each_question(tmp_path):
    """The kubelet rotates a projected service account token in place."""
    directory = _service_account(tmp_path, ca=False)
    holders = podlocks.PodLockHolders.in_cluster(directory, {"KUBERNETES_SERVICE_HOST": "192.0.2.1"})
    holders.timeout = 0.5
    (tmp_path / "token").write_text("tok-rotated\n")
    assert holders.finished({"hostname": "pg-backup-1-abcde"}) is None  # TEST-NET: no answer
    assert holders._token == "tok-rotated" and holders.unusable_reason
