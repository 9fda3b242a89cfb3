"""The roles against the real control plane: apply, idempotence, check mode, removal, RBAC, Pod Security."""

import base64
import copy
import uuid
import json
import subprocess

import pytest
import yaml

from .playbook import PlaybookRun, load_rendered, run_site, seed_values
from .test_copy_role import FS_COPY, OFFSITE, S3_COPY

kubernetes = pytest.importorskip("kubernetes")

AGE_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _values(namespace):
    values = seed_values(namespace=namespace, **{"storage.backend": "pvc"})
    values["backup"]["pvc"]["veleroNamespace"] = namespace + "-velero"
    return values


@pytest.fixture(scope="module")
def deployed(kube_cluster, kube_api, tmp_path_factory):
    """The seed's values deployed into a fresh namespace with Pod Security 'restricted' enforced."""
    # One deployment for the module: a converge of every seed job takes about a minute here.
    tmp_path = tmp_path_factory.mktemp("roles-cluster")
    namespace = "roles-" + uuid.uuid4().hex[:8]
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(
        name=namespace, labels={"pod-security.kubernetes.io/enforce": "restricted"})))
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=namespace + "-velero")))
    core.create_namespaced_secret(namespace, kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name="backup-encryption-key"),
        string_data={"recipients": AGE_RECIPIENT + "\n", "identity": "AGE-SECRET-KEY-PLACEHOLDER-NOT-USED\n"}))
    values = _values(namespace)
    first = run_site(values, tmp_path, env=kube_cluster.env)
    assert first.returncode == 0, first
    yield {"namespace": namespace, "values": values, "first": first, "env": kube_cluster.env, "tmp": tmp_path,
           "kube_cluster": kube_cluster}
    core.delete_namespace(namespace + "-velero")
    core.delete_namespace(namespace)


def _cronjobs(kube_api, namespace):
    batch = kubernetes.client.BatchV1Api(kube_api)
    return {c.metadata.name: c for c in batch.list_namespaced_cron_job(namespace).items}


def test_converge_is_idempotent_and_creates_every_seed_job(deployed, kube_api):
    cronjobs = _cronjobs(kube_api, deployed["namespace"])
    assert {"postgres-backup", "redis-backup", "directory-sync-backup", "config-backup", "incremental-backup",
            "k8s-resources-backup", "biometrics-data-backup", "retention-prune", "postgres-backup-drill"} <= set(cronjobs)
    assert cronjobs["postgres-backup"].spec.schedule == "0 2 * * *"
    # The monitoring role's objects went out in the umbrella role's one batched apply.
    namespace = deployed["namespace"]
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    rule = custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "prometheusrules",
                                               "biometrics-backup-alerts")
    assert "BackupFailed" in json.dumps(rule["spec"])
    dashboard = kubernetes.client.CoreV1Api(kube_api).read_namespaced_config_map("biometrics-backup-dashboard", namespace)
    assert dashboard.metadata.labels.get("grafana_dashboard")
    assert deployed["first"].changed > 0
    second = run_site(deployed["values"], deployed["tmp"], env=deployed["env"])
    assert second.returncode == 0, second
    assert second.changed == 0, second


def test_check_mode_tells_the_truth_and_changes_nothing(deployed, kube_api):
    values = copy.deepcopy(deployed["values"])
    values["backup"]["schedule"]["postgres"] = "15 1 * * *"
    preview = run_site(values, deployed["tmp"], env=deployed["env"], args=("--check", "--diff"))
    assert preview.returncode == 0, preview
    assert preview.changed >= 1, preview
    assert "15 1 * * *" in preview.output  # the diff shows the new schedule
    assert _cronjobs(kube_api, deployed["namespace"])["postgres-backup"].spec.schedule == "0 2 * * *"
    applied = run_site(values, deployed["tmp"], env=deployed["env"])
    assert applied.returncode == 0 and applied.changed >= 1, applied
    assert _cronjobs(kube_api, deployed["namespace"])["postgres-backup"].spec.schedule == "15 1 * * *"


def _can_i(kube_cluster, namespace, service_account, verb, resource, in_namespace):
    result = kube_cluster.kubectl("auth", "can-i", verb, resource, "-n", in_namespace,
                                  "--as", "system:serviceaccount:%s:%s" % (namespace, service_account), check=False)
    return result.stdout.strip() == "yes"


