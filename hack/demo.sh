#!/usr/bin/env bash
# `make demo`: the backup system on this machine's embedded defaults, end to end.
#
# Starts a Kubernetes cluster of its own (hack/control-plane.sh: control plane and one node,
# containerd + kubelet; state in build/demo/cluster), builds the runner image if its inputs
# changed and imports it into the node (hack/runner-image.sh import; cached under
# ~/.cache/biometrics-backup/runner-image: about 6 minutes the first time on 2 cores, seconds
# after that), then demo/demo.py starts PostgreSQL, Redis, SeaweedFS S3 and a git daemon on
# the node IP, deploys the seed's values with the roles, runs the CronJobs as pods (backups,
# retention, drills: `kubectl create job --from=cronjob/NAME`), restores with verification and
# prints a summary. Everything it started is stopped when it ends, however it ends.
#
# Settings: BIOMETRICS_DEMO_DIR (default build/demo) holds the cluster state, data, keys and
# logs; its path must stay short (the kubelet's socket paths below it are limited to 107 bytes).
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
echo "[0] Starting the local Kubernetes cluster (etcd, kube-apiserver, controller manager, scheduler; a node: containerd + kubelet)"
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
[[ -n "${BIOMETRICS_NODE_IP:-}" ]] || { echo "demo: the cluster started without a node (log: $demo_dir/control-plane.log)" >&2; exit 1; }

echo "    The runner image into the node (hack/runner-image.sh import; built only when its inputs changed, ~6 min the first time)"
image_started=$(date +%s)
if ! bash hack/runner-image.sh import >"$demo_dir/runner-image.log" 2>&1; then
  tail -n 25 "$demo_dir/runner-image.log" >&2
  echo "demo: building or importing the runner image failed (log: $demo_dir/runner-image.log)" >&2
  exit 1
fi
echo "      $(grep -Eo 'cached: .*|built .* in [0-9]+s.*' "$demo_dir/runner-image.log" | tail -n 1 | sed "s#$HOME#~#")"
echo "      imported in $(($(date +%s) - image_started))s in all"

"$python" demo/demo.py --workdir "$demo_dir/run"
