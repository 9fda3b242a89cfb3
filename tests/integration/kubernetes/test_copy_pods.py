# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seed's values with ``backup.offsite``, deployed by playbooks/site.yml, run for real (issue 18).

On the session cluster's node with the runner image of this checkout, in a namespace that
enforces Pod Security ``restricted``: Redis and two SeaweedFS instances with credentials of
their own listen on the node IP (the primary storage and the offsite site). The Redis backup
CronJob, its copy CronJob ``redis-backup-copy`` and the destination's prune CronJob
``redis-backup-copy-prune`` run as pods (``kubectl create job --from=cronjob/...``); the host
then lists and verifies what the pods copied with ``backup_info`` / ``backup_verify`` against
the destination storage.

The seed's other jobs are left out of the values: their pods run in test_seed_pods.py, and
the copy CronJob is the same for every kind (roles/job/templates/copy.yml.j2). The module runs
twice: with the Redis job in the archive format, and in the restic format (issue 16), where the
copy pod runs restic copy into the offsite S3 with restic holding the primary's credentials only
(the offsite site's go to the engine's loopback repository server), so the copy proves that two
sites with credentials of their own work.
"""

import uuid

import pytest
from test_seed_pods import Deployment, _age_keypair, _delete_namespace, _restricted_namespace

from integration.roles.playbook import run_site, seed_values
from pod_jobs import create_seed_inputs, hold_schedules
from servers import server_dir, start_redis, start_s3, start_with_port_retry, stop_s3

kubernetes = pytest.importorskip("kubernetes")

JOB = "redis-backup"


@pytest.fixture(scope="module")
def copy_servers(kube_node):
    """Redis, the primary S3 and the offsite S3 (other credentials), on the node IP."""
    with server_dir("copypods") as base:
        started = []
        try:
            redis = start_with_port_retry(lambda: start_redis(base, host=kube_node.ip))
            started.append(redis)
            primary = start_with_port_retry(lambda: start_s3(base, host=kube_node.ip))
            started.append(primary)
            offsite = start_with_port_retry(lambda: start_s3(base, host=kube_node.ip))
            started.append(offsite)
            yield {"redis": redis, "primary": primary, "offsite": offsite}
        finally:
            for server in reversed(started):
                if server is started[0]:
                    server.process.stop()
                else:
                    stop_s3(server)


@pytest.fixture(scope="module", params=["archive", "restic"])
def deployment(request, kube_cluster, kube_api, runner_image, copy_servers, tmp_path_factory):
    storage_format = request.param
    tmp = tmp_path_factory.mktemp("copy-pods-" + storage_format)
    core = kubernetes.client.CoreV1Api(kube_api)
    redis, primary, offsite = copy_servers["redis"], copy_servers["primary"], copy_servers["offsite"]
    assert (primary.access_key, primary.secret_key) != (offsite.access_key, offsite.secret_key)
    namespace = _restricted_namespace(core, "copypods")
    try:
        identity_file, recipient, identity_text = _age_keypair(tmp)
        restic_password = "restic-" + uuid.uuid4().hex if storage_format == "restic" else None
        create_seed_inputs(kube_api, namespace, recipient, identity_text, primary.access_key, primary.secret_key, {},
                           restic_password=restic_password)
        # restic: the copies get a password of their own (backup.offsite.resticPasswordSecret)
        offsite_password = "offsite-restic-" + uuid.uuid4().hex if restic_password else None
        if offsite_password:
            core.create_namespaced_secret(namespace, kubernetes.client.V1Secret(
                metadata=kubernetes.client.V1ObjectMeta(name="offsite-restic"), string_data={"password": offsite_password}))
        core.create_namespaced_secret(namespace, kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(name="offsite-s3"),
            string_data={"access_key": offsite.access_key, "secret_key": offsite.secret_key}))
        redis.client(db=0).mset({"subject:%d" % index: "template-%d" % index for index in range(50)})
        prefix, offsite_prefix = "copypods-%s/" % uuid.uuid4().hex[:8], "offsite-%s/" % uuid.uuid4().hex[:8]
        values = seed_values(**{
            "namespace": namespace,
            "storage.s3.bucket": primary.bucket, "storage.s3.endpoint": primary.endpoint_url,
            "storage.s3.region": primary.region, "storage.s3.prefix": prefix,
            "redis.host": redis.host, "redis.port": redis.port,
            # Only the Redis job (and its copy): the other kinds' pods run in test_seed_pods.py.
            "database": None, "data": None, "backup.git": None, "backup.pvc": None,
            "backup.schedule.postgres": None, "backup.schedule.files": None, "backup.schedule.config": None,
            "backup.resources": {"enabled": False}, "backup.recoveryTest": {"enabled": False},
            "backup.monitoring": {"enabled": False},
            "backup.redis.storageFormat": storage_format,
            "backup.offsite": {
                "schedule": "30 4 * * *", "pruneSchedule": "0 6 * * *",
                "storage": {"backend": "s3", "s3": {"bucket": offsite.bucket, "endpoint": offsite.endpoint_url,
                                                    "region": offsite.region, "prefix": offsite_prefix}},
                "credentialsSecret": "offsite-s3",
                # The destination keeps the newest backup only; the primary keeps the seed's 30 days.
                "retention": {"last": 1},
                "requireCopy": True,
                **({"resticPasswordSecret": "offsite-restic"} if offsite_password else {}),
            },
        })
        run = run_site(values, tmp, env=kube_cluster.env)
        assert run.returncode == 0, run
        hold_schedules(kube_api, namespace)
        source = primary.storage_options(prefix=prefix)
        destination = offsite.storage_options(prefix=offsite_prefix)
        if restic_password:   # read from the host like any storage: the password is one more option
            source = dict(source, restic_password=restic_password)
            destination = dict(destination, restic_password=offsite_password)
        yield Deployment(kubeconfig=kube_cluster.kubeconfig, api=kube_api, core=core, namespace=namespace,
                         identity_file=identity_file, source=source, destination=destination, image=runner_image,
                         secrets=(primary.access_key, primary.secret_key, offsite.access_key, offsite.secret_key,
                                  identity_text.strip().splitlines()[-1])
                         + ((restic_password, offsite_password) if restic_password else ()),
                         storage_format=storage_format, results={})
    finally:
        _delete_namespace(core, namespace)


def _listed(deployment, tmp_path, storage):
    results = deployment.modules(tmp_path, [{"name": "info", "biometrics.backup.backup_info": {
        "job": JOB, "storage": storage}}])
    return [item["id"] for item in results["info"]["backups"]]


def test_the_values_deploy_the_copy_and_the_destination_prune_with_the_offsite_credentials_only(deployment):
    batch = kubernetes.client.BatchV1Api(deployment.api)
    cronjobs = {c.metadata.name: c for c in batch.list_namespaced_cron_job(deployment.namespace).items}
    assert {JOB, JOB + "-copy", JOB + "-copy-prune", "retention-prune"} <= set(cronjobs)
    assert cronjobs[JOB + "-copy"].spec.schedule == "30 4 * * *"
    assert cronjobs[JOB + "-copy-prune"].spec.schedule == "0 6 * * *"
    secrets = {}
    for name, cronjob in cronjobs.items():
        spec = cronjob.spec.job_template.spec.template.spec
        assert spec.service_account_name == name
        secrets[name] = {(volume.secret.secret_name, item.key) for volume in spec.volumes if volume.secret
                         for item in volume.secret.items or []}
    for name in (JOB + "-copy", JOB + "-copy-prune"):
        # The offsite credentials as files; never the age identity (the bytes are copied as they are).
        assert {("offsite-s3", "access_key"), ("offsite-s3", "secret_key")} <= secrets[name], secrets[name]
        assert not [key for secret, key in secrets[name] if key == "identity"], secrets[name]
        # restic format: the copies' own repository password
        restic = deployment.storage_format == "restic"
        assert (("offsite-restic", "password") in secrets[name]) is restic, secrets[name]
    # The copy reads the primary storage too (its credentials, the job's restic password); the
    # destination's prune opens the destination alone, and its pod runs without them below.
    assert ("backup-s3-credentials", "secret_key") in secrets[JOB + "-copy"]
    assert (("backup-restic-password", "password") in secrets[JOB + "-copy"]) is restic
    assert not [item for item in secrets[JOB + "-copy-prune"]
                if item[0] in ("backup-s3-credentials", "backup-restic-password", "backup-encryption-key")]
    assert not [secret for secret, _key in secrets[JOB] if secret == "offsite-restic"]
    assert not [secret for secret, _key in secrets[JOB] if secret == "offsite-s3"]
    args = cronjobs[JOB + "-copy-prune"].spec.job_template.spec.template.spec.containers[0].args
    assert args == ["prune", "--destination", "--config", "/etc/biometrics-backup/config/job.yaml"]


def test_backups_taken_in_pods_are_copied_verified_and_pruned_at_the_destination(deployment, tmp_path):
    first = deployment.run(JOB).result["backup_id"]
    copied = deployment.run(JOB + "-copy").result
    assert [item["id"] for item in copied["copied"]] == [first], copied
    assert copied["bytes_copied"] > 0 and not copied["failed"]
    assert _listed(deployment, tmp_path, deployment.destination) == [first]

    second = deployment.run(JOB).result["backup_id"]
    again = deployment.run(JOB + "-copy").result
    # Incremental: only the new backup goes; the first is in sync.
    assert [item["id"] for item in again["copied"]] == [second], again
    assert again["in_sync"] == [first], again
    assert sorted(_listed(deployment, tmp_path, deployment.destination)) == sorted([first, second])

    # The copy is a location of its own: verified from the host with the destination storage.
    verified = deployment.modules(tmp_path, [{"name": "verify", "biometrics.backup.backup_verify": {
        "job": JOB, "backup": "latest", "storage": deployment.destination,
        "encryption": {"identity_file": str(deployment.identity_file)}}}])["verify"]["results"]
    assert [(item["id"], item["result"]) for item in verified] == [(second, "ok")]
    if deployment.storage_format == "restic":
        # the copy is a repository of its own at the offsite site, opened with its own password
        # (deployment.destination carries it) and read by restic there
        assert verified[0]["restic_check"]["ok"] is True, verified
        assert copied["destination"]["bucket"] == deployment.destination["bucket"]

    # The destination keeps the newest only (retention.last: 1); the primary keeps both.
    pruned = deployment.run(JOB + "-copy-prune").result
    assert pruned["deleted"] == [first], pruned
    assert _listed(deployment, tmp_path, deployment.destination) == [second]
    assert sorted(_listed(deployment, tmp_path, deployment.source)) == sorted([first, second])