def test_least_privilege_rbac(deployed, kube_cluster):
    namespace = deployed["namespace"]
    velero = namespace + "-velero"
    assert _can_i(kube_cluster, namespace, "k8s-resources-backup", "list", "configmaps", namespace)
    assert _can_i(kube_cluster, namespace, "k8s-resources-backup", "get", "secrets", namespace)
    assert not _can_i(kube_cluster, namespace, "k8s-resources-backup", "delete", "configmaps", namespace)
    assert not _can_i(kube_cluster, namespace, "k8s-resources-backup", "list", "configmaps", "default")
    assert not _can_i(kube_cluster, namespace, "k8s-resources-backup", "create", "backups.velero.io", velero)
    assert _can_i(kube_cluster, namespace, "biometrics-data-backup", "create", "backups.velero.io", velero)
    assert not _can_i(kube_cluster, namespace, "biometrics-data-backup", "delete", "backups.velero.io", velero)
    assert not _can_i(kube_cluster, namespace, "postgres-backup", "list", "configmaps", namespace)


def test_job_pods_are_admitted_under_pod_security_restricted(deployed, kube_cluster, kube_api):
    """Pods built from every CronJob's template pass the namespace's 'restricted' admission."""
    namespace = deployed["namespace"]
    api = kubernetes.client.ApiClient()
    for name, cronjob in _cronjobs(kube_api, namespace).items():
        template = cronjob.spec.job_template.spec.template
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name + "-admission", "namespace": namespace},
               "spec": api.sanitize_for_serialization(template.spec)}
        result = kube_cluster.kubectl("create", "--dry-run=server", "-f", "-", input_text=json.dumps(pod), check=False)
        assert result.returncode == 0, (name, result.stderr)
    # The control: the same admission refuses a root pod, so the check above can fail.
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root", "namespace": namespace},
           "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}
    refused = kube_cluster.kubectl("create", "--dry-run=server", "-f", "-", input_text=json.dumps(bad), check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr


def test_a_job_removed_from_the_values_is_removed_with_its_rbac(deployed, kube_api):
    namespace = deployed["namespace"]
    values = copy.deepcopy(deployed["values"])
    del values["redis"]
    del values["backup"]["schedule"]["redis"]  # a schedule without its source is refused
    values["backup"]["resources"] = {"enabled": False}
    run = run_site(values, deployed["tmp"], env=deployed["env"])
    assert run.returncode == 0, run
    cronjobs = _cronjobs(kube_api, namespace)
    assert "redis-backup" not in cronjobs and "redis-backup-drill" not in cronjobs
    assert "k8s-resources-backup" not in cronjobs and "postgres-backup" in cronjobs
    core = kubernetes.client.CoreV1Api(kube_api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    assert "redis-backup" not in {s.metadata.name for s in core.list_namespaced_service_account(namespace).items}
    assert "redis-backup-config" not in {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
    assert "k8s-resources-backup" not in {r.metadata.name for r in rbac.list_namespaced_role(namespace).items}


def test_the_velero_jobs_rbac_follows_velero_to_its_new_namespace(deployed, kube_api):
    """veleroNamespace moved: the Velero job's Role and RoleBinding in the old namespace go (they
    kept granting its ServiceAccount Backups there); check mode only announces them."""
    namespace, old = deployed["namespace"], deployed["namespace"] + "-velero"
    values = copy.deepcopy(deployed["values"])
    del values["redis"]  # as the test before leaves it (when it ran): the move is then all there is to do
    del values["backup"]["schedule"]["redis"]
    values["backup"]["resources"] = {"enabled": False}
    values["backup"]["pvc"]["veleroNamespace"] = new = namespace + "-velero-moved"
    core = kubernetes.client.CoreV1Api(kube_api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=new)))

    def rbac_in(where):
        return ({r.metadata.name for r in rbac.list_namespaced_role(where).items},
                {b.metadata.name for b in rbac.list_namespaced_role_binding(where).items})

    try:
        assert rbac_in(old) == ({"biometrics-data-backup"}, {"biometrics-data-backup"})
        preview = run_site(values, deployed["tmp"], env=deployed["env"], args=("--check",))
        assert preview.returncode == 0, preview
        for kind in ("Role", "RoleBinding"):  # the removal, not the read (whose label names the namespace)
            assert "changed: [localhost] => (item=biometrics-data-backup: %s/biometrics-data-backup)" % kind \
                in preview.output, preview
        assert rbac_in(old) == ({"biometrics-data-backup"}, {"biometrics-data-backup"})

        moved = run_site(values, deployed["tmp"], env=deployed["env"])
        assert moved.returncode == 0, moved
        assert rbac_in(old) == (set(), set())
        assert rbac_in(new) == ({"biometrics-data-backup"}, {"biometrics-data-backup"})
        assert _can_i(deployed["kube_cluster"], namespace, "biometrics-data-backup", "create", "backups.velero.io", new)
        assert not _can_i(deployed["kube_cluster"], namespace, "biometrics-data-backup", "create", "backups.velero.io", old)
    finally:
        core.delete_namespace(new)


def test_no_secret_in_ansible_output(kube_cluster, make_kube_namespace, tmp_path):
    namespace = make_kube_namespace("roles-s3")
    # Storage and one job are enough to see what Ansible prints about the credentials.
    values = seed_values(namespace=namespace, redis=None, data=None, **{"backup.git": None, "backup.pvc": None})
    values["backup"]["schedule"] = {"postgres": values["backup"]["schedule"]["postgres"]}
    values["backup"]["encryption"]["enabled"] = False
    values["backup"]["resources"] = {"enabled": False}
    values["backup"]["recoveryTest"] = {"enabled": False}
    # The PostgreSQL job in the restic format: its repository password comes from the vault too.
    values["backup"]["postgres"] = {"storageFormat": "restic"}
    secret = "s3-secret-value-that-must-not-leak"
    restic_password = "restic-password-that-must-not-leak"
    run = run_site(values, tmp_path, env=kube_cluster.env, args=("-vvv",),
                   extra_vars={"storage_s3_access_key": "AKIAEXAMPLEKEY", "storage_s3_secret_key": secret,
                               "storage_restic_password": restic_password})
    assert run.returncode == 0, run
    assert secret not in run.output and restic_password not in run.output

    def stored(name, key):
        return subprocess.run([kube_cluster.kubectl_bin, "--kubeconfig", kube_cluster.kubeconfig, "-n", namespace,
                               "get", "secret", name, "-o", "jsonpath={.data.%s}" % key],
                              capture_output=True, text=True, check=True).stdout

    assert stored("backup-s3-credentials", "secret_key")  # the credentials reached the Secret, only there
    assert base64.b64decode(stored("backup-restic-password", "password")).decode() == restic_password
    # Another password would lock every existing repository out: refused, the Secret kept.
    other = "another-restic-password"
    again = run_site(values, tmp_path, env=kube_cluster.env,
                     extra_vars={"storage_s3_access_key": "AKIAEXAMPLEKEY", "storage_s3_secret_key": secret,
                                 "storage_restic_password": other})
    assert again.returncode != 0 and "already holds a different restic password" in again.output, again
    assert other not in again.output and restic_password not in again.output
    assert base64.b64decode(stored("backup-restic-password", "password")).decode() == restic_password


def _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, state, kind="postgres", **job_vars):
    """storage + a kind role (postgres unless told) in a play of their own (no umbrella role): the job
    applies or removes itself."""
    playbook = tmp_path / ("standalone-%s-%d.yml" % (state, len(list(tmp_path.glob("standalone-*")))))
    playbook.write_text(yaml.safe_dump([{
        "name": "A kind role without the umbrella role",
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [
            {"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
             "vars": {"storage_namespace": namespace, "storage_encryption_enabled": False}},
            {"name": "The job", "ansible.builtin.include_role": {"name": "biometrics.backup." + kind},
             "vars": dict(job_vars, job_namespace=namespace, **{kind + "_state": state})},
        ]}]))
    process = subprocess.run(["ansible-playbook", str(playbook)], capture_output=True, text=True,
                             env=dict(kube_cluster.env, ANSIBLE_NOCOLOR="1"), timeout=600, check=False)
    return PlaybookRun(process)


