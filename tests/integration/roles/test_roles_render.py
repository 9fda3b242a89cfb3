"""Render-only mode of the roles: the seed's values become valid, restricted, secret-free manifests."""

import json

import pytest
import yaml
from kubernetes_validate import validate as validate_manifest

from ansible_collections.biometrics.backup.plugins.filter.objects_left_behind import objects_left_behind
from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig

from .playbook import REPO_ROOT, load_rendered, run_site, seed_values

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


# Every object the seed's values render (render-only mode writes no Secret and no storage object
# for S3), by kind, namespace and name: a job gained or lost in a refactoring of the roles fails.
SEED_JOBS = ("postgres-backup", "redis-backup", "directory-sync-backup", "config-backup", "incremental-backup",
             "k8s-resources-backup", "biometrics-data-backup", "postgres-backup-drill", "redis-backup-drill",
             "incremental-backup-drill")
SEED_OBJECTS = (
    {(kind, "biometrics", job) for job in SEED_JOBS for kind in ("CronJob", "ServiceAccount")}
    | {("ConfigMap", "biometrics", job + "-config") for job in SEED_JOBS}
    | {("CronJob", "biometrics", "retention-prune"), ("ServiceAccount", "biometrics", "retention-prune")}
    | {(kind, "biometrics", "k8s-resources-backup") for kind in ("Role", "RoleBinding")}
    | {(kind, "velero", "biometrics-data-backup") for kind in ("Role", "RoleBinding")})


def test_the_seed_renders_exactly_its_objects(rendered):
    assert set(rendered["manifests"]) == SEED_OBJECTS
    assert {path.name for path in rendered["dir"].iterdir() if not path.name.startswith("values-")} == (
        {job + ".yaml" for job in SEED_JOBS + ("retention-prune",)}
        | {"biometrics-backup.rules.yml", "prometheusrule.yml", "dashboard-configmap.yml"})


def test_stale_job_removal_covers_every_kind_a_job_renders(rendered, hardened, pitr):
    # The deploy role removes a job that left the values by these kinds; a kind the job role
    # renders and the table lacks would stay behind in the cluster.
    table = yaml.safe_load((REPO_ROOT / "roles" / "deploy" / "vars" / "main.yml").read_text())["deploy_job_object_kinds"]
    removed = {(entry["api_version"], entry["kind"]) for entry in table}
    rendered_kinds = {(manifest["apiVersion"], manifest["kind"])
                      for manifests in (rendered["manifests"], hardened, pitr)
                      for manifest in manifests.values()
                      if "backup.biometrics.io/job" in manifest["metadata"].get("labels", {})}
    assert rendered_kinds == removed
    assert {entry["kind"] for entry in table if entry.get("rbac")} == {"Role", "RoleBinding"}


def _recorded_objects(cronjob):
    return {tuple(entry) for entry in json.loads(cronjob["metadata"]["annotations"]["backup.biometrics.io/objects"])}


def assert_cronjobs_record_their_objects(manifests, velero_namespace="velero"):
    """Each CronJob's annotation lists exactly the objects rendered with it, and the filter
    accepts every entry the template writes (its table and the template agree)."""
    cronjobs = {key[2]: doc for key, doc in manifests.items() if key[0] == "CronJob"}
    for name, cronjob in cronjobs.items():
        companions = {(doc["apiVersion"], kind, namespace, doc["metadata"]["name"])
                      for (kind, namespace, dummy), doc in manifests.items()
                      if kind not in ("CronJob", "Deployment")
                      and doc["metadata"].get("labels", {}).get("backup.biometrics.io/job") == name}
        # ... and the job's offsite copy CronJobs, which carry their own job label
        companions |= {("batch/v1", "CronJob", cronjob["metadata"]["namespace"], copy_name)
                       for copy_name in (name + "-copy", name + "-copy-prune") if copy_name in cronjobs
                       and cronjobs[copy_name]["metadata"]["labels"]["app.kubernetes.io/component"] == "copy"}
        assert _recorded_objects(cronjob) == companions, name
        # The filter takes every entry back, the copy's CronJobs as rendered being recognised as
        # this job's copy (and bringing their own objects, recorded by them).
        previous = [cronjob] + [cronjobs[key[3]] for key in companions if key[1] == "CronJob"]
        returned = {(entry["api_version"], entry["kind"], entry["namespace"], entry["name"])
                    for entry in objects_left_behind(previous, [cronjob], [velero_namespace]) if entry["job"] == name}
        assert returned == companions, name


