#!/usr/bin/env bash
# Pack a root filesystem directory into an OCI image archive with umoci (Debian package),
# without a registry, Docker or buildah. The node imports such archives into its containerd
# (hack/control-plane.sh image-import).
#
#   hack/oci-image.sh ROOTFS_DIR OUT.oci.tar TAG [umoci config options...]
#   e.g. hack/oci-image.sh rootfs pause.oci.tar 1 --config.entrypoint /pause --config.user 65535:65535
#
# The archive is written next to OUT first and renamed into place, so a cache never holds a
# half-written image. Timestamps are fixed, so the same rootfs gives the same config.
set -euo pipefail

(($# >= 3)) || { echo "usage: $0 ROOTFS_DIR OUT.oci.tar TAG [umoci config options...]" >&2; exit 2; }
rootfs="$1" out="$2" tag="$3"
shift 3
[[ -d "$rootfs" ]] || { echo "oci-image: $rootfs is not a directory" >&2; exit 1; }
command -v umoci >/dev/null || { echo "oci-image: umoci not found (Debian package umoci; hack/install-deps.sh)" >&2; exit 1; }

work="$(mktemp -d "$(dirname "$out")/.oci-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stamp=2024-01-01T00:00:00Z

umoci init --layout "$work/layout"
umoci new --image "$work/layout:$tag"
umoci unpack --image "$work/layout:$tag" "$work/bundle" >/dev/null
cp -a "$rootfs"/. "$work/bundle/rootfs/"
umoci repack --image "$work/layout:$tag" "$work/bundle"
umoci config --image "$work/layout:$tag" --created "$stamp" --author biometrics-backup \
  --os linux --architecture amd64 "$@"
umoci gc --layout "$work/layout"
# An OCI archive is the tar of the layout; index.json names the image by its tag only.
tar -C "$work/layout" -cf "$work/image.tar" .
mv "$work/image.tar" "$out"
