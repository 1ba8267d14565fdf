#!/usr/bin/env bash
# Build a minimal Debian bookworm base image with python3 from Debian's packages and import it into podman, for
# machines that cannot pull images from a registry (`make image-test` passes it as the Containerfile's BASE).
# Usage: scripts/image_base.sh [IMAGE]   (default localhost/ferkit-base:bookworm; reused when it exists)
set -euo pipefail
IMAGE=${1:-localhost/ferkit-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PODMAN=${PODMAN:-podman --runtime runc}
if $PODMAN image exists "$IMAGE"; then
  echo "base image $IMAGE exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "image_base.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
ROOTFS=$(mktemp -d /tmp/ferkit-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
# minbase: dpkg, apt and essentials only; python3-venv brings ensurepip (pip in the venv), ca-certificates lets pip
# reach the package index over TLS.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR"
# Trim what a runtime image never needs: apt lists, caches, docs and man pages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
tar -C "$ROOTFS" --numeric-owner -c . | $PODMAN import --change 'CMD ["python3"]' - "$IMAGE"
echo "imported $IMAGE ($($PODMAN image inspect --format '{{.Size}}' "$IMAGE") bytes)"
