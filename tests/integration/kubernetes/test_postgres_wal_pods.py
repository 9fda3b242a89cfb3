# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""biometrics.backup.postgres_wal for real: the WAL stream as a Deployment's pod, a base backup
CronJob run as a pod, a point-in-time restore from the host of what the pods stored, and the
weekly point-in-time drill (the recovery_drill role with the runner image that has PostgreSQL's
server) run as a pod.

On the session cluster's node with the runner image of this checkout, in a namespace enforcing
Pod Security ``restricted``. PostgreSQL 15 (wal_level=replica) and SeaweedFS S3 listen on the
node IP. The role is applied by ansible-playbook, by its FQCN.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
import yaml

from ansible_collections.biometrics.backup.plugins.module_utils.engine import pgwal
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import parse_iso
from kube_fixtures import REPO_ROOT, wait_for
from modules_helpers import ansible_playbook
from pod_jobs import create_seed_inputs, run_cronjob_now
from servers import server_dir, start_postgres, start_s3, start_with_port_retry, stop_s3

kubernetes = pytest.importorskip("kubernetes")

NAME = "enrol-pitr"
DB = "enrol"
RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
PARTIAL_INTERVAL = 2
TIMES = {}


def _age_keypair(directory):
    identity_file = directory / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(identity_file)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity_file)], check=True, capture_output=True,
                               text=True).stdout.strip()
    return identity_file, recipient, identity_file.read_text()


