#!/usr/bin/env python
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The demo behind `make demo` (started by hack/demo.sh, which owns the cluster).

On the local Kubernetes cluster named by K8S_AUTH_KUBECONFIG (control plane and one node:
containerd + kubelet, the runner image imported into it), with real PostgreSQL, Redis,
SeaweedFS S3 and git daemon servers started here on the node IP so that pods reach them
(tests/servers.py, the same code as the test fixtures), it:

1. creates demo data: a PostgreSQL database with tables, Redis keys, a data directory, a
   bare git repository served by git daemon and the application's configuration ConfigMap;
2. makes an age key pair with `age-keygen` and stores it, with the S3 credentials, in Secrets;
   backs the claims the CronJobs mount (biometrics-data, backup-storage) with hostPath
   PersistentVolumes of directories here;
3. deploys the seed's values (playbooks/values/seed.yml, pointed at the servers) with
   playbooks/site.yml;
4. takes real backups by running each deployed CronJob as a pod, the way an operator runs
   one outside its schedule (`kubectl create job --from=cronjob/NAME`, tests/pod_jobs.py),
   three times, with data changes in between, so the file job makes incrementals;
5. applies retention by running the retention CronJob the same way;
6. restores the newest PostgreSQL and file backups with biometrics.backup.backup_restore
   (demo/restore.yml) and compares the results with the live data independently;
7. runs the weekly recovery drill CronJobs as pods;
8. prints a summary. Every number in it comes from this run, including the seconds each Job
   took from `kubectl create job` to Complete.

