#!/usr/bin/env bash
# Build the local cluster's Kubernetes commands (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet) from the Go module k8s.io/kubernetes.
#
# k8s.io/kubernetes replaces its k8s.io/* staging modules with local paths, so a plain
# `go install` cannot build it. We generate a throwaway wrapper module that requires
# k8s.io/kubernetes and points every staging module at its published v0.x.y tag, then
# build the commands from it. Binaries are cached by version under ~/.cache; only the
# commands missing from the cache are built (KUBE_CMDS narrows the set).
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
CACHE_ROOT="${BIOMETRICS_CACHE:-$HOME/.cache/biometrics-backup}"
OUT="$CACHE_ROOT/kube/$KUBE_VERSION"

KUBE_CMDS="${KUBE_CMDS:-kube-apiserver kube-controller-manager kube-scheduler kubelet}"

missing=()
for cmd in $KUBE_CMDS; do [[ -x "$OUT/$cmd" ]] || missing+=("$cmd"); done
if ((${#missing[@]} == 0)); then
  echo "kube binaries ($KUBE_CMDS) $KUBE_VERSION cached in $OUT"
  exit 0
fi

command -v go >/dev/null || { echo "build-kube: Go toolchain not found on PATH" >&2; exit 1; }

staging_version="v0.${KUBE_VERSION#v1.}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

start=$(date +%s)
go mod init biometrics.local/kubebuild >/dev/null 2>&1
gomod_dir="$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"

# Every "k8s.io/x => ./staging/src/k8s.io/x" line of upstream go.mod becomes a replace to the tag.
python3 - "$gomod_dir/go.mod" "$staging_version" "$KUBE_VERSION" >> go.mod <<'PY'
import re, sys
gomod, staging, kube = sys.argv[1:4]
text = open(gomod).read()
mods = sorted(set(re.findall(r'^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/', text, re.M)))
if not mods:
    sys.exit("no staging replaces found in " + gomod)
print(f"\nrequire k8s.io/kubernetes {kube}\n")
print("replace (")
for m in mods:
    print(f"\t{m} => {m} {staging}")
print(")")
PY
go_line="$(grep -E '^go [0-9.]+' "$gomod_dir/go.mod" | head -1)"
sed -i "s/^go .*/$go_line/" go.mod
packages=()
for cmd in "${missing[@]}"; do packages+=("k8s.io/kubernetes/cmd/$cmd"); done
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  printf '\t_ "%s"\n' "${packages[@]}"
  printf ')\n'
} > tools.go
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go mod download
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp" "$OUT"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$OUT.tmp/" "${packages[@]}"
# Each binary appears whole under its final name (mv within one directory tree).
mv "$OUT.tmp"/* "$OUT/"; rmdir "$OUT.tmp"
echo "built ${missing[*]} $KUBE_VERSION in $(( $(date +%s) - start ))s into $OUT"
