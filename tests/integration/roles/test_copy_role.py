"""The offsite copy's CronJobs rendered by biometrics.backup.job and mapped from the seed's
values (backup.offsite) by biometrics.backup.deploy (issue 18, roles).

Render-only mode (job_render_dir) through ansible-playbook: the storage role, two Redis jobs
(one with a copy, one without) and, in a second play, a filesystem copy for every job with
retention.require_copy and the retention role; then playbooks/site.yml with the seed's values
and backup.offsite (deploy_render_dir). The copy itself runs in the engine's tests
(tests/integration/test_offsite_copy*.py) and as pods in
tests/integration/kubernetes/test_copy_pods.py; here: what the roles hand to the pod.
"""

import os
import subprocess

import pytest
import yaml
from kubernetes_validate import validate as validate_manifest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig

from .playbook import PlaybookRun, load_rendered, run_site, seed_values

KUBERNETES_VERSION = "1.34"
NAMESPACE = "offsite"
S3_COPY = {"schedule": "30 4 * * *",
           "destination": {"backend": "s3", "bucket": "biometrics-offsite", "endpoint_url": "https://s3.site-b.example",
                           "region": "eu-north-1", "prefix": "biometrics"},
           "credentials_secret": "offsite-s3", "recheck": "full",
           "retention": {"keep_monthly": 12, "keep_yearly": 7, "min_keep": 2}}
FS_COPY = {"schedule": "45 4 * * *", "destination": {"backend": "filesystem", "path": "/mnt/offsite"},
           "claim": "offsite-archive", "backup": "latest"}
SECRETS_ROOT = "/etc/biometrics-backup/secrets/"
LEAKED = "sEcReT-vAlUe-0451"


