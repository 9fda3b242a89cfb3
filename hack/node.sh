# shellcheck shell=bash
# The local cluster's node: containerd (Debian) + runc + a bridge CNI network + a kubelet
# built from k8s.io/kubernetes. Sourced by hack/control-plane.sh, whose helpers (log, die,
# spawn, is_ours, stop_component, free_ports, wait_until...) and variables (STATE_DIR and
# NODE_DIR=$STATE_DIR/node, KUBE_BIN_DIR, KUBECTL_BIN, API_PORT, READY_TIMEOUT) it uses;
# not run on its own.
#
# Several nodes can run on one machine (a developer's `make cluster-up` beside a test
# session, a test's private cluster): each takes a slot N under $NODE_REGISTRY and owns
#   the bridge bmnodeN with the node IP 10.244.N.1 (the pod subnet is 10.244.N.0/24),
#   the cgroup /biometrics-node-N in every hierarchy (the kubelet's cgroupRoot),
#   everything else (containerd's root, state and socket, kubelet dir, logs) under the state dir.
# What a node changes on the machine is put back by node_stop: pods killed, mounts
# unmounted, cgroups and bridge removed, and the sysctls the kubelet sets restored when the
# last node of the machine stops (their values from before the first one are kept in the
# registry).

NODE_REGISTRY="${BIOMETRICS_NODE_REGISTRY:-/run/biometrics-backup/nodes}"
NODE_SLOTS=32
# What the kubelet sets (pkg/kubelet/cm setupKernelTunables) and stop restores.
NODE_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
RUNC="${RUNC:-$(command -v runc || echo /usr/sbin/runc)}"
CONTAINERD_BIN="${CONTAINERD_BIN:-$(command -v containerd || echo /usr/bin/containerd)}"
CTR_BIN="${CTR_BIN:-$(command -v ctr || echo /usr/bin/ctr)}"
CNI_BIN_DIR="${CNI_BIN_DIR:-/usr/lib/cni}"
# Bump when the pause image recipe below changes (its cache key).
PAUSE_RECIPE=1

node_sock() { echo "$NODE_DIR/containerd.sock"; }
ctr_k8s() { "$CTR_BIN" -a "$(node_sock)" -n k8s.io "$@"; }

# ---------------------------------------------------------------- prerequisites

