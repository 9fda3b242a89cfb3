#!/usr/bin/env bash
# `make demo`: the backup system on this machine's embedded defaults, end to end.
#
# Starts a Kubernetes control plane of its own (hack/control-plane.sh, state in
# build/demo/cluster), then demo/demo.py starts PostgreSQL, Redis and SeaweedFS S3, deploys
# the seed's values with the roles, runs the CronJobs' commands locally (backups, retention,
# drills), restores with verification and prints a summary. Everything it started is
# stopped when it ends, however it ends.
#
# Settings: BIOMETRICS_DEMO_DIR (default build/demo) holds the cluster state, data, keys and logs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
demo_dir="${BIOMETRICS_DEMO_DIR:-$root/build/demo}"
export BIOMETRICS_CLUSTER_DIR="$demo_dir/cluster"
python="${PYTHON_BIN:-$root/.venv/bin/python}"
started=$(date +%s)

stop_cluster() {
  local rc=$?
  trap - EXIT INT TERM
  if ! bash hack/control-plane.sh stop >"$demo_dir/control-plane-stop.log" 2>&1; then
    echo "demo: stopping the control plane failed, see $demo_dir/control-plane-stop.log" >&2
    rc=1
  fi
  echo "demo: everything stopped; wall time $(($(date +%s) - started))s (exit $rc)"
  exit "$rc"
}

mkdir -p "$demo_dir"
[[ -x "$python" ]] || { echo "demo: $python not found: run \`make venv\` (or \`make demo\`)" >&2; exit 1; }
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "biometrics.backup demo: the seed's backup system on a local control plane with real servers"
echo
echo "[0] Starting the local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)"
# A leftover of an interrupted demo in the same state dir goes first.
bash hack/control-plane.sh stop >/dev/null 2>&1 || true
cluster_started=$(date +%s)
if ! bash hack/control-plane.sh start >"$demo_dir/control-plane.log" 2>&1; then
  tail -n 25 "$demo_dir/control-plane.log" >&2
  echo "demo: the control plane did not start (log: $demo_dir/control-plane.log)" >&2
  exit 1
fi
eval "$(bash hack/control-plane.sh env)"
echo "      $(grep -o 'ready in .*' "$demo_dir/control-plane.log" | tail -n 1) ($(($(date +%s) - cluster_started))s with the build check)"

"$python" demo/demo.py --workdir "$demo_dir/run"
