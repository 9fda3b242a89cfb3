"""A real Velero server for the integration tests (pytest plugin, loaded by tests/conftest.py).

``velero_server`` (module scope) runs the Velero server built by ``hack/build-velero.sh``
(``velero`` v1.18.3 and ``velero-plugin-for-aws`` v1.14.3, from the Go module proxy, cached
under ``~/.cache/biometrics-backup/velero/<version>/``) as a host process against the session
control plane (``kube_cluster``), with the SeaweedFS S3 fixture as its storage:

1. Velero's own CRDs, as ``velero install --crds-only --dry-run -o yaml`` prints them, replace
   the minimal ``backups.velero.io`` of ``hack/crds`` (which is put back afterwards, and the
   CRDs that did not exist before are removed again);
2. a namespace of its own, a bucket of its own in SeaweedFS, a credentials file in the AWS
   plugin's format, and the BackupStorageLocation ``default`` (``s3Url``, ``s3ForcePathStyle``);
3. ``velero server`` with the kubeconfig of the test cluster, the plugin directory of the
   build, the default uploader and no node agent; ready once the location is ``Available``.

When Velero cannot be built or started the test is skipped, or fails under ``CI=true``
(``require_or_skip``). A server that starts but never finds its location Available fails the
test: that is the behaviour under test, not a missing prerequisite.
"""

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ci_env import require_or_skip
from kube_fixtures import wait_for
from servers import LOOPBACK, ServerProcess, ServerStartError, free_ports, http_status

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-velero.sh"
MINIMAL_BACKUP_CRD = REPO_ROOT / "hack" / "crds" / "velero.io_backups.yaml"
VELERO_VERSION = os.environ.get("VELERO_VERSION") or "v1.18.3"
CACHE_ROOT = Path(os.environ.get("BIOMETRICS_CACHE") or Path.home() / ".cache" / "biometrics-backup")
# A cold build is about 8 minutes on two shared cores; leave room for a busy machine.
BUILD_TIMEOUT = 3600
AVAILABLE_TIMEOUT = 180
VELERO = ("velero.io", "v1")


def _tail(text, lines=25):
    return "\n".join(text.strip().splitlines()[-lines:])


def build_velero():
    """Paths of (velero binary, plugin directory), built by hack/build-velero.sh if missing."""
    out = CACHE_ROOT / "velero" / VELERO_VERSION
    try:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                check=False, env=dict(os.environ, VELERO_VERSION=VELERO_VERSION))
    except subprocess.TimeoutExpired:
        require_or_skip("hack/build-velero.sh did not finish within %ss" % BUILD_TIMEOUT)
    if result.returncode != 0:
        require_or_skip("hack/build-velero.sh failed (rc=%s):\n%s" % (result.returncode,
                                                                      _tail(result.stderr + result.stdout)))
    velero, plugins = out / "velero", out / "plugins"
    if not os.access(velero, os.X_OK) or not os.access(plugins / "velero-plugin-for-aws", os.X_OK):
        require_or_skip("hack/build-velero.sh succeeded but %s or %s/velero-plugin-for-aws is missing"
                        % (velero, plugins))
    return velero, plugins


def velero_crds(velero):
    """Velero's CustomResourceDefinitions as the release installs them (a list of dicts)."""
    result = subprocess.run([str(velero), "install", "--crds-only", "--dry-run", "-o", "yaml"],
                            capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ, HOME="/tmp"))
    if result.returncode != 0:
        require_or_skip("velero install --crds-only --dry-run failed: %s" % _tail(result.stderr))
    crds = []
    for document in yaml.safe_load_all(result.stdout):
        if not document:
            continue
        for item in document.get("items", [document]) if document.get("kind") == "List" else [document]:
            if item.get("kind") == "CustomResourceDefinition":
                item.pop("status", None)
                crds.append(item)
    if not crds:
        require_or_skip("velero install --crds-only --dry-run printed no CRD")
    return crds


class CrdInstaller:
    """Create or replace CRDs through the API; ``restore()`` puts the cluster back as it was."""

    def __init__(self, kube_api):
        import kubernetes  # pylint: disable=import-outside-toplevel
        self.kubernetes = kubernetes
        self.api = kubernetes.client.ApiextensionsV1Api(kube_api)
        self.created = []

    def _existing(self, name):
        try:
            return self.api.read_custom_resource_definition(name)
        except self.kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def put(self, crd, remember=True):
        """Replace the CRD named like ``crd`` (a dict), or create it."""
        name = crd["metadata"]["name"]
        existing = self._existing(name)
        if existing is None:
            self.api.create_custom_resource_definition(crd)
            if remember:
                self.created.append(name)
        else:
            body = dict(crd, metadata=dict(crd["metadata"], resourceVersion=existing.metadata.resource_version))
            self.api.replace_custom_resource_definition(name, body)
        wait_for(lambda: self._established(name), 60, 0.2, "CRD %s Established" % name)

    def _established(self, name):
        crd = self._existing(name)
        conditions = (crd.status.conditions or []) if crd is not None and crd.status else []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    def restore(self):
        """Put the minimal Backup CRD of hack/crds back and remove the CRDs created here."""
        with open(MINIMAL_BACKUP_CRD, encoding="utf-8") as handle:
            self.put(yaml.safe_load(handle), remember=False)
        for name in self.created:
            try:
                self.api.delete_custom_resource_definition(name)
            except self.kubernetes.client.exceptions.ApiException as exc:
                if exc.status != 404:
                    raise