def test_each_cronjob_records_the_objects_rendered_with_it(rendered, hardened, pitr):
    # What a later deploy removes once the job stops rendering one of them (objects_left_behind).
    for manifests in (rendered["manifests"], hardened, pitr):
        assert_cronjobs_record_their_objects(manifests)


def test_turning_the_egress_policy_and_lock_check_off_leaves_their_objects_to_remove(hardened, tmp_path):
    plain = dict(HARDENED)
    plain.update({"backup.networkPolicy": {"enabled": False},
                  "storage.restic": {"passwordSecret": "restic-pw", "lockCheck": False}})
    run = run_site(seed_values(**plain), tmp_path, {"render_dir": str(tmp_path)})
    assert run.returncode == 0, run
    now = load_rendered(tmp_path)
    before = [doc for key, doc in hardened.items() if key[0] == "CronJob"]
    left = {(entry["kind"], entry["name"]) for entry in objects_left_behind(before, list(now.values()))}
    policies = {("NetworkPolicy", key[2] + "-egress") for key in hardened if key[0] == "CronJob"}
    locks = {(key[0], key[2]) for key in hardened if key[2].endswith("-restic-locks")}
    assert locks and {kind for kind, dummy in locks} == {"Role", "RoleBinding"}
    assert left == policies | locks
    # Rendered again as before: nothing to remove.
    assert objects_left_behind(before, list(hardened.values())) == []


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


def _file_references(node, path=""):
    """Every ``*_file`` option of a job file, as ``(dotted name, path)``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
                yield path + key, value
            else:
                yield from _file_references(value, path + str(key) + ".")


def _secret_files(pod):
    """The files the pod's mounted Secrets provide: ``{path: (secret, key)}``."""
    container = pod["containers"][0]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount["readOnly"] is True and secret["defaultMode"] == 0o440, mount
        for item in secret["items"]:
            files[mount["mountPath"].rstrip("/") + "/" + item["path"]] = (secret["secretName"], item["key"])
    return files


def assert_credentials_only_in_mounted_secret_files(manifests):
    """No env var but HOME, no secret value in any job file, and every *_file is a mounted Secret key."""
    cronjobs = {name: m for (kind, _namespace, name), m in manifests.items() if kind == "CronJob"}
    checked = 0
    for (kind, _namespace, name), manifest in manifests.items():
        assert kind != "Secret", "render-only mode must not write Secrets (%s)" % name
        if kind == "CronJob":
            container = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            assert [env["name"] for env in container["env"]] == ["HOME"], (name, container["env"])
        if kind != "ConfigMap" or "job.yaml" not in manifest.get("data", {}):
            continue
        config = yaml.safe_load(manifest["data"]["job.yaml"])
        job = config["job"] if config["job"] + "-config" == name else name[:-len("-config")]
        pod = cronjobs[job]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        files = _secret_files(pod)
        for option, path in _file_references(config):
            assert path in files, (name, option, path, sorted(files))
            checked += 1
        for section in (config.get("storage", {}), config.get("source", {})):
            for secret in ("password", "access_key", "secret_key", "token", "restic_password"):
                assert secret not in section, (name, secret)
                assert secret + "_env" not in section, (name, secret)
    return checked


