"""biometrics.backup.recovery_drill rendered: drills from the offsite copy and point-in-time drills.

Render-only mode (job_render_dir) through ansible-playbook: the storage role (S3), a Redis job
with an S3 offsite copy, one without, a files job with a filesystem copy, a postgres_base job
(biometrics.backup.postgres_wal), then the recovery_drill role. The drills themselves run in
tests/integration/test_drill_pitr.py and test_offsite_runner.py; here: what the role hands to
the pods (schedules, arguments, which credentials, the job files the engine accepts).
"""

import os
import subprocess

import pyrage
import pytest
import yaml
from kubernetes_validate import validate as validate_manifest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig

from .playbook import PlaybookRun, load_rendered

KUBERNETES_VERSION = "1.34"
NAMESPACE = "drills"
SECRETS_ROOT = "/etc/biometrics-backup/secrets/"
S3_COPY = {"schedule": "30 4 * * *",
           "destination": {"backend": "s3", "bucket": "biometrics-offsite", "endpoint_url": "https://s3.site-b.example",
                           "region": "eu-north-1", "prefix": "biometrics"},
           "credentials_secret": "offsite-s3"}
FS_COPY = {"schedule": "45 4 * * *", "destination": {"backend": "filesystem", "path": "/mnt/offsite"},
           "claim": "offsite-archive"}
# A copy re-encrypted to another team's key: this job's drill key cannot open it, so it gets no
# offsite drill. The recipient is a fresh age public key (nothing is encrypted here).
REENCRYPTED_COPY = dict(S3_COPY, reencrypt={
    "recipients": [str(pyrage.x25519.Identity.generate().to_public())],
    "identity_secret": {"name": "redis-cache-age", "key": "identity"}})
PITR_IMAGE = "registry.example/backup-runner-pg15:0.1.0"
DIGEST = "sha256:" + "cd" * 32


def _play(tmp_path, drill_vars=None, pitr=True, args=()):
    out = tmp_path / "out"
    playbook = tmp_path / ("play-%d.yml" % len(list(tmp_path.glob("play-*.yml"))))
    tasks = [{"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
              "vars": {"storage_namespace": NAMESPACE, "storage_backend": "s3", "storage_s3_bucket": "backups",
                       "storage_s3_endpoint": "http://s3.example.com:8333", "storage_render_dir": str(out)}}]
    for name in ("redis-backup", "redis-cache"):
        tasks.append({"name": "Redis job " + name, "ansible.builtin.include_role": {"name": "biometrics.backup.redis"},
                      "vars": {"redis_name": name, "redis_host": name + ".cache.svc",
                               "redis_password_secret": {"name": name + "-auth"}}})
    tasks.append({"name": "Files job", "ansible.builtin.include_role": {"name": "biometrics.backup.incremental"},
                  "vars": {"incremental_name": "uploads", "incremental_source_claim": "uploads-data"}})
    if pitr:
        tasks.append({"name": "PITR job", "ansible.builtin.include_role": {"name": "biometrics.backup.postgres_wal"},
                      "vars": {"postgres_wal_name": "enrolment-db", "postgres_wal_host": "db.biometrics.svc",
                               "postgres_wal_password_secret": {"name": "pg-credentials"}}})
    tasks.append({"name": "Drills", "ansible.builtin.include_role": {"name": "biometrics.backup.recovery_drill"},
                  "vars": drill_vars or {}})
    playbook.write_text(yaml.safe_dump([{
        "name": "Recovery drills", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"job_namespace": NAMESPACE, "job_render_dir": str(out),
                 "job_copy_by_job": {"redis-backup": S3_COPY, "uploads": FS_COPY,
                                     "redis-cache": REENCRYPTED_COPY}},
        "tasks": tasks}]))
    process = subprocess.run(["ansible-playbook", str(playbook), *args], capture_output=True, text=True,
                             env=dict(os.environ, ANSIBLE_NOCOLOR="1"), timeout=600, check=False)
    return PlaybookRun(process), out


def _pod(cronjob):
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _job_file(manifests, job):
    return yaml.safe_load(manifests[("ConfigMap", NAMESPACE, job + "-config")]["data"]["job.yaml"])