class VeleroServer:
    """A running ``velero server``: its namespace, bucket, location and how to reach them."""

    def __init__(self, kube_api, s3, namespace, bucket, work_dir, process, binary, metrics_url):
        import kubernetes  # pylint: disable=import-outside-toplevel
        self.objects = kubernetes.client.CustomObjectsApi(kube_api)
        self.s3 = s3
        self.namespace = namespace
        self.bucket = bucket
        self.work_dir = Path(work_dir)
        self.process = process
        self.binary = binary
        self.startup_seconds = 0.0
        self.metrics_url = metrics_url

    @property
    def log_path(self):
        return self.process.log_path

    def location(self, name, bucket, default=False):
        """A BackupStorageLocation ``name`` on the SeaweedFS server, bucket ``bucket``."""
        body = {
            "apiVersion": "velero.io/v1", "kind": "BackupStorageLocation",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "provider": "aws", "default": default,
                "objectStorage": {"bucket": bucket},
                "config": {"region": self.s3.region, "s3ForcePathStyle": "true", "s3Url": self.s3.endpoint_url},
            },
        }
        return self.objects.create_namespaced_custom_object(*VELERO, self.namespace, "backupstoragelocations", body)

    def location_phase(self, name):
        item = self.objects.get_namespaced_custom_object(*VELERO, self.namespace, "backupstoragelocations", name)
        return (item.get("status") or {}).get("phase")

    def wait_location(self, name, phase, timeout=AVAILABLE_TIMEOUT):
        """Wait until the location has ``phase``; AssertionError naming the server log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.process.running():
                raise AssertionError("velero server exited (rc=%s) before location %s became %s:\n%s"
                                     % (self.process.proc.returncode, name, phase, self.process.tail()))
            if self.location_phase(name) == phase:
                return
            if time.monotonic() > deadline:
                raise AssertionError("location %s/%s not %s after %ss (phase %r); velero log %s:\n%s" % (
                    self.namespace, name, phase, timeout, self.location_phase(name), self.log_path,
                    self.process.tail()))
            time.sleep(0.3)

    def backup(self, name):
        return self.objects.get_namespaced_custom_object(*VELERO, self.namespace, "backups", name)

    def restart(self):
        """Stop and start the server process (same namespace, locations and backups).

        A backup Velero refuses (``FailedValidation``) can leave the server counting it as
        running. Velero's queue (up to 1.18.3, velero-io/velero#10519) counts a dequeued backup
        as running only after its ``ReadyToStart`` patch has returned; a refusal can be over,
        and its count cleared, before that. The late count then never goes away and every
        later backup of that server stays ``Queued``. The count lives in memory only
        (docs/formats.md, velero).
        """
        self.process.stop()
        self.process.start()
        # The new process is up once it serves metrics; its controllers follow within seconds,
        # well inside the pickup_timeout of the next run.
        self.process.wait_ready(lambda: http_status(self.metrics_url) == 200)

    def bucket_keys(self, prefix=""):
        """Every key of the Velero bucket under ``prefix``."""
        keys = []
        paginator = self.s3.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)


def _delete_namespace(kube_api, name):
    import kubernetes  # pylint: disable=import-outside-toplevel
    try:
        kubernetes.client.CoreV1Api(kube_api).delete_namespace(name)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="module")
def velero_server(kube_cluster, kube_api, s3_server):
    """A Velero server with the location ``default`` Available (see the module docstring)."""
    import kubernetes  # pylint: disable=import-outside-toplevel
    began = time.monotonic()
    velero, plugin_dir = build_velero()
    crds = velero_crds(velero)
    installer = CrdInstaller(kube_api)
    work_dir = tempfile.mkdtemp(prefix="velero-server-")
    namespace = "velero-%s" % uuid.uuid4().hex[:8]
    process = None
    try:
        for crd in crds:
            installer.put(crd)
        kubernetes.client.CoreV1Api(kube_api).create_namespace(
            kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=namespace)))
        bucket = s3_server.create_bucket("velero")
        # The AWS plugin's credentials file, what `velero install --secret-file` mounts.
        credentials = os.path.join(work_dir, "credentials-velero")
        with open(os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as out:
            out.write("[default]\naws_access_key_id=%s\naws_secret_access_key=%s\n"
                      % (s3_server.access_key, s3_server.secret_key))
        # The location is created first: the server looks up its default location at startup.
        metrics_port, profiler_port = free_ports(2)
        env = dict(os.environ, AWS_SHARED_CREDENTIALS_FILE=credentials, HOME=work_dir, VELERO_NAMESPACE=namespace)
        env.pop("KUBECONFIG", None)
        process = ServerProcess(
            "velero server",
            [str(velero), "server", "--kubeconfig", kube_cluster.kubeconfig, "--namespace", namespace,
             "--plugin-dir", str(plugin_dir), "--features=",
             "--metrics-address", "%s:%d" % (LOOPBACK, metrics_port),
             "--profiler-address", "%s:%d" % (LOOPBACK, profiler_port),
             "--log-level", "info"],
            os.path.join(work_dir, "velero.log"), env=env, cwd=work_dir)
        server = VeleroServer(kube_api, s3_server, namespace, bucket, work_dir, process, velero,
                              "http://%s:%d/metrics" % (LOOPBACK, metrics_port))
        server.location("default", bucket, default=True)
        try:
            process.start()
        except ServerStartError as exc:
            require_or_skip(str(exc))
        server.wait_location("default", "Available")
        server.startup_seconds = round(time.monotonic() - began, 1)
        yield server
    finally:
        # The namespace goes while Velero still runs (nothing of it waits on a finalizer), then
        # the server, then the CRDs of hack/crds come back for the rest of the session.
        _delete_namespace(kube_api, namespace)
        if process is not None:
            process.stop()
        installer.restore()
        if os.environ.get("BIOMETRICS_KEEP_SERVER_DIRS", "") in ("", "0", "false"):
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print("velero server directory kept: %s" % work_dir)
