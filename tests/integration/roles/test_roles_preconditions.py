"""The roles refuse what they cannot deploy before they change anything (issue 13, point 5).

- a render directory that does not exist is created, not a failure after some files were written;
- a job whose schedule is in the values but whose source is not fails, naming the missing value;
- the Velero job needs Velero (its namespace and the CRD backups.velero.io): checked first, and
  render-only mode needs no cluster at all; so do the monitoring objects (the Prometheus
  Operator's PrometheusRule kind).

"Nothing changed" is measured: the render directory, or every object in the namespaces
involved (with its resourceVersion), before and after the failed run.
"""

import json
import os
import subprocess
import uuid

import pytest
import yaml

from .playbook import PlaybookRun, load_rendered, run_site, seed_values

kubernetes = pytest.importorskip("kubernetes")

AGE_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
SEED_CRONJOBS = {"postgres-backup", "redis-backup", "directory-sync-backup", "config-backup", "incremental-backup",
                 "k8s-resources-backup", "biometrics-data-backup", "retention-prune", "postgres-backup-drill"}
# Everything a deploy creates in a namespace.
NAMESPACED_KINDS = ("cronjobs", "configmaps", "serviceaccounts", "secrets", "roles", "rolebindings",
                    "persistentvolumeclaims", "prometheusrules", "servicemonitors", "backups")
# Objects the controllers put into every namespace on their own.
NOT_OURS = {("ServiceAccount", "default"), ("ConfigMap", "kube-root-ca.crt")}


def _snapshot(cluster, *namespaces):
    """Every object a deploy could create or change, with its resourceVersion."""
    objects = set()
    served = {name.split(".")[0] for name in cluster.kubectl("api-resources", "-o", "name").stdout.split()}
    kinds = ",".join(kind for kind in NAMESPACED_KINDS if kind in served)
    for namespace in namespaces:
        listed = cluster.kubectl("get", kinds, "-n", namespace, "-o", "json", check=False)
        if listed.returncode != 0:  # the namespace does not exist: nothing in it
            assert "NotFound" in listed.stderr or not listed.stderr.strip(), listed.stderr
            continue
        for item in json.loads(listed.stdout)["items"]:
            meta = item["metadata"]
            if (item["kind"], meta["name"]) not in NOT_OURS:
                objects.add((item["kind"], namespace, meta["name"], meta["resourceVersion"]))
    # Whether each namespace exists (other tests create and delete namespaces meanwhile).
    existing = {item["metadata"]["name"] for item in json.loads(cluster.kubectl("get", "namespaces", "-o", "json").stdout)["items"]}
    objects.update(("Namespace", None, namespace, None) for namespace in namespaces if namespace in existing)
    return objects


def _namespace_with_key(cluster, make_kube_namespace, prefix):
    namespace = make_kube_namespace(prefix)
    cluster.kubectl("-n", namespace, "create", "secret", "generic", "backup-encryption-key",
                    "--from-literal=recipients=" + AGE_RECIPIENT)
    return namespace


def _files(directory):
    return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def _run_play(tasks, tmp_path, env, name="play"):
    """A play of our own (no umbrella role), as a user who includes the roles one by one writes it."""
    playbook = tmp_path / ("%s.yml" % name)
    playbook.write_text(yaml.safe_dump([{"name": "Roles on their own", "hosts": "localhost", "connection": "local",
                                         "gather_facts": False, "tasks": tasks}]))
    process = subprocess.run(["ansible-playbook", str(playbook)], capture_output=True, text=True,
                             env=dict(env, ANSIBLE_NOCOLOR="1"), timeout=600, check=False)
    return PlaybookRun(process)


# --- render-only mode -------------------------------------------------------------------------

def test_render_creates_a_missing_directory_and_needs_no_cluster(tmp_path):
    """The seed's values (with the Velero job) render into a directory that does not exist yet,
    with every Kubernetes connection setting pointing nowhere."""
    out = tmp_path / "not" / "there" / "yet"
    nowhere = {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "K8S_AUTH_KUBECONFIG": str(tmp_path / "no-kubeconfig"),
               "K8S_AUTH_HOST": "https://127.0.0.1:9", "K8S_AUTH_VALIDATE_CERTS": "false"}
    run = run_site(seed_values(), tmp_path, {"render_dir": str(out)}, env=dict(os.environ, **nowhere))
    assert run.returncode == 0, run
    manifests = load_rendered(out)
    cronjobs = {name for kind, _namespace, name in manifests if kind == "CronJob"}
    assert SEED_CRONJOBS <= cronjobs, sorted(cronjobs)
    assert ("Role", "velero", "biometrics-data-backup") in manifests
    assert (out / "prometheusrule.yml").is_file()