Everything started here is stopped at the end, on failure too.
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS_DIR = os.path.join(REPO_ROOT, "build", "collections")
for _path in (COLLECTIONS_DIR, os.path.join(REPO_ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import servers  # noqa: E402  pylint: disable=wrong-import-position
from pod_jobs import create_seed_inputs, hostpath_claim, run_cronjob_now  # noqa: E402  pylint: disable=wrong-import-position

NAMESPACE = "biometrics-demo"
MANAGED = "app.kubernetes.io/managed-by=biometrics.backup"
SEED_VALUES = os.path.join(REPO_ROOT, "playbooks", "values", "seed.yml")
SITE = os.path.join(REPO_ROOT, "playbooks", "site.yml")
RESTORE_PLAYBOOK = os.path.join(REPO_ROOT, "demo", "restore.yml")
SKIP_KINDS = {"velero": "needs a Velero server in the cluster; the demo runs none (the integration tests do)"}
STEPS = 9  # numbered steps; the summary follows them
# A Job normally completes in a few seconds; this bounds a stuck one (image missing, pod pending).
JOB_TIMEOUT = 300
# What the demo's data takes at most on the hostPath volumes (the claims' requested size).
CLAIM_CAPACITY = "1Gi"


class DemoError(Exception):
    """A step failed; the message says which and why."""


# -- output ------------------------------------------------------------------------------

class Console:
    def __init__(self):
        self.started = time.monotonic()
        self.step_number = 0
        self.step_started = None

    def elapsed(self):
        return time.monotonic() - self.started

    def step(self, title):
        self.finish_step()
        self.step_number += 1
        self.step_started = time.monotonic()
        self.say("")
        self.say("[%d/%d] %s" % (self.step_number, STEPS, title))

    def finish_step(self):
        if self.step_started is not None:
            self.say("      (%.1fs)" % (time.monotonic() - self.step_started))
            self.step_started = None

    @staticmethod
    def say(text=""):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def item(self, text):
        self.say("      " + text)


def human_bytes(count):
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024.0
    return "%d B" % count


def shown(path):
    """``path`` relative to the checkout when it lies inside it, else absolute (BIOMETRICS_DEMO_DIR
    may be anywhere; ``../../..`` chains help no one)."""
    relative = os.path.relpath(path, REPO_ROOT)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def run(argv, env=None, cwd=None, timeout=600):
    """A command whose failure stops the demo; returns stdout (text)."""
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout)[-3000:]
        raise DemoError("%s failed (exit %d):\n%s" % (" ".join(argv[:3]), result.returncode, output))
    return result.stdout


# -- servers -----------------------------------------------------------------------------

def api_client(kubeconfig):
    """A ``kubernetes.client.ApiClient`` for ``kubeconfig``."""
    import kubernetes  # pylint: disable=import-outside-toplevel
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def start_servers(stack, console, host):
    """PostgreSQL, Redis, SeaweedFS S3 and git daemon listening on ``host`` (the node IP)."""
    started = {}
    for name, prefix, start, stop in (
            ("PostgreSQL", "postgres", servers.start_postgres, lambda s: s.process.stop()),
            ("Redis", "redis", servers.start_redis, lambda s: s.process.stop()),
            ("SeaweedFS S3", "s3", servers.start_s3, servers.stop_s3),
            ("git daemon", "git", servers.start_git_daemon, lambda s: s.process.stop())):
        began = time.monotonic()
        base = stack.enter_context(servers.server_dir("demo-" + prefix))
        server = servers.start_with_port_retry(lambda start=start, base=base: start(base, host=host))
        stack.callback(stop, server)
        started[prefix] = server
        where = getattr(server, "endpoint_url", None) or "%s:%d" % (server.host, server.port)
        console.item("%-13s %s (ready in %.1fs)" % (name, where, time.monotonic() - began))
    return started["postgres"], started["redis"], started["s3"], started["git"]


# -- demo data ---------------------------------------------------------------------------

PG_SCHEMA = """
CREATE TABLE subjects (id bigint PRIMARY KEY, external_ref text NOT NULL UNIQUE,
                       enrolled_at timestamptz NOT NULL);
CREATE TABLE templates (id bigint PRIMARY KEY, subject_id bigint NOT NULL REFERENCES subjects(id),
                        modality text NOT NULL, quality smallint NOT NULL, template bytea NOT NULL);
CREATE TABLE audit_log (id bigserial PRIMARY KEY, at timestamptz NOT NULL, subject_id bigint,
                        action text NOT NULL);
CREATE INDEX templates_subject ON templates(subject_id);
"""


def pg_add_subjects(conn, first, count):
    """``count`` subjects from id ``first`` on, three templates each, and audit rows."""
    last = first + count - 1
    conn.execute("INSERT INTO subjects SELECT i, 'S-' || lpad(i::text, 7, '0'), "
                 "timestamptz '2024-01-01' + i * interval '17 minutes' FROM generate_series(%s::int, %s::int) i",
                 (first, last))
    conn.execute("INSERT INTO templates SELECT s * 3 + m, s, (ARRAY['face','finger','iris'])[m + 1], "
                 "(s * 7 + m) %% 100, decode(repeat(md5(s::text || ':' || m::text), 16), 'hex') "
                 "FROM generate_series(%s::int, %s::int) s, generate_series(0, 2) m", (first, last))
    conn.execute("INSERT INTO audit_log (at, subject_id, action) SELECT now(), s, 'enrolled' "
                 "FROM generate_series(%s::int, %s::int) s", (first, last))


def pg_table_facts(postgres, dbname):
    """{table: (rows, md5 of every row in primary-key order)} read straight from the server."""
    facts = {}
    with postgres.connect(dbname) as conn:
        for table in ("subjects", "templates", "audit_log"):
            rows, digest = conn.execute(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM %s t" % table
            ).fetchone()
            facts[table] = (rows, digest)
    return facts


def redis_add_keys(client, start, count):
    pipe = client.pipeline(transaction=False)
    for number in range(start, start + count):
        pipe.hset("subject:%d" % number, mapping={"ref": "S-%07d" % number, "state": "enrolled"})
        pipe.set("session:%d" % number, os.urandom(24).hex(), ex=86400)
        pipe.rpush("queue:matching", number)
    pipe.sadd("modalities", "face", "finger", "iris")
    pipe.execute()


def write_data_tree(root, rng, files, round_number):
    """Images (random bytes), JSON records and a small config tree below ``root``."""
    for index in range(files):
        folder = os.path.join(root, "captures", "2024-%02d" % (index % 12 + 1))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "capture-%04d.bin" % index), "wb") as handle:
            handle.write(rng.randbytes(rng.randint(4096, 65536)))
        records = os.path.join(root, "records")
        os.makedirs(records, exist_ok=True)
        with open(os.path.join(records, "subject-%04d.json" % index), "w", encoding="utf-8") as handle:
            json.dump({"id": index, "round": round_number, "quality": rng.randint(1, 100)}, handle)
    os.makedirs(os.path.join(root, "conf"), exist_ok=True)
    with open(os.path.join(root, "conf", "matcher.ini"), "w", encoding="utf-8") as handle:
        handle.write("[matcher]\nthreshold = 0.82\n")