# Prints one line per missing prerequisite (nothing when the machine can run a node).
node_missing_prerequisites() {
  local plugin controller socket_path
  ((EUID == 0)) || echo "root: the kubelet mounts volumes and manages cgroups (run as root)"
  [[ -x "$RUNC" ]] || echo "runc: $RUNC not found (Debian package runc; or set RUNC)"
  [[ -x "$CONTAINERD_BIN" ]] || echo "containerd: $CONTAINERD_BIN not found (Debian package containerd)"
  command -v iptables >/dev/null || echo "iptables: not found (Debian package iptables; pods reach the API server through a DNAT rule)"
  [[ -x "$CTR_BIN" ]] || echo "ctr: $CTR_BIN not found (Debian package containerd)"
  for plugin in bridge host-local loopback; do
    [[ -x "$CNI_BIN_DIR/$plugin" ]] ||
      echo "CNI plugin $plugin: $CNI_BIN_DIR/$plugin not found (Debian package containernetworking-plugins)"
  done
  command -v ip >/dev/null || echo "ip: not found (Debian package iproute2)"
  # The kubelet makes unix sockets below its root dir; a socket path has at most 107 bytes.
  socket_path="$NODE_DIR/kubelet/pod-resources/1234567890"
  ((${#socket_path} <= 107)) ||
    echo "a shorter state dir: the kubelet's sockets under $NODE_DIR/kubelet would have ${#socket_path}-byte paths (at most 107; set BIOMETRICS_CLUSTER_DIR)"
  command -v umoci >/dev/null || echo "umoci: not found (Debian package umoci), needed for the pause image"
  if ! grep -qw overlay /proc/filesystems && ! { modprobe overlay 2>/dev/null && grep -qw overlay /proc/filesystems; }; then
    echo "overlayfs: the kernel offers no overlay filesystem (containerd's snapshotter needs it)"
  fi
  if [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]]; then
    for controller in cpu cpuacct cpuset memory pids; do
      [[ -d "/sys/fs/cgroup/$controller" ]] || echo "cgroup controller $controller: /sys/fs/cgroup/$controller is not mounted"
    done
  fi
}

node_check_prerequisites() {
  local missing
  missing="$(node_missing_prerequisites)"
  [[ -z "$missing" ]] && return 0
  log "this machine cannot run the node; missing prerequisites:"
  printf '  - %s\n' "$missing" | sed '2,$s/^/  - /' >&2
  die "node prerequisite missing: $(head -1 <<<"$missing")"
}

# ---------------------------------------------------------------- slots (machine-wide)

registry_lock() {
  mkdir -p "$NODE_REGISTRY"
  exec 8>"$NODE_REGISTRY/.lock"
  flock 8
}
registry_unlock() { exec 8>&-; }

# A slot is live while its state dir runs a node process or a control-plane.sh holds its
# lock (a node being started), unless that node is being stopped.
slot_live() {
  local dir="$1" name pid
  [[ -f "$dir/node/slot" && ! -e "$dir/node/stopping" ]] || return 1
  for name in containerd kubelet; do
    pid="$(cat "$dir/pids/$name.pid" 2>/dev/null || true)"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || continue
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$dir/" && return 0
  done
  [[ -e "$dir/.lock" ]] && ! flock -n "$dir/.lock" true 2>/dev/null
}

other_live_nodes() { # slots held by live nodes other than ours (registry lock held)
  local file owner
  for file in "$NODE_REGISTRY"/slot-*; do
    [[ -f "$file" ]] || continue
    owner="$(cat "$file")"
    [[ "$owner" == "$STATE_DIR" ]] && continue
    if slot_live "$owner"; then echo "${file##*/slot-} $owner"; fi
  done
  return 0
}

claim_slot() { # sets NODE_SLOT; registry lock held
  local n file owner
  for ((n = 0; n < NODE_SLOTS; n++)); do
    file="$NODE_REGISTRY/slot-$n"
    owner="$(cat "$file" 2>/dev/null || true)"
    if [[ -z "$owner" || "$owner" == "$STATE_DIR" ]] || ! slot_live "$owner"; then
      echo "$STATE_DIR" >"$file"
      NODE_SLOT="$n"
      echo "$n" >"$NODE_DIR/slot"
      return 0
    fi
  done
  die "all $NODE_SLOTS node slots of this machine are taken by running nodes ($NODE_REGISTRY)"
}

save_sysctls() { # the machine's values before the first node; registry lock held
  local name
  # Kept while any node runs; one left by a node that died still holds the originals.
  [[ -f "$NODE_REGISTRY/sysctl.orig" ]] && return 0
  for name in "${NODE_SYSCTLS[@]}"; do
    printf '%s=%s\n' "$name" "$(sysctl -n "$name")"
  done >"$NODE_REGISTRY/sysctl.orig.tmp"
  mv "$NODE_REGISTRY/sysctl.orig.tmp" "$NODE_REGISTRY/sysctl.orig"
}

restore_sysctls() { # when no other node runs; registry lock held
  local line
  [[ -f "$NODE_REGISTRY/sysctl.orig" && -z "$(other_live_nodes)" ]] || return 0
  while IFS= read -r line; do
    if [[ -n "$line" ]]; then sysctl -q -w "$line" >/dev/null; fi
  done <"$NODE_REGISTRY/sysctl.orig"
  rm -f "$NODE_REGISTRY/sysctl.orig"
}

# ---------------------------------------------------------------- cgroups, network

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/mounts; }

make_cgroup_root() {
  local mount dir
  for mount in $(cgroup_mounts); do
    dir="$mount/$NODE_CGROUP"
    mkdir -p "$dir"
    if [[ -f "$mount/cpuset.cpus" && -f "$dir/cpuset.cpus" ]]; then
      # A new cpuset starts empty; no task could join it.
      [[ -n "$(cat "$dir/cpuset.cpus")" ]] || cat "$mount/cpuset.cpus" >"$dir/cpuset.cpus"
      [[ -n "$(cat "$dir/cpuset.mems")" ]] || cat "$mount/cpuset.mems" >"$dir/cpuset.mems"
    fi
  done
}

# Kill every process left in the node's cgroups, then remove them (deepest first).
remove_cgroup_root() {
  local mount dir i pids
  [[ -n "${NODE_CGROUP:-}" ]] || return 0
  for ((i = 0; i < 50; i++)); do
    pids="$(for mount in $(cgroup_mounts); do
      if [[ -d "$mount/$NODE_CGROUP" ]]; then
        find "$mount/$NODE_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null || true
      fi
    done | sort -u)"
    [[ -z "$pids" ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  for mount in $(cgroup_mounts); do
    dir="$mount/$NODE_CGROUP"
    if [[ -d "$dir" ]]; then find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
    if [[ -d "$dir" ]]; then log "warning: could not remove cgroup $dir"; fi
  done
  return 0
}

mounts_under() { # mount points at or below DIR
  awk -v d="$1/" 'index($2, d) == 1 || $2 == substr(d, 1, length(d) - 1) {print $2}' /proc/mounts
}

# Removing a state dir with something still mounted below it would delete through the mount.
refuse_if_mounted() {
  [[ -z "$(mounts_under "$1")" ]] ||
    die "still mounted below $1, not removing it: $(mounts_under "$1" | head -3 | tr '\n' ' ')"
}

# Mounts under the state dir (the kubelet bind-mounts its root dir onto itself; volumes,
# container root filesystems, network namespaces), deepest first.
unmount_state_dir() {
  local mount i
  for ((i = 0; i < 3; i++)); do
    mount="$(mounts_under "$STATE_DIR" | sort -r)"
    [[ -z "$mount" ]] && return 0
    while IFS= read -r mount; do
      umount "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null || true
    done <<<"$mount"
  done
  awk -v d="$STATE_DIR/" 'index($2, d) == 1 {print "control-plane: warning: still mounted: " $2}' /proc/mounts >&2
}

# ---------------------------------------------------------------- images

pause_image_archive() { # build (once per kube version) and print the pause image archive
  local out="$BIOMETRICS_CACHE/images/pause-$KUBE_VERSION-r$PAUSE_RECIPE.oci.tar" src work
  if [[ ! -s "$out" ]]; then
    src="$(go env GOMODCACHE 2>/dev/null)/k8s.io/kubernetes@$KUBE_VERSION/build/pause/linux/pause.c"
    if [[ ! -f "$src" ]]; then
      GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$KUBE_VERSION" >&2 2>/dev/null || true
    fi
    [[ -f "$src" ]] || die "pause.c of k8s.io/kubernetes@$KUBE_VERSION not found in the Go module cache ($src)"
    work="$(mktemp -d)"
    mkdir -p "$work/rootfs" "$(dirname "$out")"
    gcc -Os -static -DVERSION="$KUBE_VERSION-biometrics" -o "$work/rootfs/pause" "$src" ||
      { rm -rf "$work"; die "compiling $src failed (gcc and libc6-dev, with the static libc)"; }
    strip "$work/rootfs/pause"
    "$REPO_ROOT/hack/oci-image.sh" "$work/rootfs" "$out" "$KUBE_VERSION" \
      --clear=config.entrypoint --config.entrypoint /pause --config.user 65535:65535 >&2 ||
      { rm -rf "$work"; die "packing the pause image failed"; }
    rm -rf "$work"
  fi
  echo "$out"
}

image_import() { # image_import ARCHIVE NAME: NAME is the repository, the archive's tag is kept
  ctr_k8s images import --base-name "$2" "$1" >&2
}

# ---------------------------------------------------------------- config

write_node_config() {
  mkdir -p "$NODE_DIR"/{containerd,certs.d/_default,cni/net.d,cni/ipam,kubelet,kubelet-pki,pod-logs,logs}
  # containerd 1.6 (Debian). Everything private except the shim sockets under /run/containerd.
  cat >"$NODE_DIR/containerd.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.grpc.v1.introspection.tracing"]
[grpc]
  address = "$(node_sock)"
[ttrpc]
  address = "$(node_sock).ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj (sandboxes ask for -998): clamp
  # to containerd's own value, or every sandbox fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Network namespaces under the state dir, so stop finds and unmounts them.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    # No registry: images are imported. Every pull goes to a closed loopback port and fails
    # at once (ErrImagePull), so no pod makes the machine talk to the internet.
    config_path = "$NODE_DIR/certs.d"
EOF
  printf 'server = "http://127.0.0.1:9"\n[host."http://127.0.0.1:9"]\n  capabilities = ["pull", "resolve"]\n' \
    >"$NODE_DIR/certs.d/_default/hosts.toml"

  # isGateway/ipMasq false: the plugin then never turns on ip_forward nor adds NAT rules.
  # The node IP is the bridge's own address, where pods reach servers on the host; the
  # service range is routed there too, for the API server (node_api_route).
  cat >"$NODE_DIR/cni/net.d/10-bridge.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "biometrics-node-$NODE_SLOT",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": false,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$NODE_SUBNET", "rangeStart": "${NODE_IP%.1}.10", "rangeEnd": "${NODE_IP%.1}.250", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$SERVICE_CIDR", "gw": "$NODE_IP"}],
        "dataDir": "$NODE_DIR/cni/ipam"
      }
    }
  ]
}
EOF
  # Pods resolve nothing outside (no cluster DNS runs): their resolver is their own loopback.
  printf 'nameserver 127.0.0.1\n' >"$NODE_DIR/resolv.conf"

  cat >"$NODE_DIR/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