def test_credentials_only_through_mounted_secret_files(rendered):
    assert assert_credentials_only_in_mounted_secret_files(rendered["manifests"]) > 0
    # The seed's S3 storage reaches the runner as files of the credentials Secret.
    config = yaml.safe_load(rendered["manifests"][("ConfigMap", "biometrics", "postgres-backup-config")]["data"]["job.yaml"])
    assert config["storage"]["access_key_file"] == "/etc/biometrics-backup/secrets/backup-s3-credentials/access_key"
    assert config["storage"]["secret_key_file"] == "/etc/biometrics-backup/secrets/backup-s3-credentials/secret_key"


def _pod(manifests, name):
    return manifests[("CronJob", "biometrics", name)]["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _scratch(pod):
    return next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "scratch")


def test_drills_are_sized_for_the_default_data_size(rendered):
    # recovery_drill_data_size 1Gi: files restore the tree into /tmp (1.25x + 256Mi), Redis
    # writes the RDB there (1x + 256Mi) and loads it into memory (3x + 512Mi); PostgreSQL streams.
    manifests = rendered["manifests"]
    assert _scratch(_pod(manifests, "incremental-backup-drill")) == "1536Mi"
    assert _scratch(_pod(manifests, "redis-backup-drill")) == "1280Mi"
    assert _scratch(_pod(manifests, "postgres-backup-drill")) == "1Gi"
    redis = _pod(manifests, "redis-backup-drill")["containers"][0]["resources"]
    assert redis["limits"]["memory"] == "3584Mi" and redis["requests"]["memory"] == "1792Mi", redis
    assert _scratch(_pod(manifests, "redis-backup")) == "1Gi"  # backup jobs keep job_scratch_size


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


def test_without_age_the_resource_export_runs_in_the_restic_format_only(tmp_path):
    """backup.encryption.enabled: false drops the resource export (it holds Secrets), unless its
    storageFormat is restic, whose repository encrypts it."""
    for resources, expected in (({}, False), ({"storageFormat": "restic"}, True)):
        out = tmp_path / ("out-%s" % expected)
        out.mkdir()
        run = run_site(seed_values(**{"backup.encryption.enabled": False, "backup.resources": resources}), tmp_path,
                       {"render_dir": str(out)})
        assert run.returncode == 0, run
        rendered = load_rendered(out)
        assert (("CronJob", "biometrics", "k8s-resources-backup") in rendered) is expected, sorted(rendered)
        if expected:
            job_file = yaml.safe_load(rendered[("ConfigMap", "biometrics", "k8s-resources-backup-config")]["data"]["job.yaml"])
            assert job_file["storage"]["format"] == "restic" and job_file["encryption"] == {"enabled": False}


def test_the_incremental_file_job_in_the_restic_format_backs_up_whole_trees(tmp_path):
    """backup.incremental.storageFormat: restic: the files job has no chain (incremental false, no
    full_every), so it reads no parent index and mounts no age key at all; the repository password
    is its only Secret besides the storage's. Its drill reads the same repository."""
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"backup.incremental": {"storageFormat": "restic"}}), tmp_path,
                   {"render_dir": str(out)})
    assert run.returncode == 0, run
    rendered = load_rendered(out)
    job_file = _job_file(rendered, "incremental-backup")
    assert job_file["kind"] == "files" and job_file["storage"]["format"] == "restic"
    assert job_file["source"]["incremental"] is False and "full_every" not in job_file["source"]
    assert job_file["encryption"] == {"enabled": False}
    config = JobConfig(job_file)
    assert config.source["incremental"] is False
    mounted = _mounted_secret_items(_pod(rendered, "incremental-backup"))
    assert mounted["backup-restic-password"] == ["password"] and "backup-encryption-key" not in mounted, mounted
    # the other jobs stay archives, with their age recipients
    postgres = _job_file(rendered, "postgres-backup")
    assert "format" not in postgres["storage"] and "recipients_file" in postgres["encryption"]
    drill = _job_file(rendered, "incremental-backup-drill")
    assert drill["storage"]["format"] == "restic" and drill["kind"] == "files"
    JobConfig(drill)


def test_a_storage_format_the_runner_does_not_know_fails_the_render(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"backup.postgres.storageFormat": "borg"}), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert "job file of postgres-backup: storage.format must be one of archive, restic" in run.output, run
    assert list(out.iterdir()) == []


