#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager from the Go module k8s.io/kubernetes.
#
# k8s.io/kubernetes replaces its k8s.io/* staging modules with local paths, so a plain
# `go install` cannot build it. We generate a throwaway wrapper module that requires
# k8s.io/kubernetes and points every staging module at its published v0.x.y tag, then
# build the two commands from it. Binaries are cached by version under ~/.cache.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
CACHE_ROOT="${BIOMETRICS_CACHE:-$HOME/.cache/biometrics-backup}"
OUT="$CACHE_ROOT/kube/$KUBE_VERSION"

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kube-controller-manager" ]]; then
  echo "kube binaries $KUBE_VERSION cached in $OUT"
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
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go mod download
mkdir -p "$OUT.tmp"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$OUT.tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "built kube $KUBE_VERSION in $(( $(date +%s) - start ))s into $OUT"
