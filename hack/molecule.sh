#!/usr/bin/env bash
# `make molecule`: the default Molecule scenario on the local cluster, with real servers.
#
# 1. starts the cluster (hack/control-plane.sh: control plane + node) unless one is running
#    in BIOMETRICS_CLUSTER_DIR, and reads its kubeconfig and node IP (`... env`);
# 2. builds the runner image if its inputs changed and imports it into the node
#    (hack/runner-image.sh import; about 6 minutes the first time, cached after);
# 3. starts PostgreSQL, Redis, SeaweedFS S3 and a git daemon on the node IP
#    (tests/molecule_servers.py, in the background) and passes their addresses to the
#    scenario in MOLECULE_SERVERS (a YAML file, 0600: it holds the S3 credentials);
# 4. molecule reset + molecule test: prepare, converge, idempotence, verify (which runs the
#    CronJobs as pods against those servers), cleanup;
# 5. stops the servers and, when step 1 started it, the cluster, however the run ended.
#
# Run through `make molecule`, which puts .venv/bin on PATH and sets ANSIBLE_COLLECTIONS_PATH.
# Settings: BIOMETRICS_CLUSTER_DIR (hack/control-plane.sh), MOLECULE_WORK_DIR (default
# build/molecule: the claims' directories, servers.yml, the servers' log).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON_BIN:-$root/.venv/bin/python}"
work="${MOLECULE_WORK_DIR:-$root/build/molecule}"
started_cluster=0
servers_pid=

finish() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$servers_pid" ]]; then
    kill -TERM "$servers_pid" 2>/dev/null || true
    wait "$servers_pid" 2>/dev/null || true
  fi
  if ((started_cluster)); then
    bash hack/control-plane.sh stop || rc=1
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! bash hack/control-plane.sh status >/dev/null 2>&1; then
  started_cluster=1
  bash hack/control-plane.sh start
fi
eval "$(bash hack/control-plane.sh env)"
[[ -n "${BIOMETRICS_NODE_IP:-}" ]] ||
  { echo "molecule: the cluster has no node (hack/control-plane.sh node-start); the scenario runs pods" >&2; exit 1; }

bash hack/runner-image.sh import

rm -rf "$work"
mkdir -p "$work"
"$python" tests/molecule_servers.py --host "$BIOMETRICS_NODE_IP" --dir "$work/claims" 2>"$work/servers.log" &
servers_pid=$!
for ((waited = 0; ; waited++)); do
  [[ -f "$work/claims/servers.yml" ]] && break
  if ! kill -0 "$servers_pid" 2>/dev/null || ((waited >= 120)); then
    cat "$work/servers.log" >&2
    echo "molecule: the servers did not start (log above: $work/servers.log)" >&2
    exit 1
  fi
  sleep 1
done
export MOLECULE_SERVERS="$work/claims/servers.yml"

# `molecule reset` first: molecule remembers "prepared" under ~/.ansible/tmp and would skip
# the prepare playbook on every later run.
molecule reset >/dev/null
molecule test