def test_kubernetes_macros_and_the_runners_compression_default(tmp_path):
    # @daily is a schedule Kubernetes runs (the roles used to want five fields); without an
    # algorithm in the values the job file leaves compression to the runner: zstd, level 3.
    values = seed_values(**{"backup.schedule.postgres": "@daily", "backup.compression.algorithm": None})
    run = run_site(values, tmp_path, {"render_dir": str(tmp_path)})
    assert run.returncode == 0, run
    manifests = load_rendered(tmp_path)
    assert manifests[("CronJob", "biometrics", "postgres-backup")]["spec"]["schedule"] == "@daily"
    for (kind, _namespace, name), manifest in manifests.items():
        if kind == "ConfigMap" and "job.yaml" in manifest["data"]:
            config = yaml.safe_load(manifest["data"]["job.yaml"])
            assert config["compression"] == {}, name
            assert JobConfig(config).compression == {"algorithm": "zstd", "level": 3, "threads": -1}, name


@pytest.mark.parametrize("schedule, reason", [
    ("0 0 2 * * *", "got 6 field(s)"),
    ("CRON_TZ=Europe/Berlin 0 2 * * *", "TZ= and CRON_TZ= are not allowed"),
])
def test_a_schedule_kubernetes_refuses_fails_before_anything_is_written(tmp_path, schedule, reason):
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"backup.schedule.redis": schedule}), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert "values: backup.schedule.redis: " in run.output and reason in run.output, run
    assert list(out.iterdir()) == []


