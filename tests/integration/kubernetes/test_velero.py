# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The velero kind against the real control plane and its velero.io/v1 Backup CRD.

No Velero server runs here. Where a test needs one, a small thread in the test plays its
part the way Velero does it: it watches for new Backup objects through the API and writes
their ``status`` (phase, counters) onto them. The source under test only ever sees what the
API server returns; nothing in the engine is replaced.
"""

import threading
import time

import kubernetes
import pytest
import yaml
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun, open_payload
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, SourceError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.velero.source import (
    BACKUP_PAYLOAD, VeleroSource, backup_name)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

JOB = "pvc-backup"
VELERO = ("velero.io", "v1")


class FakeVeleroServer(threading.Thread):
    """Plays the Velero server's part for Backups in one namespace: writes status via the API.

    ``script`` is the list of ``(delay_seconds, status)`` it applies in turn to each new Backup.
    """

    def __init__(self, kube_api, namespace, script):
        super().__init__(daemon=True)
        self.objects = kubernetes.client.CustomObjectsApi(kube_api)
        self.namespace = namespace
        self.script = script
        self.handled = []
        self.error = None
        self._stop_event = threading.Event()

    def run(self):
        try:
            while not self._stop_event.is_set():
                listing = self.objects.list_namespaced_custom_object(*VELERO, self.namespace, "backups")
                for item in listing["items"]:
                    name = item["metadata"]["name"]
                    if name in self.handled:
                        continue
                    self.handled.append(name)
                    for delay, status in self.script:
                        if self._stop_event.wait(delay):
                            return
                        self.objects.patch_namespaced_custom_object(*VELERO, self.namespace, "backups", name,
                                                                    {"status": status})
                self._stop_event.wait(0.2)
        except Exception as exc:  # pylint: disable=broad-except  # reported by stop()
            self.error = exc

    def stop(self):
        self._stop_event.set()
        self.join(10)
        if self.error is not None:
            raise self.error


@pytest.fixture
def velero_namespace(make_kube_namespace):
    return make_kube_namespace("velero")


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


def options(kube_cluster, velero_namespace, **extra):
    return dict({"kubeconfig": kube_cluster.kubeconfig, "velero_namespace": velero_namespace,
                 "include_namespaces": ["biometrics"], "snapshot_volumes": True, "storage_location": "default",
                 "ttl": "720h0m0s", "poll_interval": 0.2}, **extra)


def backups_in(kube_api, namespace):
    return kubernetes.client.CustomObjectsApi(kube_api).list_namespaced_custom_object(
        *VELERO, namespace, "backups")["items"]


def payload(storage, manifest):
    stream = open_payload(storage, manifest, BACKUP_PAYLOAD)
    data = stream.read(1 << 20)
    stream.finish()
    return yaml.safe_load(data)


def run_with_server(kube_api, velero_namespace, script, source, storage, **run_options):
    server = FakeVeleroServer(kube_api, velero_namespace, script)
    server.start()
    try:
        return BackupRun(JOB, source, storage, **run_options).run()
    finally:
        server.stop()


def test_created_without_waiting_matches_the_seed_command(kube_cluster, kube_api, velero_namespace, storage):
    source = VeleroSource(options(kube_cluster, velero_namespace, wait=False))
    assert source.requires_encryption is False
    manifest = BackupRun(JOB, source, storage).run()

    items = backups_in(kube_api, velero_namespace)
    assert len(items) == 1
    backup = items[0]
    name = backup["metadata"]["name"]
    assert name.startswith(JOB + "-") and len(name) == len(JOB) + 15
    # velero backup create NAME --include-namespaces biometrics --snapshot-volumes (+ location, ttl)
    assert backup["spec"] == {"includedNamespaces": ["biometrics"], "snapshotVolumes": True,
                              "storageLocation": "default", "ttl": "720h0m0s"}
    assert backup["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "biometrics-backup"
    assert backup["metadata"]["labels"]["backup.biometrics.io/job"] == JOB

    stats = manifest["stats"]
    assert stats["backup_name"] == name and stats["velero_namespace"] == velero_namespace
    assert stats["phase"] == "" and stats["waited"] is False
    assert stats["uid"] == backup["metadata"]["uid"]
    recorded = payload(storage, manifest)
    assert recorded["kind"] == "Backup" and recorded["metadata"]["name"] == name
    assert recorded["spec"] == backup["spec"]
    assert recorded["status"] == {}
    assert manifest["source"]["velero_namespace"] == velero_namespace


def test_waits_for_completed_and_records_velero_counters(kube_cluster, kube_api, velero_namespace, storage):
    script = [(0.3, {"phase": "New"}),
              (0.3, {"phase": "InProgress", "progress": {"totalItems": 12, "itemsBackedUp": 3}}),
              (0.5, {"phase": "Completed", "progress": {"totalItems": 12, "itemsBackedUp": 12},
                     "volumeSnapshotsAttempted": 2, "volumeSnapshotsCompleted": 2, "warnings": 1})]
    identity = x25519.Identity.generate()
    manifest = run_with_server(kube_api, velero_namespace, script, VeleroSource(options(kube_cluster, velero_namespace)),
                               storage, encryption={"recipients": [str(identity.to_public())]})
    stats = manifest["stats"]
    assert stats["phase"] == "Completed" and stats["waited"] is True
    assert (stats["itemsBackedUp"], stats["totalItems"]) == (12, 12)
    assert (stats["volumeSnapshotsAttempted"], stats["volumeSnapshotsCompleted"], stats["warnings"]) == (2, 2, 1)
    live = backups_in(kube_api, velero_namespace)[0]
    assert live["status"]["phase"] == "Completed"
    assert manifest["encryption"]["mode"] == "age"


@pytest.mark.parametrize("accept", [False, True])
def test_partially_failed_is_reported_truthfully(kube_cluster, kube_api, velero_namespace, storage, accept):
    script = [(0.2, {"phase": "InProgress"}), (0.2, {"phase": "PartiallyFailed", "errors": 3, "warnings": 5})]
    source = VeleroSource(options(kube_cluster, velero_namespace, accept_partial=accept))
    if not accept:
        with pytest.raises(SourceError, match=r"finished PartiallyFailed \(3 errors, 5 warnings"):
            run_with_server(kube_api, velero_namespace, script, source, storage)
        assert Catalog(storage).scan(JOB) == []
        assert storage.list("%s/" % JOB) == []
        return
    manifest = run_with_server(kube_api, velero_namespace, script, source, storage)
    assert manifest["stats"]["phase"] == "PartiallyFailed"
    assert (manifest["stats"]["errors"], manifest["stats"]["warnings"]) == (3, 5)
    assert payload(storage, manifest)["status"] == {"phase": "PartiallyFailed", "errors": 3, "warnings": 5}


@pytest.mark.parametrize("phase,status,message", [
    ("Failed", {"failureReason": "object storage location unavailable"}, "object storage location unavailable"),
    ("FailedValidation", {"validationErrors": ["an existing backup storage location wasn't specified"]},
     "an existing backup storage location wasn't specified"),
])
def test_failed_backups_fail_the_run_with_velero_reason(kube_cluster, kube_api, velero_namespace, storage, phase,
                                                        status, message):
    script = [(0.2, dict(status, phase=phase))]
    with pytest.raises(SourceError, match="finished %s: %s" % (phase, message)):
        run_with_server(kube_api, velero_namespace, script, VeleroSource(options(kube_cluster, velero_namespace)),
                        storage)
    assert Catalog(storage).scan(JOB) == []


def test_no_velero_server_fails_after_the_pickup_timeout(kube_cluster, kube_api, velero_namespace, storage):
    source = VeleroSource(options(kube_cluster, velero_namespace, pickup_timeout=1.5))
    started = time.monotonic()
    with pytest.raises(SourceError, match="no Velero server picked up backup %s/%s-" % (velero_namespace, JOB)):
        BackupRun(JOB, source, storage).run()
    assert time.monotonic() - started >= 1.5
    assert Catalog(storage).scan(JOB) == []
    # The request itself stays for a Velero that comes up later, as `velero backup create` leaves it.
    assert len(backups_in(kube_api, velero_namespace)) == 1


def test_a_backup_that_never_finishes_times_out(kube_cluster, kube_api, velero_namespace, storage):
    script = [(0.1, {"phase": "InProgress"})]
    source = VeleroSource(options(kube_cluster, velero_namespace, timeout=2))
    with pytest.raises(SourceError, match="still InProgress after 2s"):
        run_with_server(kube_api, velero_namespace, script, source, storage)
    assert Catalog(storage).scan(JOB) == []


def test_a_backup_left_in_veleros_queue_times_out_with_the_reason(kube_cluster, kube_api, velero_namespace, storage):
    script = [(0.1, {"phase": "Queued", "queuePosition": 3})]
    source = VeleroSource(options(kube_cluster, velero_namespace, timeout=2))
    with pytest.raises(SourceError) as failure:
        run_with_server(kube_api, velero_namespace, script, source, storage)
    message = str(failure.value)
    assert "still Queued after 2s; it was left for Velero to finish (queue position 3)" in message, message
    assert "--concurrent-backups" in message and "restarting the Velero server clears it" in message, message
    assert Catalog(storage).scan(JOB) == []


def test_bad_options_and_missing_places_are_named(kube_cluster, storage):
    with pytest.raises(ConfigError, match="include_namespaces"):
        VeleroSource({"kubeconfig": kube_cluster.kubeconfig})
    with pytest.raises(ConfigError, match="Go duration"):
        VeleroSource({"kubeconfig": kube_cluster.kubeconfig, "include_namespaces": ["a"], "ttl": "30 days"})
    with pytest.raises(ConfigError, match="unknown option"):
        VeleroSource({"kubeconfig": kube_cluster.kubeconfig, "include_namespaces": ["a"], "snapshot": True})
    source = VeleroSource({"kubeconfig": kube_cluster.kubeconfig, "include_namespaces": ["a"],
                           "velero_namespace": "no-velero-here", "wait": False})
    with pytest.raises(SourceError, match='create Velero backup .* failed: HTTP 404 namespaces "no-velero-here" not'):
        BackupRun(JOB, source, storage).run()
    assert Catalog(storage).scan(JOB) == []


def test_backup_names_are_valid_and_sortable():
    from datetime import datetime, timezone  # pylint: disable=import-outside-toplevel
    moment = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert backup_name("PVC_Backup", moment) == "pvc-backup-20260304050607"
    long_name = backup_name("x" * 80, moment)
    assert len(long_name) <= 63 and long_name.endswith("-20260304050607")
    assert backup_name("---", moment) == "backup-20260304050607"