# The apiserver calls the kubelet (logs, exec) with a client certificate of the cluster CA;
# nothing is allowed anonymously, and what a caller may do is asked of the apiserver.
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $STATE_DIR/pki/ca.crt
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$(node_sock)
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
failCgroupV1: false
failSwapOn: false
podLogsDir: $NODE_DIR/pod-logs
resolvConf: $NODE_DIR/resolv.conf
registerNode: true
# A shared development machine: a nearly full disk must not evict the test pods, and the
# imported images (nothing can be pulled again) must never be garbage-collected.
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
shutdownGracePeriod: 0s
EOF

  # The kubelet's identity: system:node:<node name> in system:nodes (Node authorizer).
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$NODE_DIR/kubelet-client.key" -out "$NODE_DIR/kubelet-client.csr" \
    -subj "/O=system:nodes/CN=system:node:$NODE_IP" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
    >"$NODE_DIR/kubelet-client.ext"
  openssl x509 -req -in "$NODE_DIR/kubelet-client.csr" -CA "$STATE_DIR/pki/ca.crt" \
    -CAkey "$STATE_DIR/pki/ca.key" -CAcreateserial -days 30 -extfile "$NODE_DIR/kubelet-client.ext" \
    -out "$NODE_DIR/kubelet-client.crt" 2>/dev/null
  chmod 600 "$NODE_DIR/kubelet-client.key"
  write_kubeconfig "$NODE_DIR/kubelet.kubeconfig" kubelet \
    "client-certificate: $NODE_DIR/kubelet-client.crt" "client-key: $NODE_DIR/kubelet-client.key"
}

