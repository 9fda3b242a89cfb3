"""Render-only mode of the roles: the seed's values become valid, restricted, secret-free manifests."""

import pytest
import yaml
from kubernetes_validate import validate as validate_manifest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig

from .playbook import load_rendered, run_site, seed_values

KUBERNETES_VERSION = "1.34"
SEED_CRONJOBS = {
    # CronJob name -> (schedule from the seed, kind)
    "postgres-backup": ("0 2 * * *", "postgres"),
    "redis-backup": ("*/15 * * * *", "redis"),
    "directory-sync-backup": ("0 3 * * *", "directory_sync"),
    "config-backup": ("0 */6 * * *", "config_git"),
    "incremental-backup": ("0 * * * *", "files"),
    "k8s-resources-backup": ("30 2 * * *", "k8s_resources"),
    "biometrics-data-backup": ("0 1 * * *", "velero"),
    "retention-prune": ("30 5 * * *", None),
    "postgres-backup-drill": ("0 4 * * 0", "postgres"),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    run = run_site(seed_values(), out, {"render_dir": str(out)})
    assert run.returncode == 0, run
    again = run_site(seed_values(), out, {"render_dir": str(out)})
    assert again.returncode == 0, again
    return {"dir": out, "manifests": load_rendered(out), "first": run, "second": again}


def test_second_render_changes_nothing(rendered):
    assert rendered["first"].changed > 0
    assert rendered["second"].changed == 0, rendered["second"]


def test_every_manifest_validates_against_the_kubernetes_schema(rendered):
    assert len(rendered["manifests"]) >= 30
    for manifest in rendered["manifests"].values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_seed_schedules_and_history_limits(rendered):
    cronjobs = {name: m for (kind, _namespace, name), m in rendered["manifests"].items() if kind == "CronJob"}
    assert set(SEED_CRONJOBS) <= set(cronjobs), sorted(cronjobs)
    for name, (schedule, _kind) in SEED_CRONJOBS.items():
        spec = cronjobs[name]["spec"]
        assert spec["schedule"] == schedule, name
        assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["startingDeadlineSeconds"] > 0
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0
        assert cronjobs[name]["metadata"]["namespace"] == "biometrics"


def test_pods_meet_pod_security_restricted(rendered):
    for (kind, _namespace, name), manifest in rendered["manifests"].items():
        if kind != "CronJob":
            continue
        pod = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"] and "requests" in container["resources"]
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), name


def test_credentials_only_through_secret_references(rendered):
    for (kind, _namespace, name), manifest in rendered["manifests"].items():
        assert kind != "Secret", "render-only mode must not write Secrets (%s)" % name
        if kind != "CronJob":
            continue
        container = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        for env in container["env"]:
            if env["name"] != "HOME":
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, env)
    # The seed's S3 storage reaches the runner as *_env references only.
    config = yaml.safe_load(rendered["manifests"][("ConfigMap", "biometrics", "postgres-backup-config")]["data"]["job.yaml"])
    assert config["storage"]["access_key_env"] == "BACKUP_S3_ACCESS_KEY"
    assert "access_key" not in config["storage"] and "secret_key" not in config["storage"]


def test_job_files_load_in_the_runner(rendered):
    configs = [m for (kind, _namespace, _name), m in rendered["manifests"].items() if kind == "ConfigMap"]
    assert configs
    for manifest in configs:
        config = JobConfig(yaml.safe_load(manifest["data"]["job.yaml"]))
        assert config.job + "-config" == manifest["metadata"]["name"]
        # The kind's own option check: every option the role writes is one the source knows.
        kinds.source_class(config.kind)(dict(config.source))


def test_only_api_jobs_get_a_token_and_a_role(rendered):
    manifests = rendered["manifests"]
    roles = {name: m for (kind, _namespace, name), m in manifests.items() if kind == "Role"}
    assert set(roles) == {"k8s-resources-backup", "biometrics-data-backup"}
    export_rules = roles["k8s-resources-backup"]["rules"]
    assert all(rule["verbs"] == ["get", "list"] for rule in export_rules)
    velero = roles["biometrics-data-backup"]
    assert velero["metadata"]["namespace"] == "velero"
    assert velero["rules"] == [{"apiGroups": ["velero.io"], "resources": ["backups"],
                                "verbs": ["create", "get", "list", "watch"]}]
    for (kind, _namespace, name), manifest in manifests.items():
        if kind == "CronJob":
            pod = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is (name in roles), name


def test_only_drills_mount_the_decryption_identity(rendered):
    # ... and the incremental file job, which must read its parent's encrypted file index.
    for (kind, _namespace, name), manifest in rendered["manifests"].items():
        if kind != "CronJob":
            continue
        volumes = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
        items = [item["key"] for v in volumes if "secret" in v for item in v["secret"].get("items", [])]
        assert ("identity" in items) is (name.endswith("-drill") or name == "incremental-backup"), name


@pytest.mark.parametrize("backend,extra,expect", [
    ("pvc", {}, ("PersistentVolumeClaim", "backup-storage")),
    ("nfs", {"storage.nfs": {"server": "nfs.example.com", "path": "/backups/biometrics"}}, ("PersistentVolume", "biometrics-backup-storage")),
])
def test_volume_backends(tmp_path, backend, extra, expect):
    values = seed_values(**{"storage.backend": backend, **extra})
    run = run_site(values, tmp_path, {"render_dir": str(tmp_path)})
    assert run.returncode == 0, run
    manifests = load_rendered(tmp_path)
    assert any(kind == expect[0] and name == expect[1] for kind, _namespace, name in manifests), sorted(manifests)
    for manifest in manifests.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)
    config = yaml.safe_load(manifests[("ConfigMap", "biometrics", "redis-backup-config")]["data"]["job.yaml"])
    assert config["storage"] == {"backend": "nfs" if backend == "nfs" else "filesystem", "path": "/backups"}


def test_bad_values_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"storage.backend": "ftp"}), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert "storage.backend" in run.output and '"ftp"' in run.output
    assert list(out.iterdir()) == []


def test_a_job_file_the_runner_would_refuse_fails_the_render_before_anything_is_written(tmp_path):
    # The roles' argument specs let this value through; the engine's checks of the rendered job
    # file (biometrics.backup.checked_job_file) do not, at deploy time instead of at 02:00.
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"backup.compression.level": 42}), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert "job file of postgres-backup: compression.level must be at most 19, got 42" in run.output
    assert list(out.iterdir()) == []