def test_roles_on_their_own_create_their_render_directories(tmp_path):
    """storage and a job role, each with a render directory of its own that does not exist."""
    storage_dir, jobs_dir = tmp_path / "out" / "storage", tmp_path / "out" / "jobs"
    run = _run_play([
        {"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
         "vars": {"storage_render_dir": str(storage_dir), "storage_encryption_enabled": False}},
        {"name": "PostgreSQL job", "ansible.builtin.include_role": {"name": "biometrics.backup.postgres"},
         "vars": {"job_render_dir": str(jobs_dir)}},
    ], tmp_path, env=dict(os.environ))
    assert run.returncode == 0, run
    assert ("PersistentVolumeClaim", "biometrics", "backup-storage") in load_rendered(storage_dir)
    assert ("CronJob", "biometrics", "postgres-backup") in load_rendered(jobs_dir)


# Each schedule of the values with its source removed, and the value the error must name.
SCHEDULED_WITHOUT_SOURCE = {
    "backup.schedule.postgres": "database.host",
    "backup.schedule.redis": "redis.host",
    "backup.schedule.files": "data.pvc",
    "backup.schedule.incremental": "data.pvc",
    "backup.schedule.config": "backup.git.repo",
    "backup.schedule.volumes": "backup.pvc",
    "backup.schedule.resources": "backup.encryption.enabled",
}


def _values_scheduled_without_sources():
    values = seed_values(database=None, redis=None, data=None, **{"backup.git": None, "backup.pvc": None})
    values["backup"]["schedule"].update(incremental="0 * * * *", volumes="0 1 * * *", resources="30 2 * * *")
    values["backup"]["encryption"]["enabled"] = False
    return values


def test_every_scheduled_job_without_its_source_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    run = run_site(_values_scheduled_without_sources(), tmp_path, {"render_dir": str(out)})
    assert run.returncode != 0, run
    assert run.failed == 1 and "Traceback" not in run.output
    message = next(line for line in run.output.splitlines() if line.startswith("fatal:"))
    for schedule, source in SCHEDULED_WITHOUT_SOURCE.items():
        assert "%s is set but %s" % (schedule, source) in message, (schedule, message)
    assert not out.exists()  # not even the render directory


def test_a_job_switched_off_needs_no_source(tmp_path):
    """The control: a schedule whose job is explicitly disabled is not an error."""
    switched_off = {"backup.postgres.enabled": False, "backup.redis.enabled": False, "backup.resources.enabled": False}
    values = seed_values(database=None, redis=None, **switched_off)
    values["backup"]["encryption"]["enabled"] = False
    values["backup"]["schedule"]["resources"] = "30 2 * * *"
    out = tmp_path / "out"
    run = run_site(values, tmp_path, {"render_dir": str(out)})
    assert run.returncode == 0, run
    cronjobs = {name for kind, _namespace, name in load_rendered(out) if kind == "CronJob"}
    assert "directory-sync-backup" in cronjobs
    assert not {"postgres-backup", "redis-backup", "k8s-resources-backup"} & cronjobs


# --- against the cluster ----------------------------------------------------------------------

def test_scheduled_job_without_source_changes_nothing_in_the_cluster(kube_cluster, make_kube_namespace, tmp_path):
    namespace = _namespace_with_key(kube_cluster, make_kube_namespace, "pre-src")
    values = seed_values(namespace=namespace, data=None, **{"storage.backend": "pvc", "backup.pvc": None})
    before = _snapshot(kube_cluster, namespace)
    run = run_site(values, tmp_path, env=kube_cluster.env)
    assert run.returncode != 0, run
    assert "backup.schedule.files is set but data.pvc is missing" in run.output, run
    assert _snapshot(kube_cluster, namespace) == before