def _play(tmp_path, jobs=("redis-backup", "redis-cache"), retention=False, args=(), **job_vars):
    out = tmp_path / "out"
    playbook = tmp_path / ("play-%d.yml" % len(list(tmp_path.glob("play-*.yml"))))
    tasks = [{"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
              "vars": {"storage_namespace": NAMESPACE, "storage_backend": "s3", "storage_s3_bucket": "backups",
                       "storage_s3_endpoint": "http://s3.example.com:8333", "storage_render_dir": str(out)}}]
    for name in jobs:
        tasks.append({"name": "Redis job " + name, "ansible.builtin.include_role": {"name": "biometrics.backup.redis"},
                      "vars": {"redis_name": name, "redis_host": name + ".cache.svc",
                               "redis_password_secret": {"name": name + "-auth"}}})
    if retention:
        tasks.append({"name": "Retention", "ansible.builtin.include_role": {"name": "biometrics.backup.retention"}})
    playbook.write_text(yaml.safe_dump([{
        "name": "Offsite copy", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": dict({"job_namespace": NAMESPACE, "job_render_dir": str(out)}, **job_vars), "tasks": tasks}]))
    process = subprocess.run(["ansible-playbook", str(playbook), *args], capture_output=True, text=True,
                             env=dict(os.environ, ANSIBLE_NOCOLOR="1"), timeout=600, check=False)
    return PlaybookRun(process), out


def _pod(cronjob):
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _job_file(manifests, job):
    return yaml.safe_load(manifests[("ConfigMap", NAMESPACE, job + "-config")]["data"]["job.yaml"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("copy-render")
    job_vars = {"job_copy_by_job": {"redis-backup": S3_COPY}}
    first, out = _play(tmp, **job_vars)
    assert first.returncode == 0, first
    second = _play(tmp, **job_vars)[0]
    assert second.returncode == 0, second
    manifests = load_rendered(out)
    return {"first": first, "second": second, "manifests": manifests, "dir": out,
            "copy": manifests[("CronJob", NAMESPACE, "redis-backup-copy")],
            "backup": manifests[("CronJob", NAMESPACE, "redis-backup")],
            "config": _job_file(manifests, "redis-backup")}


@pytest.fixture(scope="module")
def required(tmp_path_factory):
    """Every job copied to a filesystem claim, retention.require_copy, and the retention job."""
    tmp = tmp_path_factory.mktemp("copy-required")
    run, out = _play(tmp, retention=True, job_copy=FS_COPY,
                     job_retention={"keep_daily": 7, "require_copy": True})
    assert run.returncode == 0, run
    return load_rendered(out)


def test_the_copy_cronjob_exists_only_for_the_job_that_asks_for_it(rendered):
    names = sorted(name for (kind, _ns, name) in rendered["manifests"] if kind == "CronJob")
    assert names == ["redis-backup", "redis-backup-copy", "redis-backup-copy-prune", "redis-cache"]
    assert ("ServiceAccount", NAMESPACE, "redis-backup-copy") in rendered["manifests"]
    assert ("ServiceAccount", NAMESPACE, "redis-backup-copy-prune") in rendered["manifests"]
    # The copy reads the backup job's file: no ConfigMap of its own.
    assert ("ConfigMap", NAMESPACE, "redis-backup-copy-config") not in rendered["manifests"]
    assert "copy" not in _job_file(rendered["manifests"], "redis-cache")
    assert rendered["first"].changed > 0
    assert rendered["second"].changed == 0, rendered["second"]
    for manifest in rendered["manifests"].values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_the_copy_cronjob_runs_copy_on_the_backup_jobs_file_on_its_own_schedule(rendered):
    cronjob = rendered["copy"]
    assert cronjob["spec"]["schedule"] == "30 4 * * *"
    assert cronjob["metadata"]["labels"]["app.kubernetes.io/component"] == "copy"
    assert cronjob["metadata"]["labels"]["backup.biometrics.io/job"] == "redis-backup-copy"
    pod = _pod(cronjob)
    assert pod["containers"][0]["args"] == ["copy", "--config", "/etc/biometrics-backup/config/job.yaml"]
    config_volumes = [volume for volume in pod["volumes"] if "configMap" in volume]
    assert config_volumes == [{"name": "job-config", "configMap": {"name": "redis-backup-config"}}]
    mount = [mount for mount in pod["containers"][0]["volumeMounts"] if mount["name"] == "job-config"]
    assert mount == [{"name": "job-config", "mountPath": "/etc/biometrics-backup/config", "readOnly": True}]
    # Same image, same job-wide settings as the backup job.
    assert pod["containers"][0]["image"] == _pod(rendered["backup"])["containers"][0]["image"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_copy_pod_is_restricted(rendered):
    pod = _pod(rendered["copy"])
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "redis-backup-copy"
    assert not any("hostPath" in volume for volume in pod["volumes"])


def test_the_destination_credentials_are_files_of_the_copy_secret(rendered):
    pod = _pod(rendered["copy"])
    container = pod["containers"][0]
    secrets = {volume["secret"]["secretName"]: volume for volume in pod["volumes"] if "secret" in volume}
    offsite = secrets["offsite-s3"]
    assert offsite["secret"]["defaultMode"] == 0o440
    assert offsite["secret"]["items"] == [{"key": "access_key", "path": "access_key"},
                                          {"key": "secret_key", "path": "secret_key"}]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts[offsite["name"]] == {"name": offsite["name"], "mountPath": SECRETS_ROOT + "offsite-s3",
                                       "readOnly": True}
    destination = rendered["config"]["copy"]["destination"]
    assert destination == dict(S3_COPY["destination"], access_key_file=SECRETS_ROOT + "offsite-s3/access_key",
                               secret_key_file=SECRETS_ROOT + "offsite-s3/secret_key")
    # The source storage's credentials as every job; the backup job's source password is not there.
    assert "backup-s3-credentials" in secrets and "redis-backup-auth" not in secrets
    assert [variable["name"] for variable in container["env"]] == ["HOME"]
    # And the backup job itself does not get the destination's credentials.
    backup_secrets = [volume["secret"]["secretName"] for volume in _pod(rendered["backup"])["volumes"]
                      if "secret" in volume]
    assert "offsite-s3" not in backup_secrets and "redis-backup-auth" in backup_secrets


def test_no_age_identity_reaches_the_copy_pod(rendered):
    pod = _pod(rendered["copy"])
    items = [item["key"] for volume in pod["volumes"] if "secret" in volume
             for item in volume["secret"].get("items", [])]
    assert "identity" not in items
    paths = [mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]]
    assert not any(path.startswith("/etc/biometrics-backup/identity") for path in paths)
    assert "identity_file" not in rendered["config"]["encryption"]


def test_the_job_file_holds_no_secret_value_and_validates_with_the_engine(rendered):
    config = rendered["config"]
    job = JobConfig.from_mapping(config)
    assert job.copy["destination"]["bucket"] == "biometrics-offsite"
    assert job.copy["recheck"] == "full"
    assert job.copy_retention["keep_yearly"] == 7 and job.copy_policy is not None
    for location in (config["storage"], config["copy"]["destination"]):
        assert not {"access_key", "secret_key", "session_token"} & set(location)
    # The job file is the runner's own view: the secret fields are file references only.
    text = rendered["manifests"][("ConfigMap", NAMESPACE, "redis-backup-config")]["data"]["job.yaml"]
    assert "secret_key:" not in text and "access_key:" not in text


def test_require_copy_mounts_the_destination_in_the_retention_job_and_every_job_gets_its_copy(required):
    copies = sorted(name for (kind, _ns, name) in required if kind == "CronJob" and name.endswith("-copy"))
    assert copies == ["redis-backup-copy", "redis-cache-copy"]
    for job in ("redis-backup", "redis-cache"):
        config = _job_file(required, job)
        JobConfig.from_mapping(config)
        assert config["retention"]["require_copy"] is True
        assert config["copy"] == {"destination": FS_COPY["destination"], "backup": "latest"}
        pod = _pod(required[("CronJob", NAMESPACE, job + "-copy")])
        claims = [volume for volume in pod["volumes"] if "persistentVolumeClaim" in volume]
        assert [volume["persistentVolumeClaim"]["claimName"] for volume in claims] == ["offsite-archive"]
        mounts = [mount for mount in pod["containers"][0]["volumeMounts"] if mount["name"] == claims[0]["name"]]
        assert [mount["mountPath"] for mount in mounts] == ["/mnt/offsite"]
    retention = _pod(required[("CronJob", NAMESPACE, "retention-prune")])
    args = retention["containers"][0]["args"]
    # The copies are not pruned as jobs of their own; the backup jobs are.
    assert args.count("--config") == 2 and not any("-copy/" in arg for arg in args)
    claims = [volume["persistentVolumeClaim"]["claimName"] for volume in retention["volumes"]
              if "persistentVolumeClaim" in volume]
    assert claims == ["offsite-archive"]
    mounts = [mount["mountPath"] for mount in retention["containers"][0]["volumeMounts"]]
    assert mounts.count("/mnt/offsite") == 1
    for manifest in required.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_the_retention_job_mounts_the_s3_destination_credentials_for_require_copy(tmp_path):
    run, out = _play(tmp_path, jobs=("redis-backup",), retention=True, job_copy=S3_COPY,
                     job_retention={"keep_daily": 7, "require_copy": True})
    assert run.returncode == 0, run
    retention = _pod(load_rendered(out)[("CronJob", NAMESPACE, "retention-prune")])
    secrets = {volume["secret"]["secretName"]: volume for volume in retention["volumes"] if "secret" in volume}
    assert secrets["offsite-s3"]["secret"]["items"] == [{"key": "access_key", "path": "access_key"},
                                                        {"key": "secret_key", "path": "secret_key"}]


@pytest.mark.parametrize("job_vars,message", [
    ({"job_copy_by_job": {"redis-backup": dict(S3_COPY, schedule="nightly")}}, "the offsite copy is invalid"),
    ({"job_copy_by_job": {"redis-backup": {key: value for key, value in S3_COPY.items() if key != "schedule"}}},
     "It needs `schedule`"),
    ({"job_copy_by_job": {"redis-backup": dict(S3_COPY, credentials_secret="")}}, "credentials_secret"),
    ({"job_copy_by_job": {"redis-backup": dict(FS_COPY, claim="")}}, "`claim`"),
    # A literal credential in the destination: refused, and its value never printed.
    ({"job_copy_by_job": {"redis-backup": dict(S3_COPY, destination=dict(S3_COPY["destination"], secret_key=LEAKED))}},
     "without credentials"),
    # The engine's own check of the job file (checked_job_file) covers the copy section.
    ({"job_copy_by_job": {"redis-backup": dict(S3_COPY, recheck="sometimes")}}, "copy.recheck"),
    ({"job_copy_by_job": {"redis-backup": dict(S3_COPY, retention={"keep_forever": 1})}}, "copy.retention"),
    ({"job_retention": {"keep_daily": 7, "require_copy": True}}, "retention.require_copy keeps what"),
])
def test_bad_copy_settings_fail_before_anything_is_written(tmp_path, job_vars, message):
    run, out = _play(tmp_path, jobs=("redis-backup",), **job_vars)
    assert run.returncode != 0
    assert message in run.output, run
    assert "Traceback" not in run.output
    assert LEAKED not in run.output
    assert not list(out.glob("redis-backup*.yaml"))


def test_copy_retention_renders_the_destination_prune_cronjob(rendered, required):
    prune = rendered["manifests"][("CronJob", NAMESPACE, "redis-backup-copy-prune")]
    copy = rendered["copy"]
    # The copy's pod (same mounts, same ServiceAccount rules, restricted) with its own name,
    # ServiceAccount, schedule and command: prune --destination on the backup job's file.
    assert prune["spec"]["schedule"] == "30 5 * * *"
    assert prune["metadata"]["labels"]["app.kubernetes.io/component"] == "copy"
    pod, copy_pod = _pod(prune), _pod(copy)
    assert pod["serviceAccountName"] == "redis-backup-copy-prune"
    assert pod["containers"][0]["args"] == ["prune", "--destination", "--config",
                                            "/etc/biometrics-backup/config/job.yaml"]
    # The copy's mounts less the primary storage's: the prune opens the destination alone.
    primary = ("backup-s3-credentials", "backup-encryption-key")
    assert {("backup-s3-credentials", "access_key"), ("backup-encryption-key", "recipients")} <= _secret_items(copy_pod)
    assert _secret_items(pod) == {item for item in _secret_items(copy_pod) if item[0] not in primary}
    assert {("offsite-s3", "access_key"), ("offsite-s3", "secret_key")} <= _secret_items(pod)
    primary_volumes = {volume["name"] for volume in copy_pod["volumes"]
                       if volume.get("secret", {}).get("secretName") in primary}
    assert [mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]] == [
        mount["mountPath"] for mount in copy_pod["containers"][0]["volumeMounts"] if mount["name"] not in primary_volumes]
    assert not [item for item in pod["containers"][0]["env"] if "valueFrom" in item]
    assert pod["securityContext"] == copy_pod["securityContext"]
    assert pod["containers"][0]["securityContext"] == copy_pod["containers"][0]["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    # What it applies: copy.retention of the job file, with its rails (min_keep).
    assert rendered["config"]["copy"]["retention"] == S3_COPY["retention"]
    # No copy.retention, no destination prune.
    assert not [name for (kind, _ns, name) in required if name.endswith("-copy-prune")]


def test_the_prune_schedule_is_the_copys_own_setting(tmp_path):
    run, out = _play(tmp_path, jobs=("redis-backup",),
                     job_copy_by_job={"redis-backup": dict(S3_COPY, prune_schedule="15 7 * * 0")})
    assert run.returncode == 0, run
    prune = load_rendered(out)[("CronJob", NAMESPACE, "redis-backup-copy-prune")]
    assert prune["spec"]["schedule"] == "15 7 * * 0"


@pytest.mark.parametrize("job_vars,message", [
    ({"job_copy_by_job": {"redis-backup": dict(S3_COPY, prune_schedule="0 25 * * *")}}, "`prune_schedule` a cron"),
    ({"job_copy": S3_COPY, "jobs": ("redis-backup-" + "x" * 30,)}, "at most 41 with `retention`"),
])
def test_bad_destination_prune_settings_fail_before_anything_is_written(tmp_path, job_vars, message):
    jobs = job_vars.pop("jobs", ("redis-backup",))
    run, out = _play(tmp_path, jobs=jobs, **job_vars)
    assert run.returncode != 0
    assert message in run.output, run
    assert "Traceback" not in run.output
    assert not list(out.glob("redis-backup*.yaml"))


# -- the umbrella role: backup.offsite in the seed's values ------------------------------------

OFFSITE = {
    "schedule": "30 4 * * *",
    "storage": {"backend": "s3", "s3": {"bucket": "biometrics-offsite", "endpoint": "https://s3.site-b.example",
                                        "region": "eu-north-1", "prefix": "biometrics/"}},
    "credentialsSecret": "offsite-s3",
    "retention": {"monthly": 12, "yearly": 7, "minKeep": 2},
    "requireCopy": True,
    "jobs": {
        "redis-backup": {"enabled": False},
        "config-backup": {"schedule": "0 7 * * *", "pruneSchedule": "0 8 * * 0", "recheck": "full",
                          "retention": {"days": 3}, "storage": {"s3": {"prefix": "config/"}}},
        "incremental-backup": {"storage": {"backend": "pvc", "pvc": "offsite-archive", "path": "/mnt/offsite"}},
    },
}
# The jobs of the seed's values that make backups; the directory sync only mirrors.
SEED_BACKUP_JOBS = ("postgres-backup", "redis-backup", "incremental-backup", "config-backup",
                    "k8s-resources-backup", "biometrics-data-backup")
SEED_NAMESPACE = "biometrics"


def _seed_job_file(manifests, job):
    return yaml.safe_load(manifests[("ConfigMap", SEED_NAMESPACE, job + "-config")]["data"]["job.yaml"])


@pytest.fixture(scope="module")
def seed_offsite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("copy-seed")
    out = tmp / "out"
    run = run_site(seed_values(**{"backup.offsite": OFFSITE}), tmp, {"render_dir": str(out)})
    assert run.returncode == 0, run
    return load_rendered(out)


def test_seed_values_with_backup_offsite_copy_every_backup_job_but_the_ones_switched_off(seed_offsite):
    cronjobs = {name for (kind, _ns, name) in seed_offsite if kind == "CronJob"}
    copied = sorted(name[:-len("-copy")] for name in cronjobs if name.endswith("-copy"))
    assert copied == sorted(set(SEED_BACKUP_JOBS) - {"redis-backup"})
    assert "directory-sync-backup-copy" not in cronjobs and "redis-backup-copy" not in cronjobs
    assert sorted(name for name in cronjobs if name.endswith("-copy-prune")) == sorted(
        job + "-copy-prune" for job in copied)
    for manifest in seed_offsite.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_seed_values_map_backup_offsite_onto_the_job_files(seed_offsite):
    postgres = _seed_job_file(seed_offsite, "postgres-backup")
    JobConfig.from_mapping(postgres)
    assert postgres["copy"] == {
        "destination": {"backend": "s3", "bucket": "biometrics-offsite", "endpoint_url": "https://s3.site-b.example",
                        "region": "eu-north-1", "prefix": "biometrics/",
                        "access_key_file": SECRETS_ROOT + "offsite-s3/access_key",
                        "secret_key_file": SECRETS_ROOT + "offsite-s3/secret_key"},
        "retention": {"keep_monthly": 12, "keep_yearly": 7, "min_keep": 2}}
    # requireCopy: the primary never prunes what the copy lacks; the seed's own retention stays.
    assert postgres["retention"] == {"keep_daily": 30, "keep_weekly": 12, "keep_monthly": 12, "keep_yearly": 7,
                                     "require_copy": True}
    assert seed_offsite[("CronJob", SEED_NAMESPACE, "postgres-backup-copy")]["spec"]["schedule"] == "30 4 * * *"
    assert seed_offsite[("CronJob", SEED_NAMESPACE, "postgres-backup-copy-prune")]["spec"]["schedule"] == "30 5 * * *"
    # Per-job overrides merge over the global section, nested keys one by one.
    config = _seed_job_file(seed_offsite, "config-backup")
    JobConfig.from_mapping(config)
    assert config["copy"]["destination"]["prefix"] == "config/"
    assert config["copy"]["destination"]["bucket"] == "biometrics-offsite"
    assert config["copy"]["recheck"] == "full"
    assert config["copy"]["retention"] == {"keep_daily": 3, "keep_monthly": 12, "keep_yearly": 7, "min_keep": 2}
    assert seed_offsite[("CronJob", SEED_NAMESPACE, "config-backup-copy")]["spec"]["schedule"] == "0 7 * * *"
    assert seed_offsite[("CronJob", SEED_NAMESPACE, "config-backup-copy-prune")]["spec"]["schedule"] == "0 8 * * 0"
    # A claim instead of a bucket for one job: mounted at the path, no S3 credentials for it.
    incremental = _seed_job_file(seed_offsite, "incremental-backup")
    assert incremental["copy"]["destination"] == {"backend": "filesystem", "path": "/mnt/offsite"}
    pod = _pod(seed_offsite[("CronJob", SEED_NAMESPACE, "incremental-backup-copy")])
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == [
        "offsite-archive"]
    assert not [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "offsite-s3"]
    # The job without a copy keeps the seed's retention, without require_copy.
    redis = _seed_job_file(seed_offsite, "redis-backup")
    assert "copy" not in redis and "require_copy" not in redis["retention"]


def test_seed_values_with_backup_offsite_give_the_retention_job_the_destination(seed_offsite):
    retention = _pod(seed_offsite[("CronJob", SEED_NAMESPACE, "retention-prune")])
    secrets = {volume["secret"]["secretName"] for volume in retention["volumes"] if "secret" in volume}
    assert "offsite-s3" in secrets
    claims = [v["persistentVolumeClaim"]["claimName"] for v in retention["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["offsite-archive"]
    args = retention["containers"][0]["args"]
    assert not [arg for arg in args if "-copy" in arg]


def test_seed_values_without_backup_offsite_render_no_copy(tmp_path):
    out = tmp_path / "out"
    run = run_site(seed_values(**{"backup.offsite": {"enabled": False, "schedule": "30 4 * * *"}}), tmp_path,
                   {"render_dir": str(out)})
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    assert not [name for (_kind, _ns, name) in manifests if "-copy" in name]
    assert "copy" not in _seed_job_file(manifests, "postgres-backup")


@pytest.mark.parametrize("offsite,message", [
    ({key: value for key, value in OFFSITE.items() if key != "schedule"}, "backup.offsite.schedule is missing"),
    (dict(OFFSITE, schedule="30 4 * *"), "backup.offsite.schedule: "),
    (dict(OFFSITE, pruneSchedule="nightly"), "backup.offsite.pruneSchedule: "),
    (dict(OFFSITE, storage={"backend": "ftp"}), "backup.offsite.storage.backend must be s3, pvc"),
    (dict(OFFSITE, storage={"backend": "s3", "s3": {}}), "backup.offsite.storage.s3.bucket is missing"),
    (dict(OFFSITE, credentialsSecret=""), "backup.offsite.credentialsSecret must name the Secret"),
    (dict(OFFSITE, storage={"backend": "pvc"}), "backup.offsite.storage.pvc is missing"),
    (dict(OFFSITE, recheck="sometimes"), "backup.offsite.recheck must be size or full"),
    (dict(OFFSITE, retention={"months": 12}), "backup.offsite.retention.months is not a retention key"),
    (dict(OFFSITE, retention={"yearly": "seven"}), "backup.offsite.retention.yearly must be a whole number"),
    (dict(OFFSITE, jobs={"billing-backup": {}}), "backup.offsite.jobs.billing-backup: no such backup job"),
    (dict(OFFSITE, jobs={"directory-sync-backup": {}}), "backup.offsite.jobs.directory-sync-backup: the directory"),
    (dict(OFFSITE, jobs={"config-backup": {"schedule": "61 * * * *"}}), "backup.offsite.jobs.config-backup.schedule: "),
    (dict(OFFSITE, jobs={"config-backup": {"storage": {"backend": "nfs"}}}),
     "backup.offsite.jobs.config-backup.storage.pvc is missing"),
    ("s3://elsewhere", "backup.offsite must be a mapping"),
])
def test_bad_backup_offsite_values_fail_before_anything_is_written(tmp_path, offsite, message):
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"backup.offsite": offsite}), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0
    assert "values: " in run.output and message in run.output, run
    assert "Traceback" not in run.output
    assert list(out.iterdir()) == []


# -- re-encryption (copy.reencrypt) and the PITR base backup job --------------------------------

def _age_key():
    """A fresh age identity: (secret key, public key). Made here, so no key is in the sources."""
    lines = subprocess.run(["age-keygen"], capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()
    secret = [line for line in lines if line.startswith("AGE-SECRET-KEY-1")][0]
    public = subprocess.run(["age-keygen", "-y"], input=secret + "\n", capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()
    return secret, public


ESCROW_SECRET, ESCROW_PUBLIC = _age_key()
OTHER_PUBLIC = _age_key()[1]
IDENTITY_PATH = SECRETS_ROOT + "backup-encryption-key/identity"


def _secret_items(pod):
    """{(secret, key)} of every Secret the pod mounts, as files or as a volume of the storage role."""
    return {(volume["secret"]["secretName"], item["key"]) for volume in pod["volumes"] if "secret" in volume
            for item in volume["secret"].get("items", [])}


@pytest.fixture(scope="module")
def reencrypted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("copy-reencrypt")
    copy = dict(S3_COPY, reencrypt={"recipients": [ESCROW_PUBLIC, " %s " % OTHER_PUBLIC],
                                    "identity_secret": {"name": "backup-encryption-key"}})
    run, out = _play(tmp, job_copy_by_job={"redis-backup": copy}, job_copy=FS_COPY)
    assert run.returncode == 0, run
    return load_rendered(out)


def test_reencrypt_goes_to_the_job_file_with_the_identity_as_a_file(reencrypted):
    config = _job_file(reencrypted, "redis-backup")
    assert config["copy"]["reencrypt"] == {"recipients": [ESCROW_PUBLIC, OTHER_PUBLIC], "identity_file": IDENTITY_PATH}
    # The runner accepts the file as the role wrote it.
    job = JobConfig.from_mapping(config)
    assert job.copy["reencrypt"]["identity_file"] == IDENTITY_PATH
    # The job without reencrypt (job_copy) copies byte for byte.
    assert "reencrypt" not in _job_file(reencrypted, "redis-cache")["copy"]
    for manifest in reencrypted.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_only_the_copy_pod_with_reencrypt_mounts_the_identity(reencrypted):
    copy = _pod(reencrypted[("CronJob", NAMESPACE, "redis-backup-copy")])
    items = _secret_items(copy)
    assert ("backup-encryption-key", "identity") in items
    # Exactly the identity: one Secret volume with the one key, at the path the job file names.
    volumes = [volume for volume in copy["volumes"]
               if "identity" in [item["key"] for item in volume.get("secret", {}).get("items", [])]]
    assert len(volumes) == 1
    assert volumes[0]["secret"] == {"secretName": "backup-encryption-key", "defaultMode": 0o440,
                                    "items": [{"key": "identity", "path": "identity"}]}
    mounts = [mount for mount in copy["containers"][0]["volumeMounts"] if mount["name"] == volumes[0]["name"]]
    assert mounts == [{"name": volumes[0]["name"], "mountPath": SECRETS_ROOT + "backup-encryption-key",
                       "readOnly": True}]
    # The destination's credentials and the primary's as before; no source credentials.
    assert {("offsite-s3", "access_key"), ("offsite-s3", "secret_key")} <= items
    assert not [item for item in items if item[0] == "redis-backup-auth"]
    # The destination's prune, the backup job and a copy without reencrypt: no identity.
    for name in ("redis-backup-copy-prune", "redis-backup", "redis-cache-copy", "redis-cache"):
        pod = _pod(reencrypted[("CronJob", NAMESPACE, name)])
        assert "identity" not in {key for _secret, key in _secret_items(pod)}, name
        assert not [mount for mount in pod["containers"][0]["volumeMounts"]
                    if mount["mountPath"].startswith((SECRETS_ROOT + "backup-encryption-key",
                                                      "/etc/biometrics-backup/identity"))], name
    prune = _pod(reencrypted[("CronJob", NAMESPACE, "redis-backup-copy-prune")])
    assert ("offsite-s3", "secret_key") in _secret_items(prune)


def test_reencrypt_keeps_the_identity_out_of_the_retention_job(tmp_path):
    copy = dict(S3_COPY, reencrypt={"recipients": [ESCROW_PUBLIC], "identity_secret": {"name": "escrow-source",
                                                                                       "key": "age"}})
    run, out = _play(tmp_path, jobs=("redis-backup",), retention=True, job_copy=copy,
                     job_retention={"keep_daily": 7, "require_copy": True})
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    assert ("escrow-source", "age") in _secret_items(_pod(manifests[("CronJob", NAMESPACE, "redis-backup-copy")]))
    assert _job_file(manifests, "redis-backup")["copy"]["reencrypt"]["identity_file"] == (
        SECRETS_ROOT + "escrow-source/age")
    retention = _secret_items(_pod(manifests[("CronJob", NAMESPACE, "retention-prune")]))
    assert ("offsite-s3", "secret_key") in retention and not [item for item in retention if item[0] == "escrow-source"]


@pytest.mark.parametrize("reencrypt,message", [
    ({"recipients": ["ESCROW_SECRET"], "identity_secret": {"name": "key"}},
     "copy.reencrypt.recipients[0] is an age secret key"),
    ({"recipients": ["ESCROW_PUBLIC", " escrow_secret "], "identity_secret": {"name": "key"}},
     "copy.reencrypt.recipients[1] is an age secret key"),
    ({"recipients": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE"], "identity_secret": {"name": "key"}},
     "copy.reencrypt is invalid"),
    ({"recipients": [], "identity_secret": {"name": "key"}}, "copy.reencrypt is invalid"),
    ({"recipients": "ESCROW_PUBLIC", "identity_secret": {"name": "key"}}, "copy.reencrypt is invalid"),
    ({"recipients": ["ESCROW_PUBLIC"]}, "`identity_secret` the Secret"),
    ({"recipients": ["ESCROW_PUBLIC"], "identity_secret": {"name": "Bad_Name"}}, "copy.reencrypt is invalid"),
    ({"recipients": ["ESCROW_PUBLIC"], "identity_file": "/etc/key", "identity_secret": {"name": "key"}},
     "identity_file"),
])
def test_bad_reencrypt_settings_fail_before_anything_is_written(tmp_path, reencrypt, message):
    keys = {"ESCROW_SECRET": ESCROW_SECRET, "escrow_secret": ESCROW_SECRET.lower(), "ESCROW_PUBLIC": ESCROW_PUBLIC}
    recipients = reencrypt.get("recipients")
    if isinstance(recipients, list):
        reencrypt = dict(reencrypt, recipients=[keys.get(value.strip(), value) for value in recipients])
    elif recipients is not None:
        reencrypt = dict(reencrypt, recipients=keys[recipients])
    run, out = _play(tmp_path, jobs=("redis-backup",),
                     job_copy_by_job={"redis-backup": dict(S3_COPY, reencrypt=reencrypt)})
    assert run.returncode != 0
    assert message in run.output, run
    assert "Traceback" not in run.output
    assert ESCROW_SECRET not in run.output and ESCROW_SECRET.lower() not in run.output
    assert ESCROW_SECRET[len("AGE-SECRET-KEY-1"):] not in run.output.upper()
    assert not out.exists() or not list(out.glob("redis-backup*.yaml"))


PITR = {"enabled": True, "baseSchedule": "15 1 * * 6"}


def test_seed_values_reencrypt_and_the_pitr_job(tmp_path):
    """backup.offsite.reencrypt on every copy; the PITR base backup job copied only by its own entry."""
    offsite = dict(OFFSITE, reencrypt={"recipients": [ESCROW_PUBLIC],
                                       "identitySecret": {"name": "backup-encryption-key"}},
                   jobs=dict(OFFSITE["jobs"], **{"config-backup": {"reencrypt": None}}))
    out = tmp_path / "out"
    run = run_site(seed_values(**{"backup.offsite": offsite, "database.pitr": PITR}), tmp_path,
                   {"render_dir": str(out)})
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    postgres = _seed_job_file(manifests, "postgres-backup")
    assert postgres["copy"]["reencrypt"] == {"recipients": [ESCROW_PUBLIC], "identity_file": IDENTITY_PATH}
    JobConfig.from_mapping(postgres)
    pod = _pod(manifests[("CronJob", SEED_NAMESPACE, "postgres-backup-copy")])
    assert ("backup-encryption-key", "identity") in _secret_items(pod)
    prune = _pod(manifests[("CronJob", SEED_NAMESPACE, "postgres-backup-copy-prune")])
    assert "identity" not in {key for _secret, key in _secret_items(prune)}
    # reencrypt: null under jobs.<job>: that job's copy is byte for byte, without the identity.
    assert "reencrypt" not in _seed_job_file(manifests, "config-backup")["copy"]
    config_pod = _pod(manifests[("CronJob", SEED_NAMESPACE, "config-backup-copy")])
    assert "identity" not in {key for _secret, key in _secret_items(config_pod)}
    # The PITR base backups are not copied by the section alone (their WAL is not copied).
    assert ("CronJob", SEED_NAMESPACE, "postgres-pitr") in manifests
    assert ("CronJob", SEED_NAMESPACE, "postgres-pitr-copy") not in manifests
    assert "copy" not in _seed_job_file(manifests, "postgres-pitr")
    for manifest in manifests.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_seed_values_copy_the_pitr_job_when_its_entry_asks(tmp_path):
    offsite = dict(OFFSITE, jobs={"postgres-pitr": {"schedule": "0 3 * * 6", "retention": {"yearly": 2}}})
    out = tmp_path / "out"
    run = run_site(seed_values(**{"backup.offsite": offsite, "database.pitr": PITR}), tmp_path,
                   {"render_dir": str(out)})
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    config = _seed_job_file(manifests, "postgres-pitr")
    JobConfig.from_mapping(config)
    assert config["copy"]["destination"]["bucket"] == "biometrics-offsite"
    assert config["copy"]["retention"] == {"keep_monthly": 12, "keep_yearly": 2, "min_keep": 2}
    assert manifests[("CronJob", SEED_NAMESPACE, "postgres-pitr-copy")]["spec"]["schedule"] == "0 3 * * 6"
    # Switched off explicitly: accepted, no copy.
    out2 = tmp_path / "out2"
    offsite = dict(OFFSITE, jobs={"postgres-pitr": {"enabled": False}})
    run = run_site(seed_values(**{"backup.offsite": offsite, "database.pitr": PITR}), tmp_path,
                   {"render_dir": str(out2)})
    assert run.returncode == 0, run
    assert ("CronJob", SEED_NAMESPACE, "postgres-pitr-copy") not in load_rendered(out2)


@pytest.mark.parametrize("reencrypt,message", [
    ({"recipients": ["ESCROW_SECRET"], "identitySecret": {"name": "k"}},
     "backup.offsite.reencrypt.recipients[0] is an age secret key"),
    ({"recipients": ["not-a-key"], "identitySecret": {"name": "k"}},
     "backup.offsite.reencrypt.recipients[0] is not an age public key"),
    ({"recipients": [], "identitySecret": {"name": "k"}}, "backup.offsite.reencrypt.recipients must list"),
    ({"recipients": ["ESCROW_PUBLIC"]}, "backup.offsite.reencrypt.identitySecret must be"),
    ({"recipients": ["ESCROW_PUBLIC"], "identitySecret": {"name": "k"}, "identity": "x"},
     "backup.offsite.reencrypt.identity is not a reencrypt key"),
    ("age1", "backup.offsite.reencrypt must be a mapping"),
])
def test_bad_backup_offsite_reencrypt_fails_before_anything_is_written(tmp_path, reencrypt, message):
    keys = {"ESCROW_SECRET": ESCROW_SECRET, "ESCROW_PUBLIC": ESCROW_PUBLIC}
    if isinstance(reencrypt, dict):
        reencrypt = dict(reencrypt, recipients=[keys.get(value, value) for value in reencrypt["recipients"]])
    out = tmp_path / "out"
    out.mkdir()
    run = run_site(seed_values(**{"backup.offsite": dict(OFFSITE, reencrypt=reencrypt)}), tmp_path,
                   {"render_dir": str(out)})
    assert run.returncode != 0
    assert "values: " in run.output and message in run.output, run
    assert "Traceback" not in run.output
    assert ESCROW_SECRET not in run.output
    assert list(out.iterdir()) == []
