# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seed's Velero job against a real Velero server (``velero_server``, tests/velero_fixtures.py).

The job file carries the volumes role's defaults (``roles/volumes/defaults/main.yml``: snapshot
volumes, location ``default``, ttl 720h) and runs through the runner CLI as the CronJob does
(``python -m ...engine.runner backup``), from the host with the test cluster's kubeconfig. The
Velero server (v1.18.3, AWS plugin v1.14.3, Velero's own CRDs) keeps its backups in a SeaweedFS
bucket; the engine keeps its record of the run (manifest + ``velero-backup.yaml``) on the same
S3 server under a prefix of the shared bucket.

Covered: the Backup object the engine creates, Velero completing it, what Velero wrote to the
bucket (metadata, resource tarball holding the namespace's objects, logs), the phase and
counters the engine records, and Velero's validation failures reported as a failed run.
Not covered: volume data (no node agent, no snapshot provider: the namespace has no volumes).
"""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid

import kubernetes
import pytest
import yaml

from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import open_payload
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.velero.source import BACKUP_PAYLOAD
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ROLE_DEFAULTS = os.path.join(REPO, "roles", "volumes", "defaults", "main.yml")


def run_backup(config, s3_server):
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"),
                   RUNNER_S3_ACCESS=s3_server.access_key, RUNNER_S3_SECRET=s3_server.secret_key)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", RUNNER, "backup", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                            timeout=600, cwd="/", check=False)
    return result, time.monotonic() - started


def seed_job(tmp_path, kube_cluster, s3_server, velero_namespace, include, prefix, **source):
    """The runner's job file for the volumes role's job, as its defaults render it."""
    with open(ROLE_DEFAULTS, encoding="utf-8") as handle:
        defaults = yaml.safe_load(handle)
    job = "%s-%s" % (defaults["volumes_name"], uuid.uuid4().hex[:6])
    config = {
        "job": job, "kind": "velero", "schedule": defaults["volumes_schedule"],
        "source": dict({
            "velero_namespace": velero_namespace, "include_namespaces": include,
            "snapshot_volumes": defaults["volumes_snapshot_volumes"],
            "storage_location": defaults["volumes_storage_location"], "ttl": defaults["volumes_ttl"],
            # On the host instead of the ServiceAccount token of the pod.
            "kubeconfig": kube_cluster.kubeconfig, "poll_interval": 0.5, "pickup_timeout": 60, "timeout": 300,
        }, **source),
        "storage": {"backend": "s3", "bucket": s3_server.bucket, "prefix": prefix,
                    "endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
                    "access_key_env": "RUNNER_S3_ACCESS", "secret_key_env": "RUNNER_S3_SECRET"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return job, path


def with_velero_log(result, velero_server):
    """The run's stderr and the end of the server's log, for a failure message."""
    return "%s\n--- velero log %s:\n%s" % (result.stderr, velero_server.log_path, velero_server.process.tail(60))


def assert_no_secret(result, s3_server):
    for secret in (s3_server.access_key, s3_server.secret_key):
        assert secret not in result.stdout and secret not in result.stderr


def test_seed_velero_job_is_completed_by_velero(tmp_path, kube_cluster, kube_api, make_kube_namespace, s3_server,
                                                velero_server):
    app = make_kube_namespace("biometrics")
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_config_map(app, kubernetes.client.V1ConfigMap(
        metadata=kubernetes.client.V1ObjectMeta(name="templates-index"), data={"count": "321"}))
    core.create_namespaced_secret(app, kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name="reader"), string_data={"token": "not-a-real-one"}))
    prefix = "velero-engine-%s" % uuid.uuid4().hex[:8]
    job, config = seed_job(tmp_path, kube_cluster, s3_server, velero_server.namespace, [app], prefix)

    result, seconds = run_backup(config, s3_server)
    assert result.returncode == 0, with_velero_log(result, velero_server)
    print("velero backup through the runner: %.1fs" % seconds)
    assert_no_secret(result, s3_server)

    # What Velero itself did with the Backup the engine created.
    manifests = Catalog(open_storage(s3_server.storage_options(prefix=prefix))).scan(job)
    assert len(manifests) == 1
    manifest = manifests[0]
    stats = manifest["stats"]
    name = stats["backup_name"]
    live = velero_server.backup(name)
    assert live["status"]["phase"] == "Completed", live["status"]
    assert live["spec"]["includedNamespaces"] == [app]
    assert live["spec"]["storageLocation"] == "default" and live["spec"]["snapshotVolumes"] is True
    assert not live["status"].get("errors")
    progress = live["status"]["progress"]
    # The namespace, its two objects, its ServiceAccount and kube-root-ca.crt at least.
    assert progress["itemsBackedUp"] == progress["totalItems"] >= 4

    # The engine's record: Velero's phase and counters, the Backup with its final status.
    assert stats["phase"] == "Completed" and stats["waited"] is True
    assert stats["velero_namespace"] == velero_server.namespace
    assert (stats["itemsBackedUp"], stats["totalItems"]) == (progress["itemsBackedUp"], progress["totalItems"])
    assert stats["uid"] == live["metadata"]["uid"]
    assert json.loads(result.stdout)["backup_id"] == manifest["id"]
    stream = open_payload(open_storage(s3_server.storage_options(prefix=prefix)), manifest, BACKUP_PAYLOAD)
    recorded = yaml.safe_load(stream.read(1 << 20))
    stream.finish()
    assert recorded["metadata"]["name"] == name and recorded["status"]["phase"] == "Completed"

    # What Velero wrote to its bucket (BackupStorageLocation default, SeaweedFS).
    keys = velero_server.bucket_keys("backups/%s/" % name)
    print("velero wrote %s" % ", ".join(keys))
    for suffix in ("velero-backup.json", "%s.tar.gz" % name, "%s-logs.gz" % name,
                   "%s-resource-list.json.gz" % name):
        assert "backups/%s/%s" % (name, suffix) in keys, keys
    client = s3_server.client()
    metadata = json.loads(client.get_object(Bucket=velero_server.bucket,
                                            Key="backups/%s/velero-backup.json" % name)["Body"].read())
    assert metadata["metadata"]["name"] == name and metadata["metadata"]["uid"] == live["metadata"]["uid"]
    tarball = client.get_object(Bucket=velero_server.bucket, Key="backups/%s/%s.tar.gz" % (name, name))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        members = archive.getnames()
        configmap = json.load(archive.extractfile(
            "resources/configmaps/namespaces/%s/templates-index.json" % app))
    assert configmap["data"] == {"count": "321"}
    assert "resources/secrets/namespaces/%s/reader.json" % app in members
    resource_list = json.loads(gzip.decompress(client.get_object(
        Bucket=velero_server.bucket, Key="backups/%s/%s-resource-list.json.gz" % (name, name))["Body"].read()))
    assert "%s/templates-index" % app in resource_list["v1/ConfigMap"]


@pytest.fixture
def velero_server_restarted_after(velero_server):
    """The module's server; restarted after the test, as a refused backup can leave Velero's
    queue stuck for the next one (VeleroServer.restart)."""
    yield velero_server
    velero_server.restart()


@pytest.mark.parametrize("case", ["unknown-location", "missing-bucket"])
def test_velero_refusing_the_backup_fails_the_run(tmp_path, kube_cluster, make_kube_namespace, s3_server,
                                                  velero_server_restarted_after, case):
    velero_server = velero_server_restarted_after
    app = make_kube_namespace("biometrics")
    if case == "unknown-location":
        location = "nowhere-%s" % uuid.uuid4().hex[:6]
        reasons = ('"%s" not found' % location,)
    else:
        # A location whose bucket does not exist: Velero marks it Unavailable and refuses it.
        location = "gone-%s" % uuid.uuid4().hex[:6]
        velero_server.location(location, "no-such-bucket-%s" % uuid.uuid4().hex[:8])
        velero_server.wait_location(location, "Unavailable", timeout=120)
        reasons = ("BackupStorageLocation %s is in Unavailable status" % location,)
    prefix = "velero-engine-%s" % uuid.uuid4().hex[:8]
    job, config = seed_job(tmp_path, kube_cluster, s3_server, velero_server.namespace, [app], prefix,
                           storage_location=location)

    result, seconds = run_backup(config, s3_server)
    print("refused velero backup through the runner: %.1fs" % seconds)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "finished FailedValidation" in line]
    assert len(lines) == 1, with_velero_log(result, velero_server)
    print(lines[0])
    assert "velero: backup %s/%s-" % (velero_server.namespace, job) in lines[0]
    assert all(reason in lines[0] for reason in reasons), lines[0]
    assert_no_secret(result, s3_server)
    assert Catalog(open_storage(s3_server.storage_options(prefix=prefix))).scan(job) == []
    name = lines[0].split("velero: backup %s/" % velero_server.namespace)[1].split()[0]
    live = velero_server.backup(name)
    assert live["status"]["phase"] == "FailedValidation"
    assert velero_server.bucket_keys("backups/%s/" % name) == []
