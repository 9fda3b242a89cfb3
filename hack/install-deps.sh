#!/usr/bin/env bash
# Install the Debian packages that the test suite and the demo run for real
# (database servers, the Pushgateway, the reference backup tools, ...).
#
# Idempotent and quick when everything is present: `dpkg -s` decides what is
# missing, and `apt-get update` only runs when something has to be installed.
# Needs root, or sudo without a password prompt.
set -euo pipefail

packages=(
  postgresql            # PostgreSQL 15 server and client tools (pg_dump, pg_restore)
  postgresql-client     # the client metapackage bindep.txt names (for the execution environment)
  redis-server          # Redis server and redis-cli
  prometheus-pushgateway
  prometheus            # promtool, for alert rule tests
  restic                # reference retention semantics (restic forget)
  borgbackup            # reference retention semantics (borg prune)
  age                   # decrypt backups with stock tools
  zstd                  # decompress backups with stock tools
  rsync
  git
  openssl
  shellcheck            # lets ansible-test sanity check the shell scripts too
  # The local cluster's node (hack/node.sh): container runtime, pod network, images.
  containerd            # CRI runtime for the kubelet (1.6, with its ctr client)
  runc                  # the OCI runtime containerd starts containers with
  containernetworking-plugins # bridge + host-local CNI plugins (/usr/lib/cni)
  iproute2              # ip: the pod bridge
  iptables              # the DNAT rule that takes pods to the API server (no kube-proxy)
  umoci                 # builds the pause and test images from a rootfs, no registry
  busybox-static        # the test image's userland
  gcc                   # the pause binary, compiled from pause.c of k8s.io/kubernetes
  libc6-dev             # static libc for it
  binutils              # strip
  buildah               # builds the runner image from its Containerfile (make runner-image)
  mmdebstrap            # the runner image's Debian base, made here without a registry
)

missing=()
for package in "${packages[@]}"; do
  # "install ok installed" is the only state in which the package is usable.
  if [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" != "install ok installed" ]]; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} Debian packages present"
  exit 0
fi

if ((EUID == 0)); then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install-deps: missing packages (${missing[*]}) and no root or passwordless sudo" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The system services these packages bring are not used: the tests start private
# servers on free loopback ports, so a running system PostgreSQL does not get in the way.
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