def tree_digest(root):
    """{relative path: (mode, sha256)} of every file and directory below ``root``."""
    result = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(dirs):
            path = os.path.join(folder, name)
            result[os.path.relpath(path, root)] = (oct(os.lstat(path).st_mode), None)
        for name in sorted(names):
            path = os.path.join(folder, name)
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
            result[os.path.relpath(path, root)] = (oct(os.lstat(path).st_mode), digest.hexdigest())
    return result


# -- Kubernetes objects ------------------------------------------------------------------

def kube(api):
    import kubernetes  # pylint: disable=import-outside-toplevel
    return kubernetes.client.CoreV1Api(api), kubernetes.client


def prepare_cluster(api, s3, identity_path, config_files):
    core, client = kube(api)
    for name, labels in ((NAMESPACE, {"pod-security.kubernetes.io/enforce": "restricted"}), ("velero", {})):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    recipient = run(["age-keygen", "-y", identity_path]).strip()
    with open(identity_path, "r", encoding="utf-8") as handle:
        identity = handle.read()
    create_seed_inputs(api, NAMESPACE, recipient, identity, s3.access_key, s3.secret_key, config_files)
    return recipient


def update_config_map(api, data):
    core, client = kube(api)
    core.patch_namespaced_config_map("biometrics-config", NAMESPACE, client.V1ConfigMap(data=data))


def demo_values(postgres, redis, s3, git_url):
    """The seed's values with the hosts, ports and S3 endpoint of this machine."""
    with open(SEED_VALUES, "r", encoding="utf-8") as handle:
        values = yaml.safe_load(handle)
    changes = {
        "namespace": NAMESPACE,
        "storage.s3.bucket": s3.bucket,
        "storage.s3.endpoint": s3.endpoint_url,
        "storage.s3.region": s3.region,
        "database.host": postgres.host,
        "database.port": postgres.port,
        "redis.host": redis.host,
        "redis.port": redis.port,
        "backup.git.repo": git_url,
    }
    for dotted, value in changes.items():
        node = values
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return values, changes