node_vars() { # NODE_* from the slot
  NODE_SLOT="$1"
  NODE_BRIDGE="bmnode$NODE_SLOT"
  NODE_IP="10.244.$NODE_SLOT.1"
  NODE_SUBNET="10.244.$NODE_SLOT.0/24"
  NODE_CGROUP="biometrics-node-$NODE_SLOT"
}

# ---------------------------------------------------------------- the API server for pods

# Pods find the API server where every cluster tells them: the `kubernetes` Service
# (KUBERNETES_SERVICE_HOST/PORT, set by the kubelet), whose ClusterIP is in the certificate.
# No kube-proxy runs, so the node does its one job for that Service: a DNAT rule sends what
# pods address to the ClusterIP to the API server on loopback. route_localnet on the bridge
# alone lets packets from pods reach 127.0.0.1, without exposing the API server elsewhere.
node_api_rule() { # the iptables rule spec, after the chain
  echo "-i $NODE_BRIDGE -d $API_SERVICE_IP/32 -p tcp --dport 443 -m comment --comment biometrics-node-$NODE_SLOT-api" \
    "-j DNAT --to-destination 127.0.0.1:$API_PORT"
}

node_api_route() {
  sysctl -q -w "net.ipv4.conf.$NODE_BRIDGE.route_localnet=1" >/dev/null
  # shellcheck disable=SC2046 # the rule is a list of words
  iptables -t nat -A PREROUTING $(node_api_rule) || fail_start "adding the API server's DNAT rule"
}

