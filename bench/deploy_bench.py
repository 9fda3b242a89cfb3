"""How long the umbrella role takes to deploy the seed's values to the local control plane.

Measures, in one run against the same cluster: the first converge (everything created), the
``changed=0`` rerun, and, as the baseline, a rerun in ``--diff`` mode, which applies the
objects one task item at a time (what the batched apply replaces). Wall-clock times are
reported, never asserted: the machine's other load shows in them.

    python bench/deploy_bench.py            # starts a private control plane, stops it after
    BIOMETRICS_KUBECONFIG=... python bench/deploy_bench.py   # uses a running one
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "playbooks", "site.yml")
SEED = os.path.join(ROOT, "playbooks", "values", "seed.yml")
RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def converge(env, values_file, *args):
    start = time.monotonic()
    result = subprocess.run(["ansible-playbook", SITE, "-e", json.dumps({"values_file": values_file}), *args],
                            env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit("converge failed:\n" + result.stdout[-4000:] + result.stderr[-2000:])
    recap = [line for line in result.stdout.splitlines() if line.startswith("localhost")][-1]
    return elapsed, recap.split()[3]  # "changed=N"


def main():
    env = dict(os.environ)
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", os.pathsep.join([
        os.path.join(ROOT, "build", "collections"),
        subprocess.check_output([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                text=True).strip()]))
    state_dir = None
    kubeconfig = env.get("BIOMETRICS_KUBECONFIG")
    if not kubeconfig:
        state_dir = tempfile.mkdtemp(prefix="deploy-bench-cluster-")
        os.rmdir(state_dir)
        subprocess.run(["bash", os.path.join(ROOT, "hack", "control-plane.sh"), "start"], check=True,
                       env=dict(env, BIOMETRICS_CLUSTER_DIR=state_dir), stdout=subprocess.DEVNULL)
        kubeconfig = os.path.join(state_dir, "kubeconfig")
    env.update(KUBECONFIG=kubeconfig, K8S_AUTH_KUBECONFIG=kubeconfig)
    namespace = "bench-" + uuid.uuid4().hex[:8]
    kubectl = ["kubectl", "--kubeconfig", kubeconfig]
    try:
        subprocess.run(kubectl + ["create", "namespace", namespace], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(kubectl + ["create", "namespace", namespace + "-velero"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(kubectl + ["-n", namespace, "create", "secret", "generic", "backup-encryption-key",
                                  "--from-literal=recipients=" + RECIPIENT], check=True, stdout=subprocess.DEVNULL)
        with open(SEED, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
        values["namespace"] = namespace
        values["backup"]["pvc"]["veleroNamespace"] = namespace + "-velero"
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
            yaml.safe_dump(values, handle)
            values_file = handle.name
        rows = [("first converge (batched apply)",) + converge(env, values_file),
                ("rerun, nothing to change (batched apply)",) + converge(env, values_file),
                ("rerun with --diff (one apply per object, baseline)",) + converge(env, values_file, "--diff")]
        print("| run | seconds | result |\n|---|---:|---|")
        for name, seconds, changed in rows:
            print("| %s | %.1f | %s |" % (name, seconds, changed))
        print("\nload average at the end: %.2f %.2f %.2f (2 cores)" % os.getloadavg())
    finally:
        subprocess.run(kubectl + ["delete", "namespace", namespace, namespace + "-velero", "--wait=false"],
                       check=False, capture_output=True)
        if state_dir:
            subprocess.run(["bash", os.path.join(ROOT, "hack", "control-plane.sh"), "stop"], check=False,
                           env=dict(env, BIOMETRICS_CLUSTER_DIR=state_dir), stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
