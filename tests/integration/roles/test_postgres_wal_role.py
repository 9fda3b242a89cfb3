"""biometrics.backup.postgres_wal rendered: the WAL stream's Deployment and the base backup CronJob.

Render-only mode (job_render_dir) through ansible-playbook, the role by its FQCN; check mode
and diff against the API server. The pods themselves run in
tests/integration/kubernetes/test_postgres_wal_pods.py.
"""

import copy
import json
import os
import subprocess
import time

import pytest
import yaml
from kubernetes_validate import validate as validate_manifest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig

from .playbook import PlaybookRun, load_rendered

KUBERNETES_VERSION = "1.34"
NAMESPACE = "pitr"
DIGEST = "sha256:" + "ab" * 32


def _play(tmp_path, namespace=NAMESPACE, render=True, args=(), env=None, **role_vars):
    out = tmp_path / "out"
    playbook = tmp_path / ("play-%d.yml" % len(list(tmp_path.glob("play-*.yml"))))
    job_vars = {"job_namespace": namespace}
    if render:
        job_vars["job_render_dir"] = str(out)
    job_vars.update({key: role_vars.pop(key) for key in list(role_vars) if key.startswith("job_")})
    playbook.write_text(yaml.safe_dump([{
        "name": "PostgreSQL WAL stream", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": job_vars,
        "tasks": [
            {"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
             "vars": dict({"storage_namespace": namespace, "storage_backend": "s3", "storage_s3_bucket": "backups",
                           "storage_s3_endpoint": "http://s3.example.com:8333"},
                          **({"storage_render_dir": str(out)} if render else {"storage_encryption_enabled": False}))},
            {"name": "WAL stream", "ansible.builtin.include_role": {"name": "biometrics.backup.postgres_wal"},
             "vars": role_vars},
        ]}]))
    process = subprocess.run(["ansible-playbook", str(playbook), *args], capture_output=True, text=True,
                             env=dict(env or os.environ, ANSIBLE_NOCOLOR="1"), timeout=600,
                             check=False)
    return PlaybookRun(process), out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pitr-render")
    role_vars = {"postgres_wal_name": "enrolment-db", "postgres_wal_host": "db.biometrics.svc",
                 "postgres_wal_user": "backup", "postgres_wal_password_secret": {"name": "pg-credentials"}}
    first, out = _play(tmp, **role_vars)
    assert first.returncode == 0, first
    second = _play(tmp, **role_vars)[0]
    assert second.returncode == 0, second
    manifests = load_rendered(out)
    return {"first": first, "second": second, "manifests": manifests, "dir": out,
            "deployment": manifests[("Deployment", NAMESPACE, "enrolment-db-stream")],
            "cronjob": manifests[("CronJob", NAMESPACE, "enrolment-db")],
            "config": yaml.safe_load(manifests[("ConfigMap", NAMESPACE, "enrolment-db-config")]["data"]["job.yaml"])}