DIGEST = "sha256:" + "0123456789abcdef" * 4
HARDENED = {
    "backup.image": {"repository": "registry.example.com:5000/backup-runner", "tag": "0.1.0", "digest": DIGEST},
    "backup.networkPolicy": {
        "enabled": True,
        "egress": [{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"], "ports": [5432, {"port": 6379, "protocol": "TCP"}]},
                   {"cidr": "2001:db8::/32", "ports": [443]}],
        "jobs": {"k8s-resources-backup": [{"cidr": "10.96.0.1/32", "ports": [443, 6443]}]},
    },
    "database.passwordSecret": {"name": "pg-credentials", "key": "pw"},
    "redis.passwordSecret": {"name": "redis-credentials"},
    "redis.dataSize": "2Gi",
    # The Redis job (and with it its drill) in the restic format; the others stay archives.
    "backup.redis.storageFormat": "restic",
    "storage.restic": {"passwordSecret": "restic-pw", "readDataSubset": "5%"},
    "backup.recoveryTest.jobs": {"incremental-backup": {"dataSize": "10Gi"},
                                 "postgres-backup": {"scratchSize": "2Gi", "resources": {
                                     "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}}},
}


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    out = tmp_path_factory.mktemp("render-hardened")
    run = run_site(seed_values(**HARDENED), out, {"render_dir": str(out)})
    assert run.returncode == 0, run
    return load_rendered(out)


def test_hardened_manifests_validate(hardened):
    for manifest in hardened.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_image_pinned_by_digest(hardened):
    images = {name: m["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
              for (kind, _namespace, name), m in hardened.items() if kind == "CronJob"}
    assert set(SEED_CRONJOBS) <= set(images)
    assert set(images.values()) == {"registry.example.com:5000/backup-runner@" + DIGEST}, images


def test_database_passwords_are_mounted_files(hardened):
    assert assert_credentials_only_in_mounted_secret_files(hardened) >= 2 * len(SEED_CRONJOBS)
    for job in ("postgres-backup", "postgres-backup-drill"):
        config = yaml.safe_load(hardened[("ConfigMap", "biometrics", job + "-config")]["data"]["job.yaml"])
        assert config["source"]["password_file"] == "/etc/biometrics-backup/secrets/pg-credentials/pw"
        assert _secret_files(_pod(hardened, job))["/etc/biometrics-backup/secrets/pg-credentials/pw"] == ("pg-credentials", "pw")
    for job in ("redis-backup", "redis-backup-drill"):
        config = yaml.safe_load(hardened[("ConfigMap", "biometrics", job + "-config")]["data"]["job.yaml"])
        assert config["source"]["password_file"] == "/etc/biometrics-backup/secrets/redis-credentials/password"
    # The file spellings are what the engine reads (the job file check of the role accepted them).
    JobConfig(yaml.safe_load(hardened[("ConfigMap", "biometrics", "postgres-backup-config")]["data"]["job.yaml"]))


def test_one_egress_policy_per_job(hardened):
    policies = {name: m for (kind, _namespace, name), m in hardened.items() if kind == "NetworkPolicy"}
    cronjobs = {name: m for (kind, _namespace, name), m in hardened.items() if kind == "CronJob"}
    assert set(policies) == {name + "-egress" for name in cronjobs}
    for name, cronjob in cronjobs.items():
        spec = policies[name + "-egress"]["spec"]
        labels = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"] == {"backup.biometrics.io/job": name}
        assert labels["backup.biometrics.io/job"] == name
        assert spec["policyTypes"] == ["Egress"] and "ingress" not in spec
        egress = spec["egress"]
        assert egress[0] == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
        assert egress[1] == {"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}],
                             "ports": [{"protocol": "TCP", "port": 5432}, {"protocol": "TCP", "port": 6379}]}
        assert egress[2] == {"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}], "ports": [{"protocol": "TCP", "port": 443}]}
        api = [{"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}],
                "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}]
        assert egress[3:] == (api if name == "k8s-resources-backup" else []), name


def test_drills_sized_per_job_from_the_values(hardened):
    redis = _pod(hardened, "redis-backup-drill")
    assert _scratch(redis) == "2304Mi"  # the 2Gi RDB + 256Mi
    assert redis["containers"][0]["resources"]["limits"]["memory"] == "6656Mi"  # 3 x 2Gi + 512Mi
    assert _scratch(_pod(hardened, "incremental-backup-drill")) == "13056Mi"  # 1.25 x 10Gi + 256Mi
    postgres = _pod(hardened, "postgres-backup-drill")
    assert _scratch(postgres) == "2Gi"
    assert postgres["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "256Mi"}


def _job_file(manifests, job):
    return yaml.safe_load(manifests[("ConfigMap", "biometrics", job + "-config")]["data"]["job.yaml"])


def _mounted_secret_items(pod):
    """{secret name: [keys]} of the pod's Secret volumes."""
    return {v["secret"]["secretName"]: [item["key"] for item in v["secret"].get("items", [])]
            for v in pod["volumes"] if "secret" in v}


def test_a_job_in_the_restic_format_reads_its_repository_password_from_the_secret(hardened):
    """backup.redis.storageFormat: restic (issue 16 point 4): the job file asks for the restic format
    with the password as the mounted file of storage.restic.passwordSecret and no age recipients;
    its drill reads the same repository (and keeps the age identity for the job's archive history);
    the retention job that prunes it mounts the password; the archive-format jobs see neither."""
    password_file = "/etc/biometrics-backup/secrets/restic-pw/password"
    for job in ("redis-backup", "redis-backup-drill"):
        storage = _job_file(hardened, job)["storage"]
        assert storage["format"] == "restic" and storage["restic_password_file"] == password_file, job
        # the backup job's verifications read the subset; the drill reads every pack
        assert storage.get("restic_read_data_subset") == (None if job.endswith("-drill") else "5%"), job
        assert _secret_files(_pod(hardened, job))[password_file] == ("restic-pw", "password"), job
        JobConfig(_job_file(hardened, job))   # what the runner in the pod loads
    backup = _job_file(hardened, "redis-backup")
    assert backup["encryption"] == {"enabled": False}
    assert "backup-encryption-key" not in _mounted_secret_items(_pod(hardened, "redis-backup"))
    drill = _job_file(hardened, "redis-backup-drill")
    assert drill["encryption"] == {"enabled": False, "identity_file": "/etc/biometrics-backup/identity/identity"}
    assert _mounted_secret_items(_pod(hardened, "retention-prune"))["restic-pw"] == ["password"]
    for job in ("postgres-backup", "postgres-backup-drill", "k8s-resources-backup", "incremental-backup"):
        assert "format" not in _job_file(hardened, job)["storage"], job
        assert "restic-pw" not in _mounted_secret_items(_pod(hardened, job)), job
    assert "recipients_file" in _job_file(hardened, "postgres-backup")["encryption"]


RESTIC_LOCK_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]


def test_the_offsite_copy_of_a_restic_format_job_reads_its_repository(tmp_path):
    """A restic-format job gets the section-wide offsite copy (restic copy into the destination's own
    repository of the job): the copy's pod and the destination's prune mount the repository password
    and may ask whether a lock's pod has finished, like every pod that opens a repository."""
    offsite = {"schedule": "30 4 * * *", "credentialsSecret": "offsite-s3", "retention": {"monthly": 12},
               "storage": {"backend": "s3", "s3": {"bucket": "offsite", "endpoint": "https://s3.site-b.example"}}}
    values = seed_values(**{"backup.redis.storageFormat": "restic", "storage.restic": {"passwordSecret": "restic-pw"},
                            "backup.offsite": offsite})
    run = run_site(values, tmp_path, {"render_dir": str(tmp_path)})
    assert run.returncode == 0, run
    manifests = load_rendered(tmp_path)
    password_file = "/etc/biometrics-backup/secrets/restic-pw/password"
    job_file = _job_file(manifests, "redis-backup")
    assert job_file["storage"]["restic_password_file"] == password_file
    assert job_file["copy"]["destination"]["bucket"] == "offsite"
    JobConfig(job_file)   # the job file check accepts a copy of a restic-format job
    assert_cronjobs_record_their_objects(manifests)   # the copy's and the destination prune's CronJobs too
    for job in ("redis-backup-copy", "redis-backup-copy-prune", "redis-backup-drill-offsite"):
        assert _secret_files(_pod(manifests, job))[password_file] == ("restic-pw", "password"), job
        assert manifests[("Role", "biometrics", job + "-restic-locks")]["rules"] == RESTIC_LOCK_RULES, job
    # the monthly drill from the copy reads the copy's repository with the job's password
    drill = JobConfig(_job_file(manifests, "redis-backup-drill-offsite"))
    assert drill.storage["format"] == "restic"
    assert drill.copy_destination()["restic_password_file"] == password_file
    assert drill.copy_destination()["bucket"] == "offsite"

    # backup.offsite.resticPasswordSecret: the copies open with a password of their own, which the
    # copy, the destination's prune and the drill from the copy mount; the backup job does not
    own = tmp_path / "own-password"
    own.mkdir()
    values["backup"]["offsite"]["resticPasswordSecret"] = "offsite-restic"
    run = run_site(values, own, {"render_dir": str(own)})
    assert run.returncode == 0, run
    manifests = load_rendered(own)
    offsite_file = "/etc/biometrics-backup/secrets/offsite-restic/password"
    assert _job_file(manifests, "redis-backup")["copy"]["destination"]["restic_password_file"] == offsite_file
    for job in ("redis-backup-copy", "redis-backup-copy-prune", "redis-backup-drill-offsite"):
        assert _secret_files(_pod(manifests, job))[offsite_file] == ("offsite-restic", "password"), job
    assert offsite_file not in _secret_files(_pod(manifests, "redis-backup"))
    # an archive-format job's copy never reads a restic repository: no such file, no mount
    assert "restic_password_file" not in _job_file(manifests, "postgres-backup")["copy"]["destination"]
    assert offsite_file not in _secret_files(_pod(manifests, "postgres-backup-copy"))
    drill = JobConfig(_job_file(manifests, "redis-backup-drill-offsite"))
    assert drill.copy_destination()["restic_password_file"] == offsite_file
    # The drill from the copy opens the copy only: the primary repository's password is not mounted
    # (its job file names the copy's password for the primary location, which --from-copy never opens).
    # (The age identity stays: archive backups from before the job moved to restic need it.)
    assert set(_secret_files(_pod(manifests, "redis-backup-drill-offsite"))) == {
        offsite_file, "/etc/biometrics-backup/secrets/offsite-s3/access_key",
        "/etc/biometrics-backup/secrets/offsite-s3/secret_key", "/etc/biometrics-backup/identity/identity"}
    assert drill.storage["restic_password_file"] == offsite_file
    # The destination's prune opens the copies alone: the destination's credentials and the copies'
    # password, none of the primary storage's Secrets, and still the lock check.
    assert set(_secret_files(_pod(manifests, "redis-backup-copy-prune"))) == {
        offsite_file, "/etc/biometrics-backup/secrets/offsite-s3/access_key",
        "/etc/biometrics-backup/secrets/offsite-s3/secret_key"}
    assert password_file in _secret_files(_pod(manifests, "redis-backup-copy"))
    assert manifests[("Role", "biometrics", "redis-backup-copy-prune-restic-locks")]["rules"] == RESTIC_LOCK_RULES
    values["backup"]["offsite"]["resticPasswordSecret"] = "Not A Name"
    bad = tmp_path / "bad-name"
    bad.mkdir()
    refused = run_site(values, bad, {"render_dir": str(bad)})
    assert refused.returncode != 0 and "backup.offsite.resticPasswordSecret must name the Secret" in refused.output, refused


def test_the_pods_that_open_a_restic_repository_may_ask_whether_a_locks_pod_has_finished(hardened):
    """The restic-format Redis job, its drill and the retention job that prunes it get a Role to read
    the pods of their namespace, and their token (engine/podlocks.py); the archive jobs neither."""
    for job in ("redis-backup", "redis-backup-drill", "retention-prune"):
        assert hardened[("Role", "biometrics", job + "-restic-locks")]["rules"] == RESTIC_LOCK_RULES, job
        binding = hardened[("RoleBinding", "biometrics", job + "-restic-locks")]
        assert binding["roleRef"]["name"] == job + "-restic-locks"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": job, "namespace": "biometrics"}]
        assert _pod(hardened, job)["automountServiceAccountToken"] is True, job
    for job in ("postgres-backup", "postgres-backup-drill", "incremental-backup", "config-backup"):
        assert ("Role", "biometrics", job + "-restic-locks") not in hardened, job
        assert _pod(hardened, job)["automountServiceAccountToken"] is False, job


def test_lock_check_false_leaves_restic_jobs_without_api_access(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    overrides = dict(HARDENED)
    overrides["storage.restic"] = {"passwordSecret": "restic-pw", "lockCheck": False}
    values = seed_values(**overrides)
    run = run_site(values, tmp_path, {"render_dir": str(out)})
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    assert not [key for key in manifests if key[2].endswith("-restic-locks")]
    for job in ("redis-backup", "redis-backup-drill", "retention-prune"):
        assert _pod(manifests, job)["automountServiceAccountToken"] is False, job
        assert _mounted_secret_items(_pod(manifests, job))["restic-pw"] == ["password"], job  # still a restic reader


@pytest.mark.parametrize("overrides,message", [
    ({"backup.recoveryTest.jobs": {"incremental-backup": {"dataSize": "10Gi", "scratchSize": "5Gi"}}},
     "recovery drill of incremental-backup: scratch_size 5Gi is smaller than the 13056Mi a files drill of 10Gi"),
    ({"redis.dataSize": "4Gi", "backup.recoveryTest.jobs": {"redis-backup": {"resources": {"limits": {"memory": "1Gi"}}}}},
     "recovery drill of redis-backup: resources.limits.memory 1Gi is below the 12800Mi a Redis drill of 4Gi"),
    ({"backup.recoveryTest.dataSize": "lots"}, 'data_size "lots" is not a Kubernetes quantity'),
    ({"backup.image": {"digest": "sha256:abc"}}, 'the image digest must be sha256: followed by 64 lowercase hex digits'),
    ({"backup.networkPolicy": {"enabled": True, "egress": [{"cidr": "10.0.0.300/8"}]}},
     'egress destination {"cidr": "10.0.0.300/8"} is invalid'),
    ({"backup.networkPolicy": {"enabled": True, "egress": [{"cidr": "10.0.0.0/8", "ports": [70000]}]}},
     'egress destination {"cidr": "10.0.0.0/8", "ports": [70000]} is invalid'),
])
def test_unusable_hardening_values_fail_before_the_job_is_written(tmp_path, overrides, message):
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**overrides), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert message in run.output, run
    # The drill sizes are checked before any drill is written, the digest and the egress
    # destinations before the first job is.
    written = sorted(path.name for path in out.glob("*.yaml"))
    late = "drill" in message or "data_size" in message
    assert not [name for name in written if name.endswith("-drill.yaml" if late else "-backup.yaml")], written


# database.pitr (docs/postgres-pitr.md): the WAL stream's Deployment and its base backup CronJob,
# through biometrics.backup.postgres_wal, from the same values as the other jobs.
PITR = {
    "database.pitr": {"enabled": True, "baseSchedule": "15 1 * * 6", "user": "streamer",
                      "passwordSecret": {"name": "pg-replication", "key": "pw"}, "slot": "enrolment_slot",
                      "partialInterval": 5, "spoolSize": "2Gi"},
}


@pytest.fixture(scope="module")
def pitr(tmp_path_factory):
    out = tmp_path_factory.mktemp("render-pitr")
    run = run_site(seed_values(**PITR), out, {"render_dir": str(out)})
    assert run.returncode == 0, run
    return load_rendered(out)


def test_pitr_values_deploy_the_wal_stream_and_its_base_backups(pitr):
    for manifest in pitr.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)
    cronjob = pitr[("CronJob", "biometrics", "postgres-pitr")]
    assert cronjob["spec"]["schedule"] == "15 1 * * 6"
    stream = pitr[("Deployment", "biometrics", "postgres-pitr-stream")]
    assert stream["spec"]["replicas"] == 1
    pod = stream["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][0] == "wal-stream"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {v["name"]: v.get("emptyDir", {}).get("sizeLimit") for v in pod["volumes"]}["scratch"] == "2Gi"
    config = yaml.safe_load(pitr[("ConfigMap", "biometrics", "postgres-pitr-config")]["data"]["job.yaml"])
    assert config["kind"] == "postgres_base"
    assert config["source"]["host"] == "postgres.biometrics.svc"
    assert config["source"]["user"] == "streamer"
    assert config["source"]["slot"] == "enrolment_slot"
    assert config["source"]["partial_interval"] == 5
    assert config["source"]["password_file"] == "/etc/biometrics-backup/secrets/pg-replication/pw"
    assert _secret_files(pod)["/etc/biometrics-backup/secrets/pg-replication/pw"] == ("pg-replication", "pw")
    JobConfig(config)
    # The nightly dump stays: PITR comes beside it, not instead.
    assert ("CronJob", "biometrics", "postgres-backup") in pitr


def test_pitr_is_off_unless_the_values_ask_for_it(rendered):
    assert not [key for key in rendered["manifests"] if key[0] == "Deployment" or key[2].startswith("postgres-pitr")]


@pytest.mark.parametrize("overrides, message", [
    ({"database.pitr": {"enabled": True}, "database.host": None},
     "database.pitr.enabled is true but database.host is missing"),
    ({"database.pitr": {"enabled": True, "baseSchedule": "weekly"}}, "values: database.pitr.baseSchedule: "),
    ({"database.pitr": {"enabled": True, "slot": "Bad-Slot"}}, "the slot lowercase letters, digits and underscores"),
])
def test_unusable_pitr_values_fail_before_anything_is_written(tmp_path, overrides, message):
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**overrides), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert message in run.output, run
    assert not [path.name for path in out.glob("postgres-pitr*")]