def _apply_role(kube_cluster, tmp, namespace, state, postgres, s3, prefix, pitr_image=None):
    """The storage and postgres_wal roles, and with ``pitr_image`` the recovery_drill role for the
    postgres_base job. (The drill role drills only jobs deployed earlier in the play: it cannot
    remove the drill of a job removed in the same play, so the removal leaves it out.)"""
    playbook = tmp / ("pitr-%s.yml" % state)
    tasks = [
        {"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
         "vars": {"storage_namespace": namespace, "storage_backend": "s3", "storage_s3_bucket": s3.bucket,
                  "storage_s3_endpoint": s3.endpoint_url, "storage_s3_region": s3.region,
                  "storage_s3_prefix": prefix}},
        {"name": "WAL stream", "ansible.builtin.include_role": {"name": "biometrics.backup.postgres_wal"},
         "vars": {"postgres_wal_state": state, "postgres_wal_name": NAME, "postgres_wal_host": postgres.host,
                  "postgres_wal_port": postgres.port, "postgres_wal_slot": "pod_slot",
                  "postgres_wal_partial_interval": PARTIAL_INTERVAL,
                  "postgres_wal_termination_grace_period": 60}},
    ]
    if pitr_image:
        # The drill of the postgres_base job: a private PostgreSQL in the pod, no credentials of
        # the server; the scratch holds the base backup plus the WAL it replays.
        tasks.append({"name": "Drill", "ansible.builtin.include_role": {"name": "biometrics.backup.recovery_drill"},
                      "vars": {"recovery_drill_state": state, "recovery_drill_jobs": [NAME],
                               "recovery_drill_pitr_image": pitr_image, "recovery_drill_pitr_database": DB,
                               "recovery_drill_pitr_recovery_timeout": 300,
                               "recovery_drill_sizes": {NAME: {"data_size": "256Mi"}}}})
    playbook.write_text(yaml.safe_dump([{
        "name": "PostgreSQL WAL stream", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"job_namespace": namespace}, "tasks": tasks}]))
    env = dict(kube_cluster.env, ANSIBLE_NOCOLOR="1",
               ANSIBLE_COLLECTIONS_PATH=str(REPO_ROOT / "build" / "collections"))
    done = subprocess.run(["ansible-playbook", str(playbook)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done


def _insert(postgres, batch, rows=40):
    with postgres.connect(DB) as conn:
        # Flushed at commit (the test server runs synchronous_commit=off): the stream stopped
        # right after stores it, not only once the WAL writer got to it (as in test_postgres_pitr).
        conn.execute("SET synchronous_commit = on")
        conn.execute("INSERT INTO enrolments (batch) SELECT %s FROM generate_series(1, %s)", (batch, rows))
        conn.commit()
        return (conn.execute("SELECT clock_timestamp()").fetchone()[0],
                conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def _holds(storage, wal_job, lsn, committed_at):
    """Whether the stored WAL holds ``lsn``: its segment completed, a later segment stored, or a
    partial copy of it read after the commit (the server's WAL writer flushes within 200 ms)."""
    segno = pgwal.segment_number(pgwal.parse_lsn(lsn))
    for manifest in Catalog(storage).scan(wal_job, with_orphans=False):
        stats = manifest.get("stats") or {}
        parsed = pgwal.parse_segment_name(stats.get("file") or "")
        if parsed is None or stats.get("type") not in ("segment", "partial"):
            continue
        if parsed[1] > segno or (parsed[1] == segno and stats["type"] == "segment"):
            return True
        if parsed[1] == segno and parse_iso(manifest["started_at"]) > committed_at + datetime.timedelta(seconds=0.5):
            return True
    return False


def _wait_stored(storage, wal_job, lsn, committed_at, timeout=120):
    """Seconds from the commit until the stored WAL holds it."""
    wait_for(lambda: _holds(storage, wal_job, lsn, committed_at), timeout=timeout,
             what="WAL stored past %s" % lsn, interval=0.2)
    return (datetime.datetime.now(datetime.timezone.utc) - committed_at).total_seconds()


def _runner(config, *argv):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "build" / "collections"))
    done = subprocess.run([sys.executable, "-m", RUNNER, *argv, "--config", str(config)], capture_output=True,
                          text=True, env=env, timeout=600, check=False, cwd="/")
    return done


def _batches(postgres, database):
    with postgres.connect(database) as conn:
        return dict(conn.execute("SELECT batch, count(*) FROM enrolments GROUP BY batch").fetchall())


@pytest.fixture(scope="module")
def servers(kube_node):
    with server_dir("pitrpods") as base:
        postgres = start_with_port_retry(lambda: start_postgres(base, host=kube_node.ip))
        s3 = None
        try:
            s3 = start_with_port_retry(lambda: start_s3(base, host=kube_node.ip))
            # start_postgres trusts the node's subnet for databases; the stream also needs replication.
            with open(os.path.join(postgres.data_dir, "pg_hba.conf"), "a", encoding="utf-8") as hba:
                hba.write("host replication all samenet trust\n")
            with postgres.connect() as conn:
                conn.execute("SELECT pg_reload_conf()")
                conn.execute("CREATE DATABASE %s" % DB)
            with postgres.connect(DB) as conn:
                conn.execute("CREATE TABLE enrolments (id serial PRIMARY KEY, batch int NOT NULL, "
                             "at timestamptz NOT NULL DEFAULT clock_timestamp())")
            yield postgres, s3
        finally:
            if s3 is not None:
                stop_s3(s3)
            postgres.process.stop()


def _describe(core, namespace):
    """The stream's pods and the namespace's events, for a failure message."""
    lines = []
    for pod in core.list_namespaced_pod(namespace).items:
        lines.append("pod %s %s %s" % (pod.metadata.name, pod.status.phase, [
            (status.name, status.restart_count, status.state.to_dict()) for status in pod.status.container_statuses or []]))
        try:
            lines.append(core.read_namespaced_pod_log(pod.metadata.name, namespace, container="runner",
                                                      tail_lines=30))
        except kubernetes.client.exceptions.ApiException:
            pass
    for event in core.list_namespaced_event(namespace).items[-30:]:
        lines.append("event %s %s: %s" % (event.involved_object.name, event.reason, event.message))
    return "\n".join(lines)


def _stream_pod(core, namespace):
    pods = core.list_namespaced_pod(namespace, label_selector="backup.biometrics.io/workload=wal-stream").items
    return pods[0] if len(pods) == 1 else None


def test_wal_stream_pod_base_backup_and_point_in_time_restore(
        kube_cluster, kube_api, runner_image, runner_pitr_image, servers, tmp_path):
    postgres, s3 = servers
    core = kubernetes.client.CoreV1Api(kube_api)
    apps = kubernetes.client.AppsV1Api(kube_api)
    namespace = "pitrpods-%s" % uuid.uuid4().hex[:8]
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(
        name=namespace, labels={"pod-security.kubernetes.io/enforce": "restricted",
                                "pod-security.kubernetes.io/enforce-version": "latest"})))
    scratch = tempfile.mkdtemp(prefix="bb-pitr-pods-")
    os.chmod(scratch, 0o711)  # the private PostgreSQL of the restore runs as postgres
    prefix = "pitrpods-%s/" % uuid.uuid4().hex[:8]
    try:
        identity_file, recipient, identity_text = _age_keypair(tmp_path)
        create_seed_inputs(kube_api, namespace, recipient, identity_text, s3.access_key, s3.secret_key, {})
        started = time.monotonic()
        _apply_role(kube_cluster, tmp_path, namespace, "present", postgres, s3, prefix, runner_pitr_image)
        TIMES["role applied"] = round(time.monotonic() - started, 1)

        deployment = apps.read_namespaced_deployment(NAME + "-stream", namespace)
        assert deployment.spec.replicas == 1 and deployment.spec.strategy.type == "Recreate"
        assert deployment.spec.template.spec.containers[0].image == runner_image

        def running():
            pod = _stream_pod(core, namespace)
            return pod is not None and pod.status.phase == "Running"
        try:
            wait_for(running, timeout=120, what="the WAL stream's pod running", interval=0.5)
        except AssertionError as exc:
            raise AssertionError("%s\n%s" % (exc, _describe(core, namespace))) from None
        TIMES["apply -> stream pod Running"] = round(time.monotonic() - started, 1)
        pod = _stream_pod(core, namespace)
        assert pod.spec.security_context.run_as_user == 65532
        assert pod.spec.containers[0].security_context.read_only_root_filesystem is True

        def slot_active():
            with postgres.connect() as conn:
                return conn.execute("SELECT count(*) FROM pg_replication_slots "
                                    "WHERE slot_name = 'pod_slot' AND active").fetchone()[0] == 1
        try:
            wait_for(slot_active, timeout=120, what="the stream on its slot", interval=0.5)
        except AssertionError as exc:
            raise AssertionError("%s\n%s" % (exc, _describe(core, namespace))) from None
        TIMES["apply -> slot active"] = round(time.monotonic() - started, 1)

        run = run_cronjob_now(kube_cluster.kubeconfig, kube_api, namespace, NAME, timeout=300)
        assert run.succeeded, run.describe()
        assert run.result and run.result.get("backup_id"), run.describe()
        TIMES["base backup job"] = round(run.seconds, 1)
        for secret in (s3.secret_key, identity_text.strip().splitlines()[-1]):
            assert secret not in run.log

        storage_config = {"backend": "s3", "bucket": s3.bucket, "prefix": prefix, "endpoint_url": s3.endpoint_url,
                          "region": s3.region, "access_key": s3.access_key, "secret_key": s3.secret_key}
        storage = open_storage(storage_config)
        first_time = _insert(postgres, 1)[0]
        time.sleep(1.0)
        second_time, lsn = _insert(postgres, 2)
        TIMES["commit -> WAL stored (s)"] = round(_wait_stored(storage, NAME + "-wal", lsn, second_time), 1)
        # The image's pg_waldump ran: every stored WAL file records its commit times (what the
        # restore plans with), the second batch's commit among them.
        wal_files = [m for m in Catalog(storage).scan(NAME + "-wal", with_orphans=False)
                     if m.stats.get("type") in ("segment", "partial")]
        assert wal_files and all(m.stats.get("xact_times_known") is True for m in wal_files), [
            m.stats for m in wal_files]
        assert max(parse_iso(m.stats["last_xact_time"]) for m in wal_files if m.stats.get("last_xact_time")) >= (
            second_time - datetime.timedelta(seconds=0.5))

        # The heartbeat probes run in the image: the startup probe passed (the container is
        # started and, without a readiness probe, ready) and the liveness probe restarted nothing.
        def probed():
            status = (_stream_pod(core, namespace).status.container_statuses or [None])[0]
            return status is not None and status.started and status.ready
        try:
            wait_for(probed, timeout=60, what="the stream's startup probe passed", interval=1)
        except AssertionError as exc:
            raise AssertionError("%s\n%s" % (exc, _describe(core, namespace))) from None
        assert _stream_pod(core, namespace).status.container_statuses[0].restart_count == 0

        for key in ("access_key", "secret_key"):
            (tmp_path / key).write_text(storage_config[key])
        host_storage = dict(storage_config, access_key_file=str(tmp_path / "access_key"),
                            secret_key_file=str(tmp_path / "secret_key"))
        del host_storage["access_key"], host_storage["secret_key"]
        job = {"job": NAME, "kind": "postgres_base",
               "source": {"host": postgres.host, "port": postgres.port, "user": "postgres", "wal_job": NAME + "-wal",
                          "bin_dir": postgres.bin_dir},
               "storage": host_storage,
               "encryption": {"recipients": [recipient], "identity_file": str(identity_file)},
               "restore": {"target": {"host": postgres.host, "port": postgres.port, "user": "postgres",
                                      "bin_dir": postgres.bin_dir, "database": DB, "restore_database": "enrol_pit",
                                      "scratch_dir": scratch}}}
        config = tmp_path / "restore.yml"
        config.write_text(yaml.safe_dump(job))
        target = (first_time + datetime.timedelta(milliseconds=300)).isoformat()
        done = _runner(config, "restore", "--point-in-time", target)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _batches(postgres, "enrol_pit") == {1: 40}

        # The weekly drill as a pod: recovery to a random time of the window (base backup .. end
        # of the stored WAL) in a private PostgreSQL of the pitr image, as uid 65532.
        drill_job = kubernetes.client.BatchV1Api(kube_api).read_namespaced_cron_job(NAME + "-drill", namespace)
        drill_pod_spec = drill_job.spec.job_template.spec.template.spec
        assert drill_pod_spec.containers[0].image == runner_pitr_image
        assert not drill_pod_spec.containers[0].env_from and not [
            volume for volume in drill_pod_spec.volumes or [] if volume.secret is not None and "postgres" in (
                volume.secret.secret_name or "")]
        drill = run_cronjob_now(kube_cluster.kubeconfig, kube_api, namespace, NAME + "-drill", timeout=600)
        TIMES["point-in-time drill job"] = round(drill.seconds, 1)
        assert drill.succeeded, drill.describe()
        result = drill.result or {}
        window = result.get("window") or {}
        assert result.get("seed") is not None and window.get("seconds", 0) > 0, drill.describe()
        assert result.get("in_window") is True, drill.describe()
        assert parse_iso(window["oldest"]) <= parse_iso(result["target_time"]) <= parse_iso(window["newest"])
        # Recovery stops at the target when a transaction ended after it in the stored WAL, else it
        # runs to the end of the stored WAL (the same state): which one depends on the drawn target.
        drawn = parse_iso(result["target_time"])
        assert result.get("target_reached") is True or result["plan"]["no_commit_after_target"] is True, (
            drill.describe())
        margin = datetime.timedelta(seconds=0.5)  # a batch's commit is stamped just before its clock reading
        last_commit = result["recovered_to"]["last_commit_time"]
        if last_commit is None:
            # No transaction ended in the replayed WAL: the drawn target lies before the first
            # batch's commit, and the recovered database is the base backup's (taken before it).
            assert drawn <= first_time + margin, drill.describe()
        else:
            assert parse_iso(last_commit) <= drawn, drill.describe()
        if all(abs(drawn - moment) > margin for moment in (first_time, second_time)):
            assert result["rows"] == 40 * len([moment for moment in (first_time, second_time) if moment < drawn]), (
                drill.describe())
        assert result.get("ok") is True and all(check["ok"] for check in result["checks"]), drill.describe()
        assert "drill target %s" % result["target_time"] in drill.log, drill.log[-3000:]
        assert "drill passed: %s recovered to %s" % (NAME, result["target_time"]) in drill.log, drill.log[-3000:]
        for secret in (s3.secret_key, identity_text.strip().splitlines()[-1]):
            assert secret not in drill.log

        # Stopping the stream: the pod stores the segment in progress on SIGTERM, then exits.
        _insert(postgres, 3)
        pod = _stream_pod(core, namespace)
        assert pod.status.container_statuses[0].restart_count == 0, _describe(core, namespace)
        pod_name = pod.metadata.name
        log = {}

        def follow():
            stream = core.read_namespaced_pod_log(pod_name, namespace, container="runner", follow=True,
                                                  _preload_content=False)
            log["text"] = b"".join(stream.stream()).decode("utf-8", "replace")
        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        stopping = time.monotonic()
        apps.delete_namespaced_deployment(NAME + "-stream", namespace)
        wait_for(lambda: not core.list_namespaced_pod(
            namespace, label_selector="backup.biometrics.io/workload=wal-stream").items,
            timeout=120, what="the stream's pod gone", interval=0.5)
        TIMES["delete -> pod gone"] = round(time.monotonic() - stopping, 1)
        follower.join(30)
        assert "WAL stream:" in log.get("text", ""), log.get("text", "")[-3000:]
        assert s3.secret_key not in log["text"]
        assert TIMES["delete -> pod gone"] < 60  # stopped by itself, not killed at the grace period's end

        # latest through the module, as a playbook runs it: the stored WAL replayed to its end.
        proc, results = ansible_playbook(tmp_path, [{"name": "restore latest", "biometrics.backup.backup_restore": {
            "job": NAME, "kind": "postgres_base", "point_in_time": "latest", "storage": storage_config,
            "encryption": {"identity_file": str(identity_file)},
            "target": dict(job["restore"]["target"], restore_database="enrol_latest")}}])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert s3.secret_key not in proc.stdout
        assert results["restore latest"]["recovered_to"]["lsn"]
        # Batch 3 reached storage only through the copy the pod stored as it stopped (or one
        # periodic copy in the second before): either way the stream lost nothing on SIGTERM.
        assert _batches(postgres, "enrol_latest") == {1: 40, 2: 40, 3: 40}, log["text"][-3000:]

        removed = _apply_role(kube_cluster, tmp_path, namespace, "absent", postgres, s3, prefix)
        assert "changed=0" not in removed.stdout
        batch = kubernetes.client.BatchV1Api(kube_api)
        assert NAME not in {c.metadata.name for c in batch.list_namespaced_cron_job(namespace).items}
    finally:
        print("\npostgres_wal pods (s): %s" % json.dumps(TIMES, sort_keys=True))
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            core.delete_namespace(namespace)
        except kubernetes.client.exceptions.ApiException:
            pass