def test_render_writes_the_stream_and_the_base_backup_and_a_second_render_changes_nothing(rendered):
    assert sorted(path.name for path in rendered["dir"].glob("enrolment-db*.yaml")) == [
        "enrolment-db-stream.yaml", "enrolment-db.yaml"]
    assert rendered["first"].changed > 0
    assert rendered["second"].changed == 0, rendered["second"]
    kinds = sorted(kind for (kind, _ns, name) in rendered["manifests"] if name.startswith("enrolment-db"))
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "ServiceAccount"]
    for manifest in rendered["manifests"].values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_one_streamer_recreated_never_two(rendered):
    spec = rendered["deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    selector = spec["selector"]["matchLabels"]
    assert selector == {"backup.biometrics.io/job": "enrolment-db", "backup.biometrics.io/workload": "wal-stream"}
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels[key] == value for key, value in selector.items())
    # The base backup's pods must not be selected by the Deployment.
    cron_labels = rendered["cronjob"]["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert "backup.biometrics.io/workload" not in cron_labels


def test_stream_pod_is_the_cronjob_pod_with_the_streams_command(rendered):
    pod = rendered["deployment"]["spec"]["template"]["spec"]
    cron_pod = rendered["cronjob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container, cron_container = pod["containers"][0], cron_pod["containers"][0]
    assert container["args"] == ["wal-stream", "--config", "/etc/biometrics-backup/config/job.yaml"]
    assert cron_container["args"] == ["backup", "--config", "/etc/biometrics-backup/config/job.yaml"]
    assert pod["restartPolicy"] == "Always" and cron_pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 120
    assert "readinessProbe" not in container  # nothing connects to the stream
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}
    # Everything else is the CronJob's pod, as the job role renders it.
    same = copy.deepcopy(pod)
    for key in ("restartPolicy", "terminationGracePeriodSeconds"):
        same.pop(key)
    same["containers"][0]["args"] = cron_container["args"]
    for key in ("startupProbe", "livenessProbe"):
        same["containers"][0].pop(key)
    same["containers"][0]["env"] = [item for item in same["containers"][0]["env"]
                                    if item["name"] != "BACKUP_HEARTBEAT_FILE"]
    if not same["containers"][0]["env"] and "env" not in cron_container:
        same["containers"][0].pop("env")
    same["volumes"] = [volume if volume["name"] != "scratch" else next(
        v for v in cron_pod["volumes"] if v["name"] == "scratch") for volume in same["volumes"]]
    cron_same = dict(cron_pod)
    cron_same.pop("restartPolicy")
    assert same == cron_same


def _probe_passes(probe, heartbeat, age):
    """Run the probe's command as the kubelet would, with its file path pointed at ``heartbeat``."""
    command = [part.replace("/tmp/wal-stream.heartbeat", str(heartbeat)) for part in probe["exec"]["command"]]
    os.utime(heartbeat, (time.time() - age, time.time() - age))
    return subprocess.run(command, check=False, timeout=10).returncode == 0


def test_stream_has_a_heartbeat_liveness_probe_with_stock_tools(rendered, tmp_path):
    container = rendered["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "BACKUP_HEARTBEAT_FILE", "value": "/tmp/wal-stream.heartbeat"} in container["env"]
    liveness, startup = container["livenessProbe"], container["startupProbe"]
    assert liveness["exec"] == startup["exec"]
    assert liveness["exec"]["command"][:2] == ["/bin/sh", "-c"]
    assert (liveness["periodSeconds"], liveness["failureThreshold"]) == (30, 2)
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1800
    # /tmp is the pod's writable emptyDir (the root filesystem is read-only)
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts["/tmp"] == "scratch"
    # the command itself: fresh passes, 300 s old fails, no file fails
    heartbeat = tmp_path / "heartbeat"
    heartbeat.touch()
    assert _probe_passes(liveness, heartbeat, 5)
    assert _probe_passes(liveness, heartbeat, 290)
    assert not _probe_passes(liveness, heartbeat, 301)
    missing = [part.replace("/tmp/wal-stream.heartbeat", str(tmp_path / "none")) for part in liveness["exec"]["command"]]
    assert subprocess.run(missing, check=False, capture_output=True, timeout=10).returncode != 0


def test_liveness_and_startup_timeouts_are_options(tmp_path):
    run, out = _play(tmp_path, postgres_wal_liveness_timeout=120, postgres_wal_startup_timeout=95)
    assert run.returncode == 0, run
    container = load_rendered(out)[("Deployment", NAMESPACE, "postgres-pitr-stream")]["spec"]["template"]["spec"][
        "containers"][0]
    assert container["livenessProbe"]["exec"]["command"][-1].endswith("-lt 120")
    assert container["startupProbe"]["failureThreshold"] == 10


def test_stream_pod_meets_pod_security_restricted(rendered):
    pod = rendered["deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    context = pod["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"] and context["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "enrolment-db"


def test_credentials_reach_the_stream_as_mounted_secret_files(rendered):
    pod = rendered["deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert [env["name"] for env in container["env"]] == ["HOME", "BACKUP_HEARTBEAT_FILE"]  # no secret in the env
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount["readOnly"] is True and secret["defaultMode"] == 0o440
            for item in secret.get("items", []):
                files[mount["mountPath"] + "/" + item["path"]] = (secret["secretName"], item["key"])
    config = rendered["config"]
    assert files[config["source"]["password_file"]] == ("pg-credentials", "password")
    assert files[config["storage"]["access_key_file"]] == ("backup-s3-credentials", "access_key")
    assert files[config["storage"]["secret_key_file"]] == ("backup-s3-credentials", "secret_key")
    assert config["encryption"]["recipients_file"].startswith("/etc/biometrics-backup/keys/")
    assert "password" not in config["source"]


def test_one_job_file_for_the_stream_and_the_base_backup(rendered):
    config = rendered["config"]
    assert config["kind"] == "postgres_base" and config["job"] == "enrolment-db"
    assert config["source"] == {
        "host": "db.biometrics.svc", "port": 5432, "user": "backup", "sslmode": "prefer", "slot": "biometrics_backup",
        "spool_dir": "/tmp/wal-spool", "partial_interval": 10, "checkpoint": "fast",
        "password_file": "/etc/biometrics-backup/secrets/pg-credentials/password"}
    assert JobConfig(config).kind == "postgres_base"  # the engine accepts it
    spec = rendered["cronjob"]["spec"]
    assert spec["schedule"] == "0 1 * * 0"
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 21600
    mounts = {m["name"]: m for m in rendered["deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered["deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert mounts["job-config"]["mountPath"] == "/etc/biometrics-backup/config"
    assert volumes["job-config"]["configMap"]["name"] == "enrolment-db-config"
    annotation = rendered["deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert len(annotation["backup.biometrics.io/config-sha256"]) == 64


def test_digest_spool_claim_resources_and_a_changed_job_file(rendered, tmp_path):
    resources = {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}
    run, out = _play(tmp_path, postgres_wal_name="enrolment-db", postgres_wal_host="db.biometrics.svc",
                     postgres_wal_user="backup", postgres_wal_password_secret={"name": "pg-credentials"},
                     postgres_wal_spool_claim="wal-spool", postgres_wal_spool_size="2Gi",
                     postgres_wal_resources=resources, postgres_wal_partial_interval=5,
                     postgres_wal_base_schedule="30 0 * * 6", job_image_digest=DIGEST)
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    deployment = manifests[("Deployment", NAMESPACE, "enrolment-db-stream")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/biometrics/backup-runner@" + DIGEST
    cronjob = manifests[("CronJob", NAMESPACE, "enrolment-db")]
    assert cronjob["spec"]["schedule"] == "30 0 * * 6"
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == container["image"]
    assert container["resources"] == resources
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["wal-spool"]["persistentVolumeClaim"] == {"claimName": "wal-spool"}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert {"name": "wal-spool", "mountPath": "/spool", "readOnly": False} in container["volumeMounts"]
    config = yaml.safe_load(manifests[("ConfigMap", NAMESPACE, "enrolment-db-config")]["data"]["job.yaml"])
    assert config["source"]["spool_dir"] == "/spool" and config["source"]["partial_interval"] == 5
    # Another job file, another pod template: the stream restarts with it.
    assert (deployment["spec"]["template"]["metadata"]["annotations"]
            != rendered["deployment"]["spec"]["template"]["metadata"]["annotations"])
    validate_manifest(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("role_vars,message", [
    ({"postgres_wal_slot": "Bad-Slot"}, "the slot"),
    ({"postgres_wal_spool_size": "lots"}, "the spool size"),
    ({"postgres_wal_termination_grace_period": 2}, "grace period"),
    ({"postgres_wal_liveness_timeout": 10}, "liveness"),
    ({"postgres_wal_base_schedule": "weekly"}, "schedule"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, role_vars, message):
    run, out = _play(tmp_path, **role_vars)
    assert run.returncode != 0
    assert message in run.output, run
    assert "Traceback" not in run.output
    assert not list(out.glob("postgres-pitr*.yaml"))


def test_check_mode_and_diff_create_nothing(kube_cluster, kube_api, make_kube_namespace, tmp_path):
    import kubernetes  # pylint: disable=import-outside-toplevel
    namespace = make_kube_namespace("pitr-check")
    run = _play(tmp_path, namespace=namespace, render=False, args=("--check", "--diff"), env=kube_cluster.env,
                postgres_wal_host="db.example.com")[0]
    assert run.returncode == 0, run
    assert run.changed > 0
    assert "postgres-pitr-stream" in run.output and "wal-stream" in run.output
    apps = kubernetes.client.AppsV1Api(kube_api)
    assert not apps.list_namespaced_deployment(namespace).items
    assert json.dumps([c.metadata.name for c in kubernetes.client.BatchV1Api(kube_api).list_namespaced_cron_job(
        namespace).items]) == "[]"
