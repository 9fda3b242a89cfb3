# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The deployed CronJobs really work: their commands, run locally, back up and restore.

The seed's values (pointed at the real PostgreSQL, Redis and SeaweedFS S3 of the fixtures)
are deployed with playbooks/site.yml to the real control plane. There is no kubelet, so
hack/run_cronjob.py plays its part for one container: it reads the CronJob, its ConfigMaps
and Secrets back from the API server, materializes them as files and env, and runs the
container's command (the runner image's entrypoint + the CronJob's args). What the roles
render and what the runner expects must therefore agree, or these tests fail.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.restore import restore
from ansible_collections.biometrics.backup.plugins.module_utils.engine.runner import COMMANDS
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.targets.files import FilesTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.targets.postgres import PostgresTarget

from .files_helpers import snapshot, write
from .roles.playbook import REPO_ROOT, run_site, seed_values

kubernetes = pytest.importorskip("kubernetes")

sys.path.insert(0, str(REPO_ROOT / "hack"))
from run_cronjob import ENTRYPOINT, LocalCronJob, LocalRunError, create_seed_inputs  # noqa: E402  pylint: disable=wrong-import-position

BACKUP_JOBS = ("postgres-backup", "redis-backup", "incremental-backup", "directory-sync-backup", "config-backup")
CONFIG_FILES = {"matcher.yaml": "threshold: 0.82\n", "retention.yaml": "raw_captures_days: 90\n"}