node_api_unroute() { # every rule of this slot (a node that died may have left one)
  local rule
  command -v iptables >/dev/null || return 0
  while read -r rule; do
    # shellcheck disable=SC2086 # the rule is a list of words
    if [[ -n "$rule" ]]; then iptables -t nat ${rule/-A/-D} 2>/dev/null || true; fi
  done < <(iptables -t nat -S PREROUTING 2>/dev/null | grep -- "--comment biometrics-node-$NODE_SLOT-api" || true)
}

# ---------------------------------------------------------------- start / stop

node_running() { component_alive containerd && component_alive kubelet; }

node_ip() { echo "10.244.$(cat "$NODE_DIR/slot").1"; }

node_ready() {
  component_alive kubelet || fail_start "kubelet exited"
  component_alive containerd || fail_start "containerd exited"
  [[ "$("$KUBECTL_BIN" --kubeconfig "$STATE_DIR/kubeconfig" get node "$NODE_IP" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}' 2>/dev/null)" == "True/" ]]
}

containerd_up() {
  component_alive containerd || fail_start "containerd exited"
  "$CTR_BIN" -a "$(node_sock)" version >/dev/null 2>&1
}

node_start() { # control plane running, our state lock held
  local t0 pause_archive
  node_check_prerequisites
  [[ -x "$KUBE_BIN_DIR/kubelet" ]] || die "kubelet missing in $KUBE_BIN_DIR (hack/build-kube.sh)"
  pause_archive="$(pause_image_archive)"
  PAUSE_IMAGE="localhost/biometrics-backup/pause:$KUBE_VERSION"
  t0=$(date +%s.%N)
  node_stop_quiet # leftovers of an earlier node of this state dir
  refuse_if_mounted "$NODE_DIR"
  rm -rf "$NODE_DIR"
  mkdir -p "$NODE_DIR"
  registry_lock
  claim_slot
  node_vars "$NODE_SLOT"
  save_sysctls
  # A stale bridge or cgroup of this slot belongs to a node that died: take them over.
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  ip link add "$NODE_BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  node_api_unroute
  node_api_route
  make_cgroup_root
  registry_unlock
  read -r KUBELET_PORT KUBELET_HEALTHZ_PORT <<<"$(free_ports 2)"
  write_node_config

  spawn containerd "$CONTAINERD_BIN" --config "$NODE_DIR/containerd.toml" --log-level warn
  wait_until "$READY_TIMEOUT" "containerd" containerd_up
  image_import "$pause_archive" "localhost/biometrics-backup/pause" >/dev/null ||
    fail_start "importing the pause image into containerd"

  "$KUBECTL_BIN" --kubeconfig "$STATE_DIR/kubeconfig" apply -f - >/dev/null <<'EOF' ||
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: biometrics-apiserver-kubelet-client
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:kubelet-api-admin}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
EOF
    fail_start "granting the apiserver's kubelet client system:kubelet-api-admin"

  spawn kubelet "$KUBE_BIN_DIR/kubelet" \
    --config "$NODE_DIR/kubelet-config.yaml" \
    --kubeconfig "$NODE_DIR/kubelet.kubeconfig" \
    --root-dir "$NODE_DIR/kubelet" \
    --cert-dir "$NODE_DIR/kubelet-pki" \
    --hostname-override "$NODE_IP" \
    --node-ip "$NODE_IP" \
    --v 1
  # Ready, and the not-ready taint removed by the node-lifecycle controller: pods schedule.
  wait_until "$READY_TIMEOUT" "node $NODE_IP Ready and untainted" node_ready
  log "node $NODE_IP ready in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")s"
}