def test_velero_namespace_missing_fails_before_anything_is_applied(kube_cluster, make_kube_namespace, tmp_path):
    namespace = _namespace_with_key(kube_cluster, make_kube_namespace, "pre-velero")
    velero = "no-velero-" + uuid.uuid4().hex[:8]
    values = seed_values(namespace=namespace, **{"storage.backend": "pvc", "backup.pvc.veleroNamespace": velero})
    before = _snapshot(kube_cluster, namespace, velero)
    run = run_site(values, tmp_path, env=kube_cluster.env)
    assert run.returncode != 0, run
    message = next(line for line in run.output.splitlines() if line.startswith("fatal:"))
    assert "namespace %s" % velero in message and "Install Velero" in message, message
    assert "backups.velero.io" not in message.split("Install Velero")[0]  # the CRD is there
    assert "Traceback" not in run.output and "not found" not in message
    assert _snapshot(kube_cluster, namespace, velero) == before


@pytest.fixture(scope="module")
def cluster_without_velero(tmp_path_factory):
    """A control plane of its own without the CRDs of Velero and of the Prometheus Operator's
    PrometheusRule (the shared one keeps them)."""
    import kube_fixtures  # pylint: disable=import-outside-toplevel
    state_dir = tmp_path_factory.mktemp("no-velero") / "cluster"
    started = kube_fixtures._script("start", state_dir, timeout=kube_fixtures.START_TIMEOUT)  # pylint: disable=protected-access
    try:
        if started.returncode != 0:
            kube_fixtures.unavailable("second control plane did not start: %s" % started.stderr[-2000:])
        cluster = kube_fixtures.KubeCluster(state_dir / "kubeconfig", state_dir=state_dir, started=True)
        cluster.kubectl("delete", "crd", "backups.velero.io", "prometheusrules.monitoring.coreos.com", "--wait=true")
        yield cluster
    finally:
        kube_fixtures._script("stop", state_dir, timeout=120)  # pylint: disable=protected-access


def test_cluster_without_velero_fails_before_anything_is_applied(cluster_without_velero, tmp_path):
    cluster = cluster_without_velero
    namespace = "pre-novelero"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("-n", namespace, "create", "secret", "generic", "backup-encryption-key",
                    "--from-literal=recipients=" + AGE_RECIPIENT)
    values = seed_values(namespace=namespace, **{"storage.backend": "pvc"})
    before = _snapshot(cluster, namespace, "velero")
    run = run_site(values, tmp_path, env=cluster.env)
    assert run.returncode != 0, run
    message = next(line for line in run.output.splitlines() if line.startswith("fatal:"))
    assert "namespace velero" in message and "backups.velero.io" in message and "Install Velero" in message, message
    assert _snapshot(cluster, namespace, "velero") == before

    # The volumes role on its own, Velero's namespace there but not its CRD: the same check.
    cluster.kubectl("create", "namespace", "velero")
    before = _snapshot(cluster, namespace, "velero")
    alone = _run_play([
        {"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
         "vars": {"storage_namespace": namespace, "storage_backend": "s3", "storage_s3_bucket": "backups",
                  "storage_encryption_enabled": False}},
        {"name": "Velero job", "ansible.builtin.include_role": {"name": "biometrics.backup.volumes"},
         "vars": {"job_namespace": namespace}},
    ], tmp_path, env=cluster.env, name="volumes-alone")
    assert alone.returncode != 0, alone
    message = next(line for line in alone.output.splitlines() if line.startswith("fatal:"))
    problem = message.split("Install Velero")[0]
    assert "backups.velero.io" in problem and "namespace velero" not in problem, message
    assert _snapshot(cluster, namespace, "velero") == before

    # Without the Velero job the next prerequisite is the Prometheus Operator's PrometheusRule.
    without_velero = seed_values(namespace=namespace, **{"storage.backend": "pvc", "backup.pvc": None})
    run = run_site(without_velero, tmp_path, env=cluster.env)
    assert run.returncode != 0, run
    message = next(line for line in run.output.splitlines() if line.startswith("fatal:"))
    assert "does not know PrometheusRule" in message and "backup.monitoring.enabled" in message, message
    assert _snapshot(cluster, namespace, "velero") == before

    # Render-only mode on the same cluster: nothing is looked up, every object is written.
    out = tmp_path / "render"
    rendered = run_site(values, tmp_path, {"render_dir": str(out)}, env=cluster.env)
    assert rendered.returncode == 0, rendered
    assert ("CronJob", namespace, "biometrics-data-backup") in load_rendered(out)
    assert (out / "prometheusrule.yml").is_file()
