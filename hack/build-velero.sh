#!/usr/bin/env bash
# Build the Velero server/client (one binary, `velero`) and the AWS object-store plugin
# (`velero-plugin-for-aws`) from the Go module proxy, for the integration tests that run
# a real Velero server against the local control plane.
#
# Why a wrapper module: velero's go.mod has replace directives (its own kopia fork), so
# `go install github.com/vmware-tanzu/velero/cmd/velero@v1.18.3` refuses. As in
# hack/build-kube.sh we generate a throwaway module that requires the upstream module,
# repeats the replaces the build needs, and builds the command from there:
#   - github.com/kopia/kopia => github.com/project-velero/kopia (upstream's own replace)
#   - k8s.io/cli-runtime => v0.33.13 (velero pins v0.33.12, which the proxy here does not
#     serve; the patch release is API-identical)
#
# Binaries are cached by version under ~/.cache/biometrics-backup/velero/<velero version>/;
# a binary is built into a temporary directory and renamed into place, so an interrupted
# build never leaves a half-written binary in the cache. Cold: about 8 minutes on 2 cores
# (velero ~4.5 min, the plugin ~3 min); measured 42 minutes for velero alone with a cold Go
# build cache and a load average of 12-14 on the shared machine. Cached: instant.
set -euo pipefail

VELERO_VERSION="${VELERO_VERSION:-v1.18.3}"
VELERO_AWS_PLUGIN_VERSION="${VELERO_AWS_PLUGIN_VERSION:-v1.14.3}"
VELERO_KOPIA_REPLACE="${VELERO_KOPIA_REPLACE:-github.com/project-velero/kopia v0.0.0-20251230033609-d946b1e75197}"
VELERO_CLI_RUNTIME="${VELERO_CLI_RUNTIME:-v0.33.13}"
CACHE_ROOT="${BIOMETRICS_CACHE:-$HOME/.cache/biometrics-backup}"
OUT="$CACHE_ROOT/velero/$VELERO_VERSION"
PLUGIN_DIR="$OUT/plugins"

need_velero=1; need_plugin=1
[[ -x "$OUT/velero" ]] && need_velero=0
[[ -x "$PLUGIN_DIR/velero-plugin-for-aws" ]] && need_plugin=0
if ((need_velero == 0 && need_plugin == 0)); then
  echo "velero $VELERO_VERSION and velero-plugin-for-aws $VELERO_AWS_PLUGIN_VERSION cached in $OUT"
  exit 0
fi

command -v go >/dev/null || { echo "build-velero: Go toolchain not found on PATH" >&2; exit 1; }
mkdir -p "$OUT" "$PLUGIN_DIR"

# build_one MODULE VERSION PACKAGE LDFLAGS DEST: build PACKAGE of MODULE@VERSION to DEST.
build_one() {
  local module="$1" version="$2" package="$3" ldflags="$4" dest="$5"
  local work start
  work="$(mktemp -d)"
  # shellcheck disable=SC2064  # expand $work now
  trap "rm -rf '$work'" RETURN
  start=$(date +%s)
  (
    cd "$work"
    go mod init biometrics.local/velerobuild >/dev/null 2>&1
    local gomod_dir go_line
    gomod_dir="$(GOFLAGS=-mod=mod go mod download -json "$module@$version" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    go_line="$(grep -E '^go [0-9.]+' "$gomod_dir/go.mod" | head -1)"
    sed -i "s/^go .*/$go_line/" go.mod
    {
      printf '\nrequire %s %s\n\n' "$module" "$version"
      printf 'replace (\n'
      printf '\tgithub.com/kopia/kopia => %s\n' "$VELERO_KOPIA_REPLACE"
      printf '\tk8s.io/cli-runtime => k8s.io/cli-runtime %s\n' "$VELERO_CLI_RUNTIME"
      printf ')\n'
    } >> go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$package" > tools.go
    GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
    GOFLAGS=-mod=mod go mod download
    CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$work/bin" "$package"
  )
  # rename within the cache directory: the binary appears whole or not at all.
  mv "$work/bin" "$dest.tmp.$$"
  mv "$dest.tmp.$$" "$dest"
  echo "built $package $version in $(( $(date +%s) - start ))s into $dest"
}

if ((need_velero)); then
  build_one github.com/vmware-tanzu/velero "$VELERO_VERSION" \
    github.com/vmware-tanzu/velero/cmd/velero \
    "-s -w -X github.com/vmware-tanzu/velero/pkg/buildinfo.Version=$VELERO_VERSION" \
    "$OUT/velero"
fi
if ((need_plugin)); then
  build_one github.com/vmware-tanzu/velero-plugin-for-aws "$VELERO_AWS_PLUGIN_VERSION" \
    github.com/vmware-tanzu/velero-plugin-for-aws/velero-plugin-for-aws \
    "-s -w" \
    "$PLUGIN_DIR/velero-plugin-for-aws"
fi