node_stop_quiet() { node_stop >/dev/null 2>&1 || true; }

# What the kubelet and the CNI library keep at fixed paths outside the state dir.
CNI_RESULTS=/var/lib/cni/results
KUBELET_DEVICE_PLUGINS=/var/lib/kubelet/device-plugins

node_stop() {
  local id pid link ids=()
  [[ -d "$NODE_DIR" ]] || return 0
  if [[ -f "$NODE_DIR/slot" ]]; then
    node_vars "$(cat "$NODE_DIR/slot")"
  else
    NODE_CGROUP=""
  fi
  : >"$NODE_DIR/stopping"
  stop_component kubelet
  if component_alive containerd; then
    mapfile -t ids < <(ctr_k8s containers ls -q 2>/dev/null || true)
    # The kubelet leaves pods running when it stops: kill and delete them through containerd.
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
      ctr_k8s tasks kill -s KILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do
      ctr_k8s tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  remove_cgroup_root # whatever still runs in the node's cgroups
  stop_component containerd
  # Shims of this containerd (their command line names its socket) end with their tasks.
  for pid in $(pgrep -f -- "-address $(node_sock)" 2>/dev/null); do
    if is_ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  unmount_state_dir
  # The kubelet links every container's log into /var/log/containers (a fixed path).
  for link in /var/log/containers/*.log; do
    if [[ -L "$link" && "$(readlink "$link")" == "$NODE_DIR/"* ]]; then rm -f "$link"; fi
  done
  registry_lock
  if [[ -n "$NODE_CGROUP" ]]; then
    remove_cgroup_root
    node_api_unroute
    ip link del "$NODE_BRIDGE" 2>/dev/null || true
    if [[ "$(cat "$NODE_REGISTRY/slot-$NODE_SLOT" 2>/dev/null)" == "$STATE_DIR" ]]; then
      rm -f "$NODE_REGISTRY/slot-$NODE_SLOT"
    fi
  fi
  # No CNI DEL ran for the killed sandboxes: drop the CNI library's cached results of them.
  for id in "${ids[@]}"; do
    if [[ -n "$id" ]]; then rm -f "$CNI_RESULTS"/*-"$id"-*; fi
  done
  if [[ -n "$NODE_CGROUP" ]]; then rm -f "$CNI_RESULTS/biometrics-node-$NODE_SLOT-"*; fi
  rm -f "$NODE_DIR/slot"
  if [[ -z "$(other_live_nodes)" ]]; then
    # The last node: the kubelet's fixed-path socket and the directories it made, if empty.
    if [[ -S "$KUBELET_DEVICE_PLUGINS/kubelet.sock" ]]; then rm -f "$KUBELET_DEVICE_PLUGINS/kubelet.sock"; fi
    rmdir "$KUBELET_DEVICE_PLUGINS" /var/lib/kubelet "$CNI_RESULTS" /var/lib/cni /var/log/containers 2>/dev/null || true
  fi
  restore_sysctls
  # containerd 1.6 keeps shim sockets and runc state under /run/containerd whatever its
  # config says; the empty directories go, anything another containerd still uses stays.
  if [[ -d /run/containerd ]]; then find /run/containerd -depth -type d -empty -delete 2>/dev/null || true; fi
  registry_unlock
}