def ansible_env(kubeconfig):
    env = dict(os.environ)
    env.update(
        K8S_AUTH_KUBECONFIG=kubeconfig,
        ANSIBLE_COLLECTIONS_PATH=os.pathsep.join([COLLECTIONS_DIR, sysconfig.get_paths()["purelib"]]),
        PYTHONPATH=os.pathsep.join([COLLECTIONS_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
        ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    env.pop("KUBECONFIG", None)
    return env


def playbook(console, argv, env, log_path, what):
    """ansible-playbook with a progress line every few seconds; returns (ok, changed) from the recap."""
    began = time.monotonic()
    last_report = began
    tasks = 0
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ansible-playbook")] + argv, env=env,
                                   cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        recap = None
        for line in process.stdout:
            log.write(line)
            if line.startswith("TASK ["):
                tasks += 1
            if line.startswith("localhost") and "ok=" in line:
                recap = dict(part.split("=") for part in line.split(":", 1)[1].split())
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                console.item("... %s: %d tasks so far (%.0fs)" % (what, tasks, last_report - began))
        code = process.wait()
    if code != 0 or recap is None:
        with open(log_path, "r", encoding="utf-8") as handle:
            tail = handle.read()[-4000:]
        raise DemoError("ansible-playbook (%s) failed with exit %d; log %s:\n%s" % (what, code, log_path, tail))
    return int(recap["ok"]), int(recap["changed"])


# -- running CronJobs --------------------------------------------------------------------

def deployed_cronjobs(api):
    import kubernetes  # pylint: disable=import-outside-toplevel
    batch = kubernetes.client.BatchV1Api(api)
    found = {}
    for cronjob in batch.list_namespaced_cron_job(NAMESPACE, label_selector=MANAGED).items:
        container = cronjob.spec.job_template.spec.template.spec.containers[0]
        found[cronjob.metadata.name] = {
            "kind": cronjob.metadata.labels.get("app.kubernetes.io/component"),
            "command": (container.args or ["?"])[0],
            "schedule": cronjob.spec.schedule,
            "service_account": cronjob.spec.job_template.spec.template.spec.service_account_name,
        }
    return found


def run_cronjob(kubeconfig, api, name, logs_dir, label, job_times):
    """Run the CronJob as a pod (``kubectl create job --from=cronjob/NAME``) and wait for it.

    Returns the JobRun (``succeeded``, ``result``: the runner's JSON result, ``seconds``: from
    create to Complete/Failed). The pod's log goes to ``logs_dir``; ``job_times`` collects the seconds.
    """
    try:
        job = run_cronjob_now(kubeconfig, api, NAMESPACE, name, timeout=JOB_TIMEOUT,
                              job_name="%s-%s" % (name[:50], label))
    except (RuntimeError, TimeoutError) as exc:
        raise DemoError("CronJob %s did not run as a pod: %s" % (name, exc)) from None
    with open(os.path.join(logs_dir, "%s.%s.log" % (name, label)), "w", encoding="utf-8") as handle:
        handle.write(job.describe() + "\n--- full pod log:\n" + job.log)
    job_times.append((job.name, job.seconds, job.succeeded))
    return job


def failure(console, job):
    """What a failed Job left behind, for the person reading the demo's output."""
    for line in job.describe().splitlines():
        console.item("| " + line)


def describe_backup(kind, result):
    stats = result.get("stats") or {}
    if kind == "postgres":
        return "%d tables, %s rows" % (stats.get("table_count", 0), format(stats.get("total_rows", 0), ","))
    if kind == "redis":
        return "%s keys" % format(stats.get("total_keys", 0), ",")
    if kind == "files":
        text = "%s, %s files, %s" % (stats.get("type", "?"), format(stats.get("files", 0), ","),
                                     human_bytes(stats.get("bytes")))
        if stats.get("type") == "incremental":
            text += "; %d changed, %d deleted since %s" % (stats.get("archive_entries", 0), stats.get("deleted", 0),
                                                           result.get("parent"))
        return text
    if kind == "config_git":
        return "commit %s (%s; %d files)" % (str(stats.get("commit", ""))[:12],
                                             "new commit pushed" if stats.get("changed") else "unchanged",
                                             stats.get("files", 0))
    if kind == "directory_sync":
        return "mirror of %s files, %d transferred, %d deleted" % (
            format(stats.get("regular_files", stats.get("files", 0)), ","), stats.get("transferred", 0),
            stats.get("deleted", 0))
    if kind == "k8s_resources":
        count = stats.get("objects") or stats.get("total_objects") or stats.get("count")
        return "%s objects" % count if count is not None else ", ".join("%s=%s" % item for item in sorted(stats.items())[:4])
    return ""


def backup_round(console, kubeconfig, api, cronjobs, logs_dir, label, known_kinds, taken, job_times):
    for name, info in sorted(cronjobs.items()):
        if info["command"] != "backup":
            continue
        kind = info["kind"]
        if kind in SKIP_KINDS:
            taken.setdefault(name, {"kind": kind, "skipped": SKIP_KINDS[kind], "backups": []})
            continue
        if kind not in known_kinds:
            taken.setdefault(name, {"kind": kind, "backups": [],
                                    "skipped": "the runner in this checkout has no %r kind" % kind})
            continue
        job = run_cronjob(kubeconfig, api, name, logs_dir, label, job_times)
        result = job.result
        if not job.succeeded or not isinstance(result, dict):
            failure(console, job)
            raise DemoError("Job %s (from CronJob %s) %s; pod log in %s" % (
                job.name, name, "failed" if not job.succeeded else "printed no result", shown(logs_dir)))
        record = taken.setdefault(name, {"kind": kind, "backups": []})
        record["backups"].append(result)
        console.item("%-24s %-15s %s  %9s stored  pod %5.1fs  %s" % (
            name, kind, result["backup_id"], human_bytes(result["size_bytes"]), job.seconds,
            describe_backup(kind, result)))


# -- the demo ----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(REPO_ROOT, "build", "demo", "run"),
                        help="demo data, logs and keys (wiped first)")
    args = parser.parse_args()
    kubeconfig = os.environ.get("K8S_AUTH_KUBECONFIG")
    if not kubeconfig:
        raise DemoError("K8S_AUTH_KUBECONFIG is not set: run the demo with `make demo` (hack/demo.sh)")
    node_ip = os.environ.get("BIOMETRICS_NODE_IP")
    if not node_ip:
        raise DemoError("BIOMETRICS_NODE_IP is not set: the cluster has no node; run the demo with `make demo` (hack/demo.sh)")
    console = Console()
    # The venv's tools (ansible-playbook, weed) for this process and every command it runs.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("data", "sync", "keys", "logs", "restored"):
        os.makedirs(os.path.join(work, sub), mode=0o700)
    data_dir, sync_dir, logs_dir = (os.path.join(work, sub) for sub in ("data", "sync", "logs"))
    api = api_client(kubeconfig)
    job_times = []
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds  # pylint: disable=import-outside-toplevel
    known_kinds = set(kinds.known_kinds())

    with contextlib.ExitStack() as stack:
        console.step("Starting PostgreSQL 15, Redis, SeaweedFS S3 and git daemon on the node IP %s" % node_ip)
        postgres, redis, s3, git = start_servers(stack, console, node_ip)

        console.step("Creating demo data, an age key pair and the Secrets")
        with postgres.connect() as conn:
            conn.execute("CREATE DATABASE biometrics")
        with postgres.connect("biometrics") as conn:
            conn.execute(PG_SCHEMA)
            pg_add_subjects(conn, 1, 4000)
        client = redis.client()
        redis_add_keys(client, 1, 1500)
        rng = random.Random(20240601)
        write_data_tree(data_dir, rng, 120, 1)
        git_remote = git.make_remote()
        identity_path = os.path.join(work, "keys", "identity.txt")
        run(["age-keygen", "-o", identity_path])
        config_files = {"matcher.yaml": "threshold: 0.82\nmodalities: [face, finger, iris]\n",
                        "retention.yaml": "raw_captures_days: 90\n"}
        recipient = prepare_cluster(api, s3, identity_path, config_files)
        # What a storage provisioner would do: the claims the CronJobs mount, backed here by
        # directories of this machine (the pods run as the runner image's uid 65532).
        hostpath_claim(api, NAMESPACE, "biometrics-data", data_dir, CLAIM_CAPACITY, writable=False)
        hostpath_claim(api, NAMESPACE, "backup-storage", sync_dir, CLAIM_CAPACITY, writable=True)
        facts = pg_table_facts(postgres, "biometrics")
        console.item("PostgreSQL database biometrics: %s" % ", ".join(
            "%s %s rows" % (table, format(rows, ",")) for table, (rows, _digest) in facts.items()))
        console.item("Redis: %s keys" % format(client.dbsize(), ","))
        console.item("data directory: %d files, %s" % (
            sum(len(names) for _d, _s, names in os.walk(data_dir)),
            human_bytes(sum(os.path.getsize(os.path.join(d, n)) for d, _s, names in os.walk(data_dir) for n in names))))
        console.item("age recipient %s...; Secrets backup-encryption-key, backup-s3-credentials "
                     "in namespace %s (Pod Security: restricted)" % (recipient[:20], NAMESPACE))
        console.item("claims biometrics-data (read by the pods) -> %s, backup-storage -> %s (hostPath volumes)"
                     % (shown(data_dir), shown(sync_dir)))
        console.item("git remote for the config job: %s" % git_remote.url)

        console.step("Deploying the seed's values with the roles (playbooks/site.yml)")
        values, changes = demo_values(postgres, redis, s3, git_remote.url)
        values_path = os.path.join(work, "values.yml")
        with open(values_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(values, handle, sort_keys=False)
        console.item("playbooks/values/seed.yml with: " + ", ".join("%s=%s" % item for item in changes.items()))
        env = ansible_env(kubeconfig)
        ok, changed = playbook(console, [SITE, "-e", json.dumps({"values_file": values_path})], env,
                               os.path.join(logs_dir, "deploy.log"), "deploy")
        cronjobs = deployed_cronjobs(api)
        console.item("ansible-playbook: ok=%d changed=%d; %d CronJobs:" % (ok, changed, len(cronjobs)))
        for name, info in sorted(cronjobs.items()):
            console.item("  %-26s %-8s %-14s schedule %s" % (name, info["command"], info["kind"], info["schedule"]))

        console.step("Backups: each backup CronJob run as a pod (kubectl create job --from=cronjob/NAME)")
        taken = {}
        backup_round(console, kubeconfig, api, cronjobs, logs_dir, "1", known_kinds, taken, job_times)

        def change_data(subjects_from, subjects, keys_from, keys, rewrite, seed, config_edit):
            tables_before, tree_before, keys_before = (pg_table_facts(postgres, "biometrics"), tree_digest(data_dir),
                                                       client.dbsize())
            with postgres.connect("biometrics") as conn:
                pg_add_subjects(conn, subjects_from, subjects)
                conn.execute("UPDATE subjects SET external_ref = external_ref || '-R' WHERE id %% %d = 0" % seed)
            redis_add_keys(client, keys_from, keys)
            client.delete(*["session:%d" % number for number in range(seed, seed + 100)])
            write_data_tree(data_dir, random.Random(seed), rewrite, seed)
            if config_edit:
                os.remove(os.path.join(data_dir, "records", "subject-0119.json"))
                update_config_map(api, dict(config_files, **config_edit))
            tables_after, tree_after = pg_table_facts(postgres, "biometrics"), tree_digest(data_dir)
            console.item("PostgreSQL rows: %s" % ", ".join("%s %s -> %s" % (
                table, format(tables_before[table][0], ","), format(rows, ",")) for table, (rows, _d) in tables_after.items()))
            console.item("Redis keys: %s -> %s; data directory: %d files changed, %d deleted; ConfigMap "
                         "biometrics-config: %s" % (
                             format(keys_before, ","), format(client.dbsize(), ","),
                             sum(1 for path, entry in tree_after.items() if entry[1] and tree_before.get(path, entry) != entry),
                             len(set(tree_before) - set(tree_after)), ", ".join(config_edit) + " edited" if config_edit else "unchanged"))

        console.step("Changing the data, then the second round of backups")
        change_data(4001, 500, 1501, 300, 10, 97, {"matcher.yaml": "threshold: 0.85\nmodalities: [face, finger, iris]\n"})
        backup_round(console, kubeconfig, api, cronjobs, logs_dir, "2", known_kinds, taken, job_times)

        console.step("Changing the data again, then the third round (the next schedule tick)")
        change_data(4501, 100, 1801, 50, 3, 89, None)
        backup_round(console, kubeconfig, api, cronjobs, logs_dir, "3", known_kinds, taken, job_times)

        console.step("Retention: the retention-prune CronJob run as a pod")
        retention = [name for name, info in cronjobs.items() if info["command"] == "prune"]
        pruned = {}
        for name in retention:
            job = run_cronjob(kubeconfig, api, name, logs_dir, "now", job_times)
            result = job.result
            results = result if isinstance(result, list) else [result]
            for item in results:
                if isinstance(item, dict) and item.get("job"):
                    pruned[item["job"]] = item
            console.item("Job %s: %s in %.1fs (create -> %s)" % (
                job.name, "pruned per job" if job.succeeded else "FAILED", job.seconds,
                "Complete" if job.succeeded else "Failed"))
            if not job.succeeded:
                failure(console, job)
                if not pruned:
                    raise DemoError("retention CronJob %s failed; pod log in %s" % (name, shown(logs_dir)))
        policy = None
        for job, item in sorted(pruned.items()):
            policy = policy or item.get("policy")
            counts = item["counts"]
            if counts["backups"]:
                console.item("%-24s %d backups: kept %d, pruned %d (%d deleted from S3)" % (
                    job, counts["backups"], counts["kept"], counts["pruned"], len(item.get("deleted") or [])))

        console.step("Verified restore with biometrics.backup.backup_restore (demo/restore.yml)")
        restored_dir = os.path.join(work, "restored", "data")
        restore_vars = {
            "demo_storage": {"backend": "s3", "bucket": s3.bucket, "prefix": values["storage"]["s3"]["prefix"],
                             "endpoint_url": s3.endpoint_url, "region": s3.region,
                             "access_key_file": write_secret(work, "s3-access-key", s3.access_key),
                             "secret_key_file": write_secret(work, "s3-secret-key", s3.secret_key)},
            "demo_identity_file": identity_path,
            "demo_postgres": {"host": postgres.host, "port": postgres.port, "user": postgres.user,
                              "database": "biometrics", "restore_database": "biometrics_restored"},
            "demo_files_path": restored_dir,
            "demo_result_file": os.path.join(work, "restore-result.json"),
        }
        vars_path = os.path.join(work, "restore-vars.yml")
        with open(vars_path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(restore_vars, handle)
        playbook(console, [RESTORE_PLAYBOOK, "-e", "@" + vars_path], env, os.path.join(logs_dir, "restore.log"), "restore")
        with open(restore_vars["demo_result_file"], "r", encoding="utf-8") as handle:
            restored = json.load(handle)
        pg_result, files_result = restored["postgres"], restored["files"]
        live, copy = pg_table_facts(postgres, "biometrics"), pg_table_facts(postgres, "biometrics_restored")
        pg_same = live == copy
        live_tree, restored_tree = tree_digest(data_dir), tree_digest(restored_dir)
        files_same = live_tree == restored_tree
        for label, result in (("postgres-backup", pg_result), ("incremental-backup", files_result)):
            checks = result.get("checks") or []
            console.item("%s: backup %s (chain %s): %d objects verified before writing, %d/%d checks passed" % (
                label, result["backup_id"], " -> ".join(result.get("chain") or [result["backup_id"]]),
                result["verification"]["objects"], sum(1 for c in checks if c.get("ok")), len(checks)))
        console.item("independent check, database biometrics_restored vs biometrics: %s" % (
            "row counts and md5 of every row EQUAL" if pg_same else "DIFFERENT: %r vs %r" % (copy, live)))
        console.item("independent check, %s vs the data directory: %s" % (
            shown(restored_dir),
            "%d entries, modes and SHA-256 EQUAL" % len(live_tree) if files_same else "DIFFERENT"))
        if not (pg_same and files_same):
            raise DemoError("a restored copy differs from the live data")

        console.step("Recovery drills: the weekly drill CronJobs run as pods")
        drills = {}
        for name, info in sorted(cronjobs.items()):
            if info["command"] != "drill":
                continue
            job = run_cronjob(kubeconfig, api, name, logs_dir, "now", job_times)
            result = job.result if isinstance(job.result, dict) else {}
            first = (result.get("results") or [{}])[0]
            passed = job.succeeded and bool(result.get("ok"))
            drills[name] = (passed, first, job.seconds)
            console.item("%-26s %s: backup %s restored into a scratch target and checked (pod %.1fs)" % (
                name, "PASSED" if passed else "FAILED", first.get("id"), job.seconds))
            if not passed:
                failure(console, job)
        if not all(passed for passed, _first, _seconds in drills.values()):
            raise DemoError("a recovery drill failed; pod logs in %s" % shown(logs_dir))

        console.finish_step()
        summary(console, s3, values, taken, pruned, policy, pg_result, files_result, pg_same, files_same, drills)
        job_summary(console, job_times)
        console.say("")
        console.say("Demo finished in %.0fs. Logs, keys and data: %s (stopping the servers now)"
                    % (console.elapsed(), shown(work)))


def write_secret(work, name, value):
    path = os.path.join(work, "keys", name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        handle.write(value)
    return path


def summary(console, s3, values, taken, pruned, policy, pg_result, files_result, pg_same, files_same, drills):
    say = console.say
    seed = values["backup"]
    say("")
    say("What was backed up  (S3 %s/%s%s, age-encrypted, %s)" % (
        s3.endpoint_url, s3.bucket, "/" + values["storage"]["s3"]["prefix"].strip("/"),
        seed["compression"]["algorithm"] if seed["compression"]["enabled"] else "uncompressed"))
    for name, record in sorted(taken.items()):
        if record.get("skipped"):
            say("  %-24s %-15s not run: %s" % (name, record["kind"], record["skipped"]))
            continue
        sizes = " + ".join(human_bytes(b["size_bytes"]) for b in record["backups"])
        say("  %-24s %-15s %d backups, stored %s; latest: %s" % (
            name, record["kind"], len(record["backups"]), sizes, describe_backup(record["kind"], record["backups"][-1])))
    say("")
    say("What retention kept and why  (seed policy: %s)" % ", ".join(
        "%s=%s" % (key, value) for key, value in sorted((policy or {}).items()) if value not in (None, 0, "")))
    for job, item in sorted(pruned.items()):
        if not item["counts"]["backups"]:
            continue
        entries = [(entry["id"], "keep ", "; ".join(entry["reasons"])) for entry in item["keep"]]
        entries += [(entry["id"], "PRUNE" if entry.get("deleted") else "prune (not deleted)", entry["reason"])
                    for entry in item["prune"]]
        for number, (backup_id, action, why) in enumerate(sorted(entries, reverse=True)):
            say("  %-24s %s %s  %s" % (job if number == 0 else "", action, backup_id, why))
    say("")
    say("Verification")
    for label, result, same, how in (
            ("postgres-backup", pg_result, pg_same, "restored into database biometrics_restored, equal to the live database"),
            ("incremental-backup", files_result, files_same, "chain restored into a directory, equal to the live tree")):
        checks = result.get("checks") or []
        say("  restore %-26s %s: %d/%d checks passed; %s" % (
            label, "OK" if same and all(c.get("ok") for c in checks) else "FAILED",
            sum(1 for c in checks if c.get("ok")), len(checks), how if same else "content DIFFERS"))
    for name, (passed, first, _seconds) in sorted(drills.items()):
        checks = first.get("checks") or []
        say("  drill   %-26s %s: backup %s restored into a scratch target, %d/%d checks passed" % (
            name, "OK" if passed else "FAILED", first.get("id"), sum(1 for c in checks if c.get("ok")), len(checks)))


def job_summary(console, job_times):
    """Seconds from `kubectl create job` to the Job's Complete condition, per Job."""
    say = console.say
    if not job_times:
        return
    seconds = sorted(entry[1] for entry in job_times)
    say("")
    say("Jobs run as pods: %d, from `kubectl create job` to Complete: median %.1fs, slowest %.1fs" % (
        len(job_times), seconds[len(seconds) // 2], seconds[-1]))
    for name, took, succeeded in job_times:
        say("  %-34s %5.1fs %s" % (name, took, "" if succeeded else "FAILED"))


if __name__ == "__main__":
    try:
        main()
    except DemoError as exc:
        sys.stdout.flush()
        sys.stderr.write("\ndemo FAILED: %s\n" % exc)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("\ndemo interrupted\n")
        sys.exit(130)