def _network_policies(kube_api, namespace):
    networking = kubernetes.client.NetworkingV1Api(kube_api)
    return {p.metadata.name for p in networking.list_namespaced_network_policy(namespace).items}


def test_a_kind_role_on_its_own_applies_and_removes_its_job(kube_cluster, kube_api, make_kube_namespace, tmp_path):
    namespace = make_kube_namespace("roles-alone")
    egress = {"job_egress_policy": True, "job_egress_allow": [{"cidr": "10.0.0.0/8", "ports": [5432]}]}
    created = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "present", **egress)
    assert created.returncode == 0 and created.changed > 0, created
    assert "postgres-backup" in _cronjobs(kube_api, namespace)
    core = kubernetes.client.CoreV1Api(kube_api)
    assert "postgres-backup-config" in {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
    assert _network_policies(kube_api, namespace) == {"postgres-backup-egress"}

    # The policy turned off: the job stays, its policy goes.
    plain = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "present")
    assert plain.returncode == 0, plain
    assert "postgres-backup" in _cronjobs(kube_api, namespace)
    assert _network_policies(kube_api, namespace) == set()
    again = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "present", **egress)
    assert again.returncode == 0 and _network_policies(kube_api, namespace) == {"postgres-backup-egress"}, again

    # An offsite copy with retention: two CronJobs more, each with its ServiceAccount and policy.
    copies = {"postgres-backup-copy", "postgres-backup-copy-prune"}
    copied = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "present", job_copy=S3_COPY, **egress)
    assert copied.returncode == 0, copied
    assert set(_cronjobs(kube_api, namespace)) == {"postgres-backup"} | copies
    assert _network_policies(kube_api, namespace) == {job + "-egress" for job in {"postgres-backup"} | copies}
    # Its retention dropped, then the copy itself: what the copy no longer needs goes, each time
    # with the objects rendered with that CronJob (nothing of the copy kept running by itself).
    unpruned = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "present",
                                         job_copy={k: v for k, v in S3_COPY.items() if k != "retention"}, **egress)
    assert unpruned.returncode == 0, unpruned
    assert set(_cronjobs(kube_api, namespace)) == {"postgres-backup", "postgres-backup-copy"}
    assert "postgres-backup-copy-prune" not in {a.metadata.name for a in core.list_namespaced_service_account(namespace).items}
    uncopied = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "present", **egress)
    assert uncopied.returncode == 0, uncopied
    assert set(_cronjobs(kube_api, namespace)) == {"postgres-backup"}
    assert _network_policies(kube_api, namespace) == {"postgres-backup-egress"}
    assert not copies & {a.metadata.name for a in core.list_namespaced_service_account(namespace).items}

    # Removed while the play no longer asks for the policy: the policy recorded on the CronJob goes too.
    removed = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, "absent")
    assert removed.returncode == 0 and removed.changed > 0, removed
    assert "postgres-backup" not in _cronjobs(kube_api, namespace)
    assert "postgres-backup-config" not in {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
    assert "postgres-backup" not in {s.metadata.name for s in core.list_namespaced_service_account(namespace).items}
    assert _network_policies(kube_api, namespace) == set()


def test_the_volumes_role_on_its_own_moves_its_rbac_with_veleros_namespace(
        kube_cluster, kube_api, make_kube_namespace, tmp_path):
    """The job role on its own follows volumes_velero_namespace too, and keeps an old binding that
    also grants somebody else, with its Role: no longer the job's alone, not the job's to delete."""
    namespace = make_kube_namespace("roles-moved")
    first, second = make_kube_namespace("velero-a"), make_kube_namespace("velero-b")
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    job = "pvc-backup"

    def rbac_in(where):
        return ({r.metadata.name for r in rbac.list_namespaced_role(where).items},
                {b.metadata.name for b in rbac.list_namespaced_role_binding(where).items})

    def run(state, velero):
        result = _run_kind_role_on_its_own(kube_cluster, tmp_path, namespace, state, kind="volumes",
                                           volumes_velero_namespace=velero)
        assert result.returncode == 0, result
        return result

    def subjects(*namespaces):
        return [{"kind": "ServiceAccount", "name": job, "namespace": where} for where in namespaces]

    for velero in (first, second, first):
        run("present", velero)
        assert rbac_in(velero) == ({job}, {job})
    assert rbac_in(second) == (set(), set())
    # Somebody else bound too (a job of that name in another namespace): the move keeps both.
    rbac.patch_namespaced_role_binding(job, first, {"subjects": subjects(namespace, "team-b")})
    kept = run("present", second)
    assert rbac_in(second) == ({job}, {job})
    assert rbac_in(first) == ({job}, {job})
    for kind in ("Role", "RoleBinding"):  # and says so, once: the record no longer names them
        assert "Kept: %s/%s in namespace %s" % (kind, job, first) in kept.output, kept
    again = run("present", second)
    assert "Kept:" not in again.output and again.changed == 0, again
    run("absent", second)
    assert rbac_in(second) == (set(), set()) and job not in _cronjobs(kube_api, namespace)


def test_objects_a_job_no_longer_renders_are_removed(kube_cluster, kube_api, make_kube_namespace, tmp_path):
    """The egress policy and the lock check turned off: a job that stays keeps neither its
    NetworkPolicy nor its <job>-restic-locks Role and RoleBinding (before, both stayed until the job
    was removed, the policy still restricting the pods). Check mode only announces it."""
    namespace = make_kube_namespace("roles-left-behind")
    values = _restic_postgres_values(namespace)
    values["backup"]["networkPolicy"] = {"enabled": True, "egress": [{"cidr": "10.0.0.0/8", "ports": [5432]}]}
    secrets = {"storage_restic_password": "restic-" + uuid.uuid4().hex}
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    core = kubernetes.client.CoreV1Api(kube_api)

    def roles():
        return {r.metadata.name for r in rbac.list_namespaced_role(namespace).items}, \
            {b.metadata.name for b in rbac.list_namespaced_role_binding(namespace).items}

    first = run_site(values, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert first.returncode == 0, first
    jobs = set(_cronjobs(kube_api, namespace))
    assert {"postgres-backup", "postgres-backup-drill", "retention-prune"} <= jobs
    assert _network_policies(kube_api, namespace) == {job + "-egress" for job in jobs}
    locks = {"postgres-backup-restic-locks", "postgres-backup-drill-restic-locks", "retention-prune-restic-locks"}
    assert roles() == (locks, locks)

    plain = copy.deepcopy(values)
    plain["backup"]["networkPolicy"] = {"enabled": False}
    plain["storage"].setdefault("restic", {})["lockCheck"] = False
    preview = run_site(plain, tmp_path, env=kube_cluster.env, extra_vars=secrets, args=("--check",))
    assert preview.returncode == 0, preview
    assert "postgres-backup: NetworkPolicy/postgres-backup-egress" in preview.output, preview
    assert _network_policies(kube_api, namespace) == {job + "-egress" for job in jobs}
    assert roles() == (locks, locks)

    second = run_site(plain, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert second.returncode == 0, second
    assert set(_cronjobs(kube_api, namespace)) == jobs
    assert _network_policies(kube_api, namespace) == set()
    assert roles() == (set(), set())
    assert jobs <= {a.metadata.name for a in core.list_namespaced_service_account(namespace).items}
    # Nothing left to remove the next time.
    again = run_site(plain, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert again.returncode == 0 and again.changed == 0, again


def test_hardened_manifests_pass_the_api_servers_dry_run(kube_cluster, make_kube_namespace, tmp_path):
    """The egress NetworkPolicies, digest-pinned images and Secret volumes as the API server sees them.

    A server-side dry-run validates and admits the objects without creating them. The local
    cluster's bridge CNI does not enforce NetworkPolicy: this shows the policies are valid and
    select the jobs' pods, not that traffic is blocked.
    """
    from .test_roles_render import DIGEST, HARDENED  # pylint: disable=import-outside-toplevel

    namespace = make_kube_namespace("roles-hardened")
    out = tmp_path / "out"
    run = run_site(seed_values(namespace=namespace, **HARDENED), tmp_path, {"render_dir": str(out)})
    assert run.returncode == 0, run
    # The job objects in the test namespace (the Velero Role's namespace and the Prometheus
    # Operator's kinds are not there).
    wanted = [m for (kind, in_namespace, _name), m in load_rendered(out).items()
              if in_namespace == namespace and kind in ("NetworkPolicy", "CronJob", "ConfigMap", "ServiceAccount")]
    applied = kube_cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-",
                                   input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": wanted}),
                                   check=False)
    assert applied.returncode == 0, applied.stderr
    objects = json.loads(applied.stdout)["items"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    cronjobs = [o for o in objects if o["kind"] == "CronJob"]
    assert cronjobs and len(policies) == len(cronjobs)
    assert all(p["spec"]["policyTypes"] == ["Egress"] for p in policies)
    for cronjob in cronjobs:
        assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@" + DIGEST)


def _run_tasks(kube_cluster, tmp_path, name, tasks, args=()):
    """One play of role includes, run by ansible-playbook against the real API server."""
    playbook = tmp_path / (name + ".yml")
    playbook.write_text(yaml.safe_dump([{"name": name, "hosts": "localhost", "connection": "local",
                                         "gather_facts": False, "tasks": tasks}]))
    process = subprocess.run(["ansible-playbook", str(playbook), *args], capture_output=True, text=True,
                             env=dict(kube_cluster.env, ANSIBLE_NOCOLOR="1"), timeout=600, check=False)
    return PlaybookRun(process)


def _secret_keys_mounted(cronjob):
    """{(secret, key)} of the Secret volumes the CronJob's pods mount."""
    volumes = cronjob.spec.job_template.spec.template.spec.volumes or []
    return {(v.secret.secret_name, item.key) for v in volumes if v.secret for item in v.secret.items or []}


def test_retention_of_jobs_deployed_by_another_play(kube_cluster, kube_api, make_kube_namespace, tmp_path):
    """retention_jobs naming another play's jobs: their job files (ConfigMaps) say what to mount.

    A restic-format job deployed by one play is pruned by a retention job deployed by another:
    without the job's repository password mounted, every prune of it would fail.
    """
    namespace = make_kube_namespace("roles-other-play")
    storage = {"name": "Storage", "ansible.builtin.include_role": {"name": "biometrics.backup.storage"},
               "vars": {"storage_namespace": namespace, "storage_encryption_enabled": False}}
    password = "restic-password-" + uuid.uuid4().hex
    jobs = _run_tasks(kube_cluster, tmp_path, "jobs", [
        dict(storage, vars=dict(storage["vars"], storage_restic_password=password)),
        {"name": "PostgreSQL job in the restic format", "ansible.builtin.include_role": {"name": "biometrics.backup.postgres"},
         "vars": {"job_namespace": namespace, "job_storage_format_by_job": {"postgres-backup": "restic"}}},
        {"name": "Redis job in the archive format", "ansible.builtin.include_role": {"name": "biometrics.backup.redis"},
         "vars": {"job_namespace": namespace}},
        {"name": "Redis job whose retention requires its S3 copy", "ansible.builtin.include_role": {"name": "biometrics.backup.redis"},
         "vars": {"job_namespace": namespace, "redis_name": "redis-s3-copied", "job_copy": S3_COPY,
                  "job_retention": {"keep_daily": 7, "require_copy": True}}},
        {"name": "Redis job whose retention requires its copy on a claim", "ansible.builtin.include_role": {"name": "biometrics.backup.redis"},
         "vars": {"job_namespace": namespace, "redis_name": "redis-fs-copied", "job_copy": FS_COPY,
                  "job_retention": {"keep_daily": 7, "require_copy": True}}},
    ])
    assert jobs.returncode == 0, jobs

    def retention(names, play, args=(), storage_vars=None):
        return _run_tasks(kube_cluster, tmp_path, play, [
            dict(storage, vars=dict(storage["vars"], **(storage_vars or {}))),
            {"name": "Retention", "ansible.builtin.include_role": {"name": "biometrics.backup.retention"},
             "vars": {"job_namespace": namespace, "retention_jobs": names}},
        ], args=args)

    pruned = retention(["postgres-backup", "redis-backup", "redis-s3-copied"], "retention")
    assert pruned.returncode == 0, pruned
    assert password not in pruned.output
    cronjob = _cronjobs(kube_api, namespace)["retention-prune"]
    assert _secret_keys_mounted(cronjob) == {("backup-restic-password", "password"), ("offsite-s3", "access_key"),
                                             ("offsite-s3", "secret_key")}
    config = yaml.safe_load(kubernetes.client.CoreV1Api(kube_api).read_namespaced_config_map(
        "postgres-backup-config", namespace).data["job.yaml"])
    # The file the job reads its password from is where the retention pod finds it.
    assert config["storage"]["restic_password_file"] == "/etc/biometrics-backup/secrets/backup-restic-password/password"
    assert "--config" in cronjob.spec.job_template.spec.template.spec.containers[0].args
    # The pods that open the restic repository may read a pod (a lock's holder), nothing more.
    for account in ("retention-prune", "postgres-backup"):
        assert _can_i(kube_cluster, namespace, account, "get", "pods", namespace), account
        assert not _can_i(kube_cluster, namespace, account, "get", "jobs.batch", namespace), account
        assert not _can_i(kube_cluster, namespace, account, "list", "pods", namespace), account
        assert not _can_i(kube_cluster, namespace, account, "delete", "pods", namespace), account
    assert cronjob.spec.job_template.spec.template.spec.automount_service_account_token is True
    assert not _can_i(kube_cluster, namespace, "redis-backup", "get", "pods", namespace)

    # Idempotent: a second run changes nothing.
    again = retention(["postgres-backup", "redis-backup", "redis-s3-copied"], "retention-again")
    assert again.returncode == 0 and again.changed == 0, again

    # Only archive-format jobs: no password mounted.
    archive_only = retention(["redis-backup"], "retention-archive-only")
    assert archive_only.returncode == 0, archive_only
    assert not any(secret == "backup-restic-password"
                   for secret, _key in _secret_keys_mounted(_cronjobs(kube_api, namespace)["retention-prune"]))

    # A name that no play deployed fails before anything changes, naming it; so does a job of
    # another play whose copy is on a claim this play cannot know.
    before = _cronjobs(kube_api, namespace)["retention-prune"].metadata.resource_version
    on_claim = retention(["redis-backup", "redis-fs-copied"], "retention-claim")
    assert on_claim.returncode != 0, on_claim
    assert "retention_jobs names redis-fs-copied, deployed by another play" in on_claim.output, on_claim
    elsewhere = retention(["redis-backup"], "retention-elsewhere", storage_vars={"storage_mount_path": "/elsewhere"})
    assert elsewhere.returncode != 0, elsewhere
    assert "deployed by another play with a storage other than this play's" in elsewhere.output, elsewhere
    missing = retention(["redis-backup", "nosuch-backup"], "retention-missing")
    assert missing.returncode != 0, missing
    assert "job nosuch-backup: ConfigMap %s/nosuch-backup-config" % namespace in missing.output, missing
    assert "does not exist" in missing.output and "Traceback" not in missing.output
    assert _cronjobs(kube_api, namespace)["retention-prune"].metadata.resource_version == before
    # In check mode an earlier play of the same run may be about to create it: said, not refused.
    preview = retention(["redis-backup", "nosuch-backup"], "retention-missing-preview", args=("--check",))
    assert preview.returncode == 0, preview
    assert "Not read (check mode: no ConfigMap with a job.yaml yet): nosuch-backup" in preview.output, preview
    assert _cronjobs(kube_api, namespace)["retention-prune"].metadata.resource_version == before


def _restic_postgres_values(namespace):
    """The seed's values cut down to its PostgreSQL job (with its drill and retention), in the restic format."""
    values = seed_values(namespace=namespace, redis=None, data=None, **{"backup.git": None, "backup.pvc": None,
                                                                        "storage.backend": "pvc"})
    values["backup"]["schedule"] = {"postgres": values["backup"]["schedule"]["postgres"]}
    values["backup"]["encryption"]["enabled"] = False
    values["backup"]["resources"] = {"enabled": False}
    values["backup"]["postgres"] = {"storageFormat": "restic"}
    return values


def test_a_copy_turned_off_goes_with_what_it_recorded_announced_once_in_check_mode(
        kube_cluster, kube_api, make_kube_namespace, tmp_path):
    """backup.offsite dropped from the values: the copy's CronJobs go with the objects they
    recorded. Check mode announces each once (before, the removal of jobs no longer in the
    values announced the copy's objects a second time)."""
    namespace = make_kube_namespace("roles-copy-off")
    values = _restic_postgres_values(namespace)
    values["backup"]["offsite"] = {
        "schedule": "30 4 * * *", "credentialsSecret": "offsite-s3", "retention": {"monthly": 12, "minKeep": 2},
        "storage": {"backend": "s3", "s3": {"bucket": "biometrics-offsite", "endpoint": "https://s3.site-b.example",
                                            "region": "eu-north-1", "prefix": "biometrics/"}}}
    secrets = {"storage_restic_password": "restic-" + uuid.uuid4().hex}
    copies = {"postgres-backup-copy", "postgres-backup-copy-prune"}
    core = kubernetes.client.CoreV1Api(kube_api)

    def labelled_copies():
        selector = "backup.biometrics.io/job in (%s)" % ",".join(sorted(copies))
        return (set(_cronjobs(kube_api, namespace)) & copies,
                {a.metadata.name for a in core.list_namespaced_service_account(namespace, label_selector=selector).items})

    first = run_site(values, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert first.returncode == 0, first
    assert labelled_copies() == (copies, copies)

    without = copy.deepcopy(values)
    del without["backup"]["offsite"]
    preview = run_site(without, tmp_path, env=kube_cluster.env, extra_vars=secrets, args=("--check",))
    assert preview.returncode == 0, preview
    announced = [line for line in preview.output.splitlines() if line.startswith("changed:") and "-copy" in line]
    for name in copies:
        assert sum("(item=postgres-backup: CronJob/%s)" % name in line for line in announced) == 1, announced
        # The label of the task that removes jobs no longer in the values: "<job> <Kind>".
        assert not [line for line in announced if "(item=%s " % name in line], announced
    assert labelled_copies() == (copies, copies)

    second = run_site(without, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert second.returncode == 0, second
    assert labelled_copies() == (set(), set())
    # Removed as objects left behind; the sweep of jobs no longer in the values found nothing.
    removed = [line for line in second.output.splitlines() if line.startswith("changed:") and "-copy" in line]
    for name in copies:
        assert any("(item=postgres-backup: CronJob/%s)" % name in line for line in removed), removed
        assert not [line for line in removed if "(item=%s " % name in line], removed
    assert "postgres-backup" in _cronjobs(kube_api, namespace)
    again = run_site(without, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert again.returncode == 0 and again.changed == 0, again


def test_a_job_moved_back_from_restic_keeps_reading_its_restic_backups(kube_cluster, kube_api,
                                                                       make_kube_namespace, tmp_path):
    """A job moved from the restic format back to archives still has restic backups: its job file
    keeps the repository password (and its pod and the retention pod mount it), so that prune,
    verify and restore read them; before, the retention job failed on them every night."""
    namespace = make_kube_namespace("roles-move-back")
    values = _restic_postgres_values(namespace)
    secrets = {"storage_restic_password": "restic-" + uuid.uuid4().hex}
    core = kubernetes.client.CoreV1Api(kube_api)

    def job_file(name):
        return yaml.safe_load(core.read_namespaced_config_map(name + "-config", namespace).data["job.yaml"])

    def password_mounted(name):
        return ("backup-restic-password", "password") in _secret_keys_mounted(_cronjobs(kube_api, namespace)[name])

    stored = run_site(values, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert stored.returncode == 0, stored
    assert job_file("postgres-backup")["storage"]["format"] == "restic"
    archive = copy.deepcopy(values)
    archive["backup"]["postgres"] = {"storageFormat": "archive"}
    for attempt in ("moved back", "deployed again"):   # and it stays so on the next deploy
        moved = run_site(archive, tmp_path, env=kube_cluster.env, extra_vars=secrets)
        assert moved.returncode == 0, (attempt, moved)
        storage = job_file("postgres-backup")["storage"]
        assert storage.get("format", "archive") == "archive", attempt
        assert storage["restic_password_file"] == "/etc/biometrics-backup/secrets/backup-restic-password/password"
        assert password_mounted("postgres-backup") and password_mounted("retention-prune"), attempt
        assert password_mounted("postgres-backup-drill"), attempt
    # The section-wide offsite copy includes it (both formats are copied), and the copy's pod reads the password.
    copied = copy.deepcopy(archive)
    copied["backup"]["offsite"] = dict(OFFSITE, jobs={})
    section = run_site(copied, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert section.returncode == 0, section
    assert "postgres-backup-copy" in _cronjobs(kube_api, namespace)
    assert password_mounted("postgres-backup-copy"), section
    # A job that never had the format gets neither.
    never = copy.deepcopy(archive)
    never["namespace"] = make_kube_namespace("roles-never-restic")
    fresh = run_site(never, tmp_path, env=kube_cluster.env, extra_vars=secrets)
    assert fresh.returncode == 0, fresh
    plain = yaml.safe_load(core.read_namespaced_config_map("postgres-backup-config", never["namespace"]).data["job.yaml"])
    assert "restic_password_file" not in plain["storage"]