class Deployment:
    """The deployed namespace and everything a test needs to run and check its CronJobs."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def local(self, name, **kwargs):
        return LocalCronJob(self.api, self.namespace, name, claims=self.claims, **kwargs)

    def run(self, name, *extra):
        """Run CronJob ``name`` locally: (exit code, JSON result, stderr, the LocalCronJob)."""
        with self.local(name) as local:
            result = local.run(extra, capture=True)
        output = result.stdout.strip()
        return result.returncode, (json.loads(output) if output else None), result.stderr, local

    def catalog(self):
        return Catalog(open_storage(self.storage))

    def secrets(self):
        return (self.s3.access_key, self.s3.secret_key, self.identity_text.strip())


def _age_keypair(directory):
    identity_file = directory / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(identity_file)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity_file)], check=True, capture_output=True,
                               text=True).stdout.strip()
    return str(identity_file), recipient, identity_file.read_text()


@pytest.fixture(scope="module")
def deployment(kube_cluster, postgres_server, redis_server, s3_server, git_remote_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cronjob-local")
    api = kube_cluster.api_client()
    core = kubernetes.client.CoreV1Api(api)
    client = kubernetes.client
    namespace = "cjrun-" + uuid.uuid4().hex[:10]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=namespace, labels={"pod-security.kubernetes.io/enforce": "restricted"})))
    database = postgres_server.create_database("cj")
    try:
        identity_file, recipient, identity_text = _age_keypair(tmp)
        create_seed_inputs(api, namespace, recipient, identity_text, s3_server.access_key, s3_server.secret_key,
                           CONFIG_FILES)
        with postgres_server.connect(database.name) as conn:
            conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, ref text NOT NULL)")
            conn.execute("CREATE TABLE templates (id int PRIMARY KEY, subject int REFERENCES subjects, data bytea)")
            conn.execute("INSERT INTO subjects SELECT i, 'S-' || i FROM generate_series(1, 300) i")
            conn.execute("INSERT INTO templates SELECT i, i, sha256(i::text::bytea) FROM generate_series(1, 300) i")
        data_dir, sync_dir = tmp / "data", tmp / "sync"
        for index in range(40):
            write(data_dir / "captures" / ("c%03d.bin" % index), os.urandom(2048 + index))
        write(data_dir / "conf" / "matcher.ini", "[matcher]\nthreshold = 0.82\n")
        sync_dir.mkdir()
        remote = git_remote_factory()
        prefix = "cj-%s/" % uuid.uuid4().hex[:10]
        values = seed_values(**{
            "namespace": namespace,
            "storage.s3.bucket": s3_server.bucket, "storage.s3.endpoint": s3_server.endpoint_url,
            "storage.s3.region": s3_server.region, "storage.s3.prefix": prefix,
            "database.host": postgres_server.host, "database.port": postgres_server.port,
            "database.name": database.name,
            "redis.host": redis_server.host, "redis.port": redis_server.port,
            "backup.git.repo": remote.url,
            # Velero needs a Velero server; the resource export has tests of its own.
            "backup.pvc": None, "backup.resources": {"enabled": False},
        })
        run = run_site(values, tmp, env=kube_cluster.env)
        assert run.returncode == 0, run
        storage = s3_server.storage_options(prefix=prefix)
        yield Deployment(api=api, namespace=namespace, values=values, database=database, data_dir=data_dir,
                         sync_dir=sync_dir, remote=remote, identity_file=identity_file, recipient=recipient,
                         identity_text=identity_text, storage=storage, s3=s3_server, postgres=postgres_server,
                         redis=redis_server, claims={"biometrics-data": str(data_dir), "backup-storage": str(sync_dir)})
    finally:
        core.delete_namespace(namespace)
        postgres_server.drop_database(database.name)
        api.close()


def _cronjobs(deployment):
    batch = kubernetes.client.BatchV1Api(deployment.api)
    return {c.metadata.name: c for c in batch.list_namespaced_cron_job(deployment.namespace).items}


def _assert_clean(deployment, *texts):
    for text in texts:
        for secret in deployment.secrets():
            assert secret not in text


def test_every_cronjob_command_is_the_runner_cli_with_only_pod_inputs(deployment):
    cronjobs = _cronjobs(deployment)
    assert set(BACKUP_JOBS) | {"retention-prune", "postgres-backup-drill"} <= set(cronjobs)
    for name, cronjob in cronjobs.items():
        container = cronjob.spec.job_template.spec.template.spec.containers[0]
        assert not container.command, name  # the image's entrypoint: the runner
        assert container.args[0] in COMMANDS, name
        assert all(item.value_from is not None or item.name == "HOME" for item in container.env), name
        with deployment.local(name) as local:
            assert local.argv[:3] == [sys.executable] + ENTRYPOINT[1:], name
            assert local.argv[3:4] == container.args[:1]
            config_files = [arg for previous, arg in zip(local.argv, local.argv[1:]) if previous == "--config"]
            assert config_files and all(path.startswith(local.workdir) for path in config_files), local.argv
            # No job here reads the API: no service account token, no kubeconfig of the caller.
            assert "KUBECONFIG" not in local.env and "K8S_AUTH_KUBECONFIG" not in local.env, name
            assert set(local.env) - {"PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ"} == {
                item.name for item in container.env}, name
            # The age identity reaches only the jobs that read backups.
            reads_backups = name.endswith("-drill") or name == "incremental-backup"
            assert ("/etc/biometrics-backup/identity" in dict(local.mounts)) is reads_backups, name
            for path in config_files:
                _assert_clean(deployment, Path(path).read_text())


def test_postgres_cronjob_backs_up_and_the_backup_restores(deployment):
    code, result, stderr, _local = deployment.run("postgres-backup")
    assert code == 0, stderr
    _assert_clean(deployment, stderr, json.dumps(result))
    manifest = deployment.catalog().get("postgres-backup", result["backup_id"])
    assert manifest is not None and manifest["kind"] == "postgres"
    assert manifest["encryption"]["mode"] == "age"
    assert manifest["stats"]["tables"] == {"public.subjects": 300, "public.templates": 300}

    restored = deployment.database.name + "_r"
    target = PostgresTarget({"host": deployment.postgres.host, "port": deployment.postgres.port,
                             "user": deployment.postgres.user, "database": deployment.database.name,
                             "restore_database": restored})
    report = restore(open_storage(deployment.storage), "postgres-backup", target, backup=result["backup_id"],
                     identity=deployment.identity_text)
    try:
        assert report["backup_id"] == result["backup_id"]
        assert report["checks"] and all(check["ok"] for check in report["checks"])
        query = "SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM %s t"
        with deployment.postgres.connect(deployment.database.name) as live, deployment.postgres.connect(restored) as copy:
            for table in ("subjects", "templates"):
                assert live.execute(query % table).fetchone() == copy.execute(query % table).fetchone()
    finally:
        deployment.postgres.drop_database(restored)


def test_redis_cronjob_backs_up_and_its_drill_verifies_the_backup(deployment):
    client = deployment.redis.client(db=5)
    client.set("cjrun:%s" % deployment.namespace, "x")
    code, result, stderr, _local = deployment.run("redis-backup")
    assert code == 0, stderr
    manifest = deployment.catalog().get("redis-backup", result["backup_id"])
    assert manifest["kind"] == "redis" and manifest["stats"]["keys"].get("db5", 0) >= 1

    code, drill, stderr, local = deployment.run("redis-backup-drill")
    assert code == 0, stderr
    assert "/etc/biometrics-backup/identity" in dict(local.mounts)  # only drills read backups
    assert drill["ok"] and drill["results"][0]["id"] == result["backup_id"]
    recorded = deployment.catalog().get("redis-backup", result["backup_id"])
    assert recorded["verification"]["result"] == "ok"
    _assert_clean(deployment, stderr, json.dumps(drill))


def test_incremental_cronjob_chains_and_the_chain_restores(deployment, tmp_path):
    code, first, stderr, _local = deployment.run("incremental-backup")
    assert code == 0, stderr
    write(deployment.data_dir / "captures" / "c000.bin", b"changed")
    os.remove(deployment.data_dir / "captures" / "c001.bin")
    write(deployment.data_dir / "new" / "added.txt", "added\n")
    code, second, stderr, _local = deployment.run("incremental-backup")
    assert code == 0, stderr
    assert second["parent"] == first["backup_id"]
    assert second["stats"]["type"] == "incremental" and second["stats"]["deleted"] == 1

    destination = tmp_path / "restored"
    report = restore(open_storage(deployment.storage), "incremental-backup", FilesTarget({"path": str(destination)}),
                     backup="latest", identity=deployment.identity_text)
    assert report["chain"][-2:] == [first["backup_id"], second["backup_id"]]
    assert snapshot(destination, owners=False, dir_mtimes=False) == snapshot(
        deployment.data_dir, owners=False, dir_mtimes=False)

    code, drill, stderr, _local = deployment.run("incremental-backup-drill")
    assert code == 0 and drill["ok"], stderr
    assert drill["results"][0]["id"] == second["backup_id"]


def test_directory_sync_and_config_git_cronjobs(deployment):
    code, result, stderr, _local = deployment.run("directory-sync-backup")
    assert code == 0, stderr
    mirror = deployment.sync_dir / "data"
    assert snapshot(mirror, owners=False, mtimes=False, dir_mtimes=False) == snapshot(
        deployment.data_dir, owners=False, mtimes=False, dir_mtimes=False)
    assert deployment.catalog().get("directory-sync-backup", result["backup_id"])["kind"] == "directory_sync"

    code, result, stderr, _local = deployment.run("config-backup")
    assert code == 0, stderr
    commit = result["stats"]["commit"]
    assert deployment.remote.refs()["refs/heads/main"] == commit
    listed = deployment.remote.git("ls-tree", "-r", "--name-only", commit).split()
    assert sorted(os.path.basename(path) for path in listed) == sorted(CONFIG_FILES)
    for path in listed:
        assert deployment.remote.git("show", "%s:%s" % (commit, path)) == CONFIG_FILES[os.path.basename(path)]


def test_retention_cronjob_applies_the_seed_policy(deployment):
    ids = []
    for dummy in range(3):
        code, result, stderr, _local = deployment.run("redis-backup")
        assert code == 0, stderr
        ids.append(result["backup_id"])
    before = [m["id"] for m in deployment.catalog().scan("redis-backup", with_orphans=False)]
    code, results, stderr, _local = deployment.run("retention-prune")
    assert code == 0, stderr
    by_job = {item["job"]: item for item in results}
    assert {"postgres-backup", "redis-backup", "incremental-backup", "config-backup"} <= set(by_job)
    redis = by_job["redis-backup"]
    kept = [entry["id"] for entry in redis["keep"]]
    assert kept[0] == before[0] == ids[-1] and "daily #1" in redis["keep"][0]["reasons"]
    # The seed's policy keeps one backup a day (borg semantics: plus the oldest while the
    # daily rule is not filled): the middle one of three taken in a row goes.
    assert ids[1] in redis["deleted"] and len(kept) < len(before)
    assert sorted(redis["deleted"]) == sorted(set(before) - set(kept))
    after = [m["id"] for m in deployment.catalog().scan("redis-backup", with_orphans=False)]
    assert after == kept


def test_a_claim_without_a_local_directory_is_refused(deployment):
    local = LocalCronJob(deployment.api, deployment.namespace, "incremental-backup", claims={})
    with pytest.raises(LocalRunError, match="--claim biometrics-data=DIR"):
        local.materialize()
    local.cleanup()


def test_the_cli_runs_a_cronjob_from_a_checkout_below_tmp(deployment, kube_cluster):
    """`make demo` from a clone below /tmp: the pods mount their scratch volume at /tmp, and the
    container-path rewriting once moved the clone's .venv interpreter into that volume
    (``.../volumes/scratch/<clone>/.venv/bin/python: No such file``).

    The checkout here is a directory below /tmp whose hack/, build/ and .venv are symlinks to
    this repository's (a path, not a copy: everything run_cronjob.py derives from its own
    location, the interpreter and build/collections for PYTHONPATH, lies below /tmp).
    """
    base = tempfile.mkdtemp(prefix="bb-clone-", dir="/tmp")
    try:
        clone = os.path.join(base, "biometrics.backup")
        os.mkdir(clone)
        for name in ("hack", "build"):
            os.symlink(str(REPO_ROOT / name), os.path.join(clone, name))
        os.symlink(sys.prefix, os.path.join(clone, ".venv"))
        python = os.path.join(clone, ".venv", "bin", os.path.basename(sys.executable))
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "KUBECONFIG")}
        command = [python, os.path.join(clone, "hack", "run_cronjob.py"), "--kubeconfig", kube_cluster.kubeconfig,
                   "-n", deployment.namespace, "postgres-backup"]
        for claim, directory in sorted(deployment.claims.items()):
            command += ["--claim", "%s=%s" % (claim, directory)]
        result = subprocess.run(command, env=env, cwd=base, capture_output=True, text=True, timeout=300,
                                check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        # the command ran with the clone's interpreter, named by its path below /tmp
        assert "run-cronjob: command: %s -m %s backup " % (shlex.quote(python), ENTRYPOINT[2]) in result.stderr, \
            result.stderr[-3000:]
        backup = json.loads(result.stdout)
        assert deployment.catalog().get("postgres-backup", backup["backup_id"])["kind"] == "postgres"
        _assert_clean(deployment, result.stderr, result.stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