def _secrets(pod):
    return {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drill-render")
    drill_vars = {"recovery_drill_pitr_image": PITR_IMAGE, "recovery_drill_pitr_image_digest": DIGEST,
                  "recovery_drill_pitr_database": "enrolment", "recovery_drill_sizes": {"enrolment-db": {"data_size": "8Gi"}}}
    first, out = _play(tmp, drill_vars)
    assert first.returncode == 0, first
    return {"first": first, "manifests": load_rendered(out)}


def test_one_offsite_drill_per_job_with_a_copy_monthly(rendered):
    # redis-cache has a copy too, re-encrypted to other recipients: no offsite drill for it.
    assert ("CronJob", NAMESPACE, "redis-cache-copy") in rendered["manifests"]
    manifests = rendered["manifests"]
    drills = sorted(name for (kind, _ns, name) in manifests if kind == "CronJob" and "-drill" in name)
    assert drills == ["enrolment-db-drill", "redis-backup-drill", "redis-backup-drill-offsite", "redis-cache-drill",
                      "uploads-drill", "uploads-drill-offsite"]
    for name in ("redis-backup", "uploads"):
        cronjob = manifests[("CronJob", NAMESPACE, name + "-drill-offsite")]
        assert cronjob["spec"]["schedule"] == "0 5 1 * *"
        assert _pod(cronjob)["containers"][0]["args"] == [
            "drill", "--config", "/etc/biometrics-backup/config/job.yaml", "--from-copy"]
        job = JobConfig.from_mapping(_job_file(manifests, name + "-drill-offsite"))
        assert job.drill == {"job": name}
    assert rendered["first"].changed > 0
    for manifest in manifests.values():
        validate_manifest(manifest, KUBERNETES_VERSION, strict=True)


def test_the_offsite_drill_gets_the_copy_credentials_and_not_the_primary_storage(rendered):
    manifests = rendered["manifests"]
    pod = _pod(manifests[("CronJob", NAMESPACE, "redis-backup-drill-offsite")])
    # The copy's Secret, the drilled job's source access (scratch Redis) and the identity; the
    # primary storage's credentials are not mounted.
    assert _secrets(pod) >= {"offsite-s3", "redis-backup-auth"}
    assert "backup-s3-credentials" not in _secrets(pod)
    assert "backup-s3-credentials" in _secrets(_pod(manifests[("CronJob", NAMESPACE, "redis-backup-drill")]))
    items = [item["key"] for volume in pod["volumes"] if "secret" in volume for item in volume["secret"].get("items", [])]
    assert "identity" in items
    config = _job_file(manifests, "redis-backup-drill-offsite")
    assert config["copy"]["destination"] == dict(
        S3_COPY["destination"], access_key_file=SECRETS_ROOT + "offsite-s3/access_key",
        secret_key_file=SECRETS_ROOT + "offsite-s3/secret_key")
    mounts = [mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]]
    assert SECRETS_ROOT + "offsite-s3" in mounts
    # A filesystem copy: its claim at the destination path, no storage credentials at all.
    pod = _pod(manifests[("CronJob", NAMESPACE, "uploads-drill-offsite")])
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume}
    assert "offsite-archive" in claims
    assert "backup-s3-credentials" not in _secrets(pod)
    assert _job_file(manifests, "uploads-drill-offsite")["copy"]["destination"] == FS_COPY["destination"]
    # No copy job is derived from a drill.
    assert not any(name.endswith("-drill-copy") or name.endswith("-offsite-copy") for (_k, _n, name) in manifests)


def test_the_pitr_drill_runs_in_the_server_image_without_database_credentials(rendered):
    manifests = rendered["manifests"]
    pod = _pod(manifests[("CronJob", NAMESPACE, "enrolment-db-drill")])
    container = pod["containers"][0]
    assert container["image"] == "registry.example/backup-runner-pg15@" + DIGEST
    assert container["args"] == ["drill", "--config", "/etc/biometrics-backup/config/job.yaml"]
    assert "pg-credentials" not in _secrets(pod), "the private server needs no password of the real one"
    config = _job_file(manifests, "enrolment-db-drill")
    job = JobConfig.from_mapping(config)
    assert job.kind == "postgres_base"
    assert job.drill == {"job": "enrolment-db", "target": {"recovery_timeout": 3600, "database": "enrolment"}}
    # Scratch for the unpacked cluster and its WAL: data + 256Mi.
    tmp = [volume for volume in pod["volumes"] if volume["name"] == "tmp" or "emptyDir" in volume]
    assert any(volume.get("emptyDir", {}).get("sizeLimit") == "8448Mi" for volume in tmp), tmp
    # No drill from the copy for it (its WAL job is not copied) and no copy job.
    assert ("CronJob", NAMESPACE, "enrolment-db-drill-offsite") not in manifests


def test_without_a_pitr_image_a_postgres_base_job_is_left_out_or_refused(tmp_path):
    run, out = _play(tmp_path, {"recovery_drill_offsite_schedule": ""})
    assert run.returncode == 0, run
    names = sorted(name for (kind, _ns, name) in load_rendered(out) if kind == "CronJob" and "-drill" in name)
    assert names == ["redis-backup-drill", "redis-cache-drill", "uploads-drill"]
    refused, _out = _play(tmp_path, {"recovery_drill_jobs": ["enrolment-db"]})
    assert refused.returncode != 0
    assert "recovery drill for enrolment-db" in refused.output and "recovery_drill_pitr_image" in refused.output
