# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seed's values, deployed by playbooks/site.yml, run for real: every CronJob as a pod.

On the session cluster's node (``kube_node``) with the runner image built from this checkout
(``runner_image``, the job role's default image), in a namespace that enforces Pod Security
``restricted``:

* PostgreSQL, Redis, SeaweedFS S3, a git daemon and a Pushgateway listen on the node IP,
  where pods reach the host; the seed's values point at them;
* the data claim and the directory-sync claim are hostPath PersistentVolumes on the node;
* a real Velero server (``velero_server``) completes the Backup the seed's Velero job asks for;
* the PostgreSQL job and the file-tree job are stored in the restic format
  (``backup.postgres.storageFormat``, ``backup.incremental.storageFormat``), the repository
  password a Secret mounted as a file; the other jobs keep age archives;
* each CronJob runs as ``kubectl create job --from=cronjob/<name>`` does, and the pod must
  complete; the backup it took is then listed by ``biometrics.backup.backup_info`` and
  verified by ``biometrics.backup.backup_verify`` from the host;
* the drills restore in pods and push their metrics; a backup pod killed while it holds its
  restic lock does not hold up the next drill (the lock's pod is found Failed through the API);
  the retention CronJob prunes in a pod,
  and the schedule itself starts a Job (the CronJob controller, not kubectl);
* a second deployment keeps its backups on a PVC (``storage.backend: pvc``) backed by a
  hostPath PersistentVolume, read back from the host.

The tests of this module share one deployment and run in file order.
"""

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration.files_helpers import snapshot, write
from integration.roles.playbook import run_site, seed_values
from kube_fixtures import wait_for
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic
from modules_helpers import ansible_playbook
from pod_jobs import (create_seed_inputs, delete_persistent_volume, hold_schedules, hostpath_claim, kubectl_binary,
                      run_cronjob_now)
from servers import (server_dir, start_git_daemon, start_postgres, start_pushgateway, start_redis, start_s3,
                     start_with_port_retry, stop_s3)

kubernetes = pytest.importorskip("kubernetes")

BACKUP_JOBS = {  # CronJob -> kind of the backup it takes
    "postgres-backup": "postgres",
    "redis-backup": "redis",
    "incremental-backup": "files",
    "directory-sync-backup": "directory_sync",
    "config-backup": "config_git",
    "k8s-resources-backup": "k8s_resources",
    "biometrics-data-backup": "velero",
}
API_JOBS = ("k8s-resources-backup", "biometrics-data-backup")
# stored in the restic format (the drill follows its job)
RESTIC_JOBS = ("postgres-backup", "incremental-backup")
DRILLS = ("postgres-backup-drill", "redis-backup-drill", "incremental-backup-drill")
CONFIG_FILES = {"matcher.yaml": "threshold: 0.82\n", "retention.yaml": "raw_captures_days: 90\n"}
JOB_TIMEOUT = 300
TIMES = {}  # CronJob -> seconds from `kubectl create job` to Complete, for the summary


class Deployment:
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def run(self, cronjob):
        run = run_cronjob_now(self.kubeconfig, self.api, self.namespace, cronjob, timeout=JOB_TIMEOUT)
        assert run.succeeded, run.describe()
        TIMES.setdefault(cronjob, []).append(round(run.seconds, 1))
        for secret in self.secrets:
            assert secret not in run.log, "a secret reached the log of %s" % cronjob
        assert run.result is not None, "no JSON result in the log: " + run.describe()
        return run

    def modules(self, tmp_path, tasks):
        proc, results = ansible_playbook(tmp_path, tasks)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        for secret in self.secrets:
            assert secret not in proc.stdout, "a secret reached the Ansible output"
        return results


def _age_keypair(directory):
    identity_file = directory / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(identity_file)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity_file)], check=True, capture_output=True,
                               text=True).stdout.strip()
    return identity_file, recipient, identity_file.read_text()


def _restricted_namespace(core, prefix):
    client = kubernetes.client
    name = "%s-%s" % (prefix, uuid.uuid4().hex[:8])
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"})))
    return name


def _delete_namespace(core, name):
    try:
        core.delete_namespace(name)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="module")
def node_servers(kube_node):
    """The servers the seed's jobs talk to, listening on the node IP."""
    with server_dir("seedpods") as base:
        started = []
        try:
            servers = {}
            for name, start in (("postgres", start_postgres), ("redis", start_redis), ("s3", start_s3),
                                ("pushgateway", start_pushgateway), ("git", start_git_daemon)):
                server = start_with_port_retry(lambda start=start: start(base, host=kube_node.ip))
                started.append(server)
                servers[name] = server
            yield servers
        finally:
            for server in reversed(started):
                if server is servers.get("s3"):
                    stop_s3(server)
                else:
                    server.process.stop()


@pytest.fixture(scope="module")
def deployment(kube_cluster, kube_api, kube_node, runner_image, velero_server, node_servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed-pods")
    core = kubernetes.client.CoreV1Api(kube_api)
    postgres, redis, s3 = node_servers["postgres"], node_servers["redis"], node_servers["s3"]
    namespace = _restricted_namespace(core, "seedpods")
    volumes = []
    database = postgres.create_database("seed")
    try:
        identity_file, recipient, identity_text = _age_keypair(tmp)
        restic_password = "restic-" + uuid.uuid4().hex
        create_seed_inputs(kube_api, namespace, recipient, identity_text, s3.access_key, s3.secret_key,
                           CONFIG_FILES, restic_password=restic_password)
        with postgres.connect(database.name) as conn:
            conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, ref text NOT NULL)")
            conn.execute("CREATE TABLE templates (id int PRIMARY KEY, subject int REFERENCES subjects, data bytea)")
            conn.execute("INSERT INTO subjects SELECT i, 'S-' || i FROM generate_series(1, 500) i")
            conn.execute("INSERT INTO templates SELECT i, i, sha256(i::text::bytea) FROM generate_series(1, 500) i")
        redis.client(db=3).mset({"subject:%d" % index: "template-%d" % index for index in range(200)})
        data_dir, sync_dir = tmp / "data", tmp / "sync"
        for index in range(40):
            write(data_dir / "captures" / ("c%03d.bin" % index), os.urandom(4096 + index))
        write(data_dir / "conf" / "matcher.ini", "[matcher]\nthreshold = 0.82\n")
        volumes.append(hostpath_claim(kube_api, namespace, "biometrics-data", data_dir, writable=False))
        volumes.append(hostpath_claim(kube_api, namespace, "backup-storage", sync_dir, writable=True))
        remote = node_servers["git"].make_remote()
        prefix = "seedpods-%s/" % uuid.uuid4().hex[:8]
        values = seed_values(**{
            "namespace": namespace,
            "storage.s3.bucket": s3.bucket, "storage.s3.endpoint": s3.endpoint_url,
            "storage.s3.region": s3.region, "storage.s3.prefix": prefix,
            "database.host": postgres.host, "database.port": postgres.port, "database.name": database.name,
            "redis.host": redis.host, "redis.port": redis.port,
            "backup.git.repo": remote.url,
            "backup.pvc.veleroNamespace": velero_server.namespace,
            "backup.metrics.pushgateway": node_servers["pushgateway"].url,
            "backup.postgres.storageFormat": "restic",
            "backup.incremental.storageFormat": "restic",
        })
        run = run_site(values, tmp, env=kube_cluster.env)
        assert run.returncode == 0, run
        hold_schedules(kube_api, namespace)
        storage = {"backend": "s3", "bucket": s3.bucket, "prefix": prefix, "endpoint_url": s3.endpoint_url,
                   "region": s3.region, "access_key": s3.access_key, "secret_key": s3.secret_key}
        # Read from the host like any other job's: the restic password is one more storage option.
        restic_storage = dict(storage, format="restic", restic_password=restic_password)
        yield Deployment(kubeconfig=kube_cluster.kubeconfig, api=kube_api, core=core, namespace=namespace,
                         database=database, data_dir=data_dir, sync_dir=sync_dir, remote=remote, storage=storage,
                         storage_of={job: restic_storage if job in RESTIC_JOBS else storage for job in BACKUP_JOBS},
                         identity_file=identity_file, postgres=postgres, redis=redis, s3=s3, velero=velero_server,
                         pushgateway=node_servers["pushgateway"], image=runner_image, node_name=kube_node.name,
                         secrets=(s3.access_key, s3.secret_key, identity_text.strip().splitlines()[-1],
                                  restic_password),
                         results={})
    finally:
        _delete_namespace(core, namespace)
        for name in volumes:
            delete_persistent_volume(kube_api, name)
        postgres.drop_database(database.name)
        if TIMES:
            print("\nseed CronJobs, kubectl create job -> Completed (s): %s" % json.dumps(TIMES, sort_keys=True))


def test_the_deployment_runs_the_runner_image_under_restricted_pod_security(deployment):
    batch = kubernetes.client.BatchV1Api(deployment.api)
    cronjobs = {c.metadata.name: c for c in batch.list_namespaced_cron_job(deployment.namespace).items}
    assert set(BACKUP_JOBS) | set(DRILLS) | {"retention-prune"} <= set(cronjobs)
    for name, cronjob in cronjobs.items():
        container = cronjob.spec.job_template.spec.template.spec.containers[0]
        assert container.image == deployment.image, name
        assert not container.command, name  # the image's entrypoint: the runner
        # The age identity reaches only the jobs that read backups: the drills, and the incremental
        # file job when it chains (archive format: it reads its parent's encrypted index).
        reads_backups = name.endswith("-drill") or (name == "incremental-backup" and name not in RESTIC_JOBS)
        mounts = {mount.mount_path for mount in container.volume_mounts or []}
        assert ("/etc/biometrics-backup/identity" in mounts) is reads_backups, (name, mounts)
        # Only the jobs that read the API get a token: the exports, and the pods that open a restic
        # repository (they ask whether the pod named in a lock has finished).
        opens_restic = (name in RESTIC_JOBS or name == "retention-prune"
                        or (name.endswith("-drill") and name[:-len("-drill")] in RESTIC_JOBS))
        spec = cronjob.spec.job_template.spec.template.spec
        assert spec.automount_service_account_token is (name in API_JOBS or opens_restic), name
    labels = deployment.core.read_namespace(deployment.namespace).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("cronjob", list(BACKUP_JOBS))
def test_backup_cronjob_completes_in_a_pod(deployment, cronjob):
    run = deployment.run(cronjob)
    result = run.result
    assert result and result.get("backup_id"), run.describe()
    deployment.results[cronjob] = result
    pod = deployment.core.read_namespaced_pod(run.pod, deployment.namespace)
    # What restricted admission let through: non-root 65532, read-only root, nothing added.
    assert pod.spec.security_context.run_as_user == 65532
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    assert pod.spec.node_name == deployment.node_name


def _backups_verified(deployment, tmp_path, jobs):
    tasks = []
    for job in jobs:
        tasks.append({"name": "info %s" % job, "biometrics.backup.backup_info": {
            "job": job, "storage": deployment.storage_of[job]}})
        tasks.append({"name": "verify %s" % job, "biometrics.backup.backup_verify": {
            "job": job, "backup": "latest", "storage": deployment.storage_of[job],
            "encryption": {"identity_file": str(deployment.identity_file)}}})
    return deployment.modules(tmp_path, tasks)


def test_every_backup_taken_in_a_pod_is_listed_and_verified(deployment, tmp_path):
    missing = sorted(set(BACKUP_JOBS) - set(deployment.results))
    assert not missing, "backup CronJobs that did not complete: %s" % missing
    results = _backups_verified(deployment, tmp_path, BACKUP_JOBS)
    for job, kind in BACKUP_JOBS.items():
        listed = results["info %s" % job]["backups"]
        assert [item["id"] for item in listed][:1] == [deployment.results[job]["backup_id"]], job
        assert listed[0]["kind"] == kind and listed[0]["status"] == "complete", listed[0]
        assert (listed[0]["encryption"]["mode"] == "restic") is (job in RESTIC_JOBS), listed[0]
        verified = results["verify %s" % job]["results"]
        assert [item["id"] for item in verified] == [deployment.results[job]["backup_id"]], verified
        assert verified[0]["result"] == "ok", verified
        if job in RESTIC_JOBS:   # restic check ran on the repository the pod wrote
            assert verified[0]["restic_check"]["ok"] is True, verified


def test_what_the_pods_backed_up_is_the_real_data(deployment, tmp_path):
    # directory sync: the mirror on the backup-storage claim equals the data claim
    mirrors = list(deployment.sync_dir.rglob("matcher.ini"))
    assert mirrors, "the directory sync wrote nothing to the backup-storage claim"
    mirror = mirrors[0].parent.parent
    assert snapshot(mirror, owners=False, mtimes=False, dir_mtimes=False) == snapshot(
        deployment.data_dir, owners=False, mtimes=False, dir_mtimes=False)
    # the file tree, stored by its pod in the restic format: restored from the host, equal to the claim
    restored = deployment.modules(tmp_path, [{"name": "restore", "biometrics.backup.backup_restore": {
        "job": "incremental-backup", "storage": deployment.storage_of["incremental-backup"],
        "target": {"path": str(tmp_path / "tree")}}}])["restore"]
    assert restored["backup_id"] == deployment.results["incremental-backup"]["backup_id"], restored
    assert snapshot(tmp_path / "tree", owners=False, dir_mtimes=False) == snapshot(
        deployment.data_dir, owners=False, dir_mtimes=False)
    # configuration to git: pushed over git:// from the pod
    commit = deployment.results["config-backup"]["stats"]["commit"]
    assert deployment.remote.refs()["refs/heads/main"] == commit
    listed = deployment.remote.git("ls-tree", "-r", "--name-only", commit).split()
    assert sorted(os.path.basename(path) for path in listed) == sorted(CONFIG_FILES)
    # resource export: the pod read the API server through the kubernetes Service
    exported = deployment.results["k8s-resources-backup"]["stats"]
    assert exported["objects"] > 0, exported
    # Velero completed the Backup the pod asked for
    custom = kubernetes.client.CustomObjectsApi(deployment.api)
    velero_stats = deployment.results["biometrics-data-backup"]["stats"]
    assert velero_stats["phase"] == "Completed", velero_stats
    name = velero_stats["backup_name"]
    backups = custom.list_namespaced_custom_object("velero.io", "v1", deployment.velero.namespace, "backups")["items"]
    phases = {item["metadata"]["name"]: item.get("status", {}).get("phase") for item in backups}
    assert name in phases and phases[name] == "Completed", (name, phases)
    # postgres: row counts recorded by the pod match the live tables
    manifest_stats = deployment.results["postgres-backup"]["stats"]
    assert manifest_stats["tables"] == {"public.subjects": 500, "public.templates": 500}


@pytest.mark.parametrize("drill", DRILLS)
def test_drill_restores_in_a_pod_and_pushes_its_metrics(deployment, drill):
    started = time.time()
    run = deployment.run(drill)
    result = run.result
    assert result and result["ok"], run.describe()
    drilled = drill[:-len("-drill")]
    assert result["results"][0]["id"] == deployment.results[drilled]["backup_id"]
    found = []
    for family in text_string_to_metric_families(deployment.pushgateway.metrics_text()):
        for sample in family.samples:
            if sample.name == "backup_restore_drill_last_success_timestamp_seconds" and \
                    sample.labels.get("job") in (drilled, drill):
                found.append(sample.value)
    assert found and max(found) >= started - 5, (drill, found)


def _start_job_without_retries(deployment, cronjob, name):
    """The CronJob's Job as `kubectl create job --from` makes it, with no retry pod after a failure."""
    batch = kubernetes.client.BatchV1Api(deployment.api)
    template = batch.read_namespaced_cron_job(cronjob, deployment.namespace).spec.job_template
    spec = deployment.api.sanitize_for_serialization(template.spec)
    spec["backoffLimit"] = 0
    batch.create_namespaced_job(deployment.namespace, {
        "metadata": {"name": name, "labels": template.metadata.labels}, "spec": spec})


def test_the_lock_of_a_killed_backup_pod_does_not_hold_up_the_drill(deployment):
    """A backup pod killed while restic holds its lock (its pg_dump waits for a table lock, as on a
    busy database) leaves that lock: another host's, fresh, so live to restic for 30 minutes. The
    drill's restic check (an exclusive lock) asks the API server, finds the pod Failed, removes that
    one lock and restores, instead of waiting 10 minutes and being refused."""
    core = kubernetes.client.CoreV1Api(deployment.api)
    storage = deployment.storage_of["postgres-backup"]
    repo = restic.ResticRepository(restic.job_repository_options(storage, "postgres-backup"),
                                   storage["restic_password"], cache_dir=False)
    job = "postgres-backup-killed-%s" % uuid.uuid4().hex[:5]
    with deployment.postgres.connect(deployment.database.name, autocommit=False) as blocker:
        blocker.execute("LOCK TABLE templates IN ACCESS EXCLUSIVE MODE")
        _start_job_without_retries(deployment, "postgres-backup", job)

        def held_lock():
            pods = core.list_namespaced_pod(deployment.namespace, label_selector="job-name=" + job).items
            names = {pod.metadata.name for pod in pods}
            return next((lock for lock in repo.locks() if lock["hostname"] in names), None)

        lock = wait_for(held_lock, JOB_TIMEOUT, interval=1, what="the backup pod's restic lock")
        pod = lock["hostname"]
        subprocess.run([kubectl_binary(), "--kubeconfig", str(deployment.kubeconfig), "-n", deployment.namespace,
                        "exec", pod, "-c", "runner", "--", "python3", "-c", "import os; os.kill(-1, 9)"],
                       capture_output=True, timeout=60, check=False)
        wait_for(lambda: core.read_namespaced_pod(pod, deployment.namespace).status.phase == "Failed", 120,
                 what="the killed pod to be Failed")
        blocker.rollback()
    left = [item for item in repo.locks() if item["id"] == lock["id"]]
    assert left and not left[0]["stale"], left  # restic alone would keep it for 30 minutes

    run = deployment.run("postgres-backup-drill")
    assert run.result and run.result["ok"], run.describe()
    assert "removed the lock %s" % lock["id"][:12] in run.log and "%s has finished (Failed, every container terminated)" % pod in run.log, \
        run.log[-3000:]
    assert lock["id"] not in [item["id"] for item in repo.locks()]


def test_retention_cronjob_prunes_in_a_pod(deployment, tmp_path):
    ids = [deployment.results["redis-backup"]["backup_id"]]
    for dummy in range(2):
        ids.append(deployment.run("redis-backup").result["backup_id"])
    run = deployment.run("retention-prune")
    by_job = {item["job"]: item for item in run.result}
    # The pod also opened the PostgreSQL job's restic repository (the password mounted for it).
    assert "restic" in by_job["postgres-backup"], by_job["postgres-backup"]
    redis = by_job["redis-backup"]
    # The seed keeps one backup a day (borg semantics: plus the oldest while the rule is not
    # filled): of three taken in a row the middle one goes.
    assert ids[1] in redis["deleted"] and ids[-1] not in redis["deleted"], redis
    listed = deployment.modules(tmp_path, [{"name": "info", "biometrics.backup.backup_info": {
        "job": "redis-backup", "storage": deployment.storage}}])["info"]["backups"]
    assert ids[1] not in [item["id"] for item in listed] and listed[0]["id"] == ids[-1]


def test_the_schedule_itself_starts_the_job(deployment):
    """The CronJob controller, not kubectl, creates the Job: the schedule set to every minute (and
    the CronJob, held by the fixture, resumed)."""
    batch = kubernetes.client.BatchV1Api(deployment.api)
    batch.patch_namespaced_cron_job("redis-backup", deployment.namespace, {"spec": {
        "schedule": "* * * * *", "startingDeadlineSeconds": 120, "suspend": False}})
    try:
        def scheduled_job_completed():
            for job in batch.list_namespaced_job(deployment.namespace).items:
                owners = job.metadata.owner_references or []
                manual = (job.metadata.annotations or {}).get("cronjob.kubernetes.io/instantiate") == "manual"
                if not manual and any(owner.name == "redis-backup" for owner in owners):
                    if any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []):
                        return True
            return False

        wait_for(scheduled_job_completed, 200, interval=2, what="a scheduled redis-backup Job to complete")
    finally:
        batch.patch_namespaced_cron_job("redis-backup", deployment.namespace, {"spec": {"suspend": True}})


@pytest.fixture
def pvc_deployment(kube_cluster, kube_api, kube_node, runner_image, node_servers, tmp_path):
    """The seed's values with ``storage.backend: pvc``: backups on a claim the storage role makes,
    bound to a hostPath PersistentVolume (what a provisioner would give it)."""
    core = kubernetes.client.CoreV1Api(kube_api)
    postgres = node_servers["postgres"]
    namespace = _restricted_namespace(core, "seedpvc")
    database = postgres.create_database("pvc")
    storage_dir = tmp_path / "backups"
    volume = None
    try:
        identity_file, recipient, identity_text = _age_keypair(tmp_path)
        create_seed_inputs(kube_api, namespace, recipient, identity_text, "unused-key", "unused-secret", {})
        with postgres.connect(database.name) as conn:
            conn.execute("CREATE TABLE t AS SELECT i AS id FROM generate_series(1, 123) i")
        # The PV first, reserved for the claim the storage role will create.
        volume = hostpath_claim(kube_api, namespace, "backup-storage", storage_dir, capacity="100Gi",
                                create_claim=False)
        values = seed_values(**{
            "namespace": namespace, "storage.backend": "pvc", "storage.s3": None,
            "database.host": postgres.host, "database.port": postgres.port, "database.name": database.name,
            "redis": None, "data": None, "backup.git": None, "backup.pvc": None,
            "backup.schedule.redis": None, "backup.schedule.files": None, "backup.schedule.config": None,
            "backup.resources": {"enabled": False},
        })
        run = run_site(values, tmp_path, env=kube_cluster.env)
        assert run.returncode == 0, run
        hold_schedules(kube_api, namespace)
        wait_for(lambda: core.read_namespaced_persistent_volume_claim("backup-storage", namespace).status.phase
                 == "Bound", 120, what="the storage role's claim bound to the hostPath volume")
        yield Deployment(kubeconfig=kube_cluster.kubeconfig, api=kube_api, namespace=namespace,
                         storage_dir=storage_dir, identity_file=identity_file, secrets=(), results={})
    finally:
        _delete_namespace(core, namespace)
        if volume:
            delete_persistent_volume(kube_api, volume)
        postgres.drop_database(database.name)


def test_backups_on_a_pvc_backed_by_a_hostpath_volume(pvc_deployment, tmp_path):
    run = pvc_deployment.run("postgres-backup")
    backup_id = run.result["backup_id"]
    # The pod wrote to the claim; the host reads the same files through the volume's path.
    manifests = list(Path(pvc_deployment.storage_dir).rglob("manifest.json"))
    assert manifests, sorted(str(p) for p in Path(pvc_deployment.storage_dir).rglob("*"))
    storage = {"backend": "filesystem", "path": str(pvc_deployment.storage_dir)}
    results = pvc_deployment.modules(tmp_path, [
        {"name": "info", "biometrics.backup.backup_info": {"job": "postgres-backup", "storage": storage}},
        {"name": "verify", "biometrics.backup.backup_verify": {
            "job": "postgres-backup", "backup": backup_id, "storage": storage,
            "encryption": {"identity_file": str(pvc_deployment.identity_file)}}}])
    assert [item["id"] for item in results["info"]["backups"]] == [backup_id]
    assert [(item["id"], item["result"]) for item in results["verify"]["results"]] == [(backup_id, "ok")]
    assert re.match(r"^\d{8}T\d{6}Z", backup_id)
