#!/usr/bin/env bash
# Makes the plain-Python base image of the CPU flavour without any image registry: a minimal
# Debian root file system from Debian's own package archive (debootstrap), imported as an image.
#
#   docker/make_base.sh [--name NAME] [--suite SUITE] [--mirror URL] [--workdir DIR]
#
# The root file system holds python3 with venv and pip, g++ and make (the operator's CPU build)
# and CA certificates. Needs root, debootstrap, and one of buildah / podman / docker.
# Environment: CONTAINER_TOOL forces the tool (buildah, podman or docker).
set -euo pipefail

name=relabel_dali-base:bookworm
suite=bookworm
mirror=""            # empty: debootstrap's default Debian mirror
workdir=${TMPDIR:-/var/tmp}
packages=python3,python3-venv,python3-pip,python3-dev,g++,make,ca-certificates

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --suite) suite=${2:?--suite needs a value}; shift 2 ;;
    --mirror) mirror=${2:?--mirror needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "make_base.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/tool.sh
source "$here/tool.sh"
tool=$(pick_container_tool) || exit 1
command -v debootstrap >/dev/null || { echo "make_base.sh: debootstrap is not installed" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "make_base.sh: debootstrap needs root" >&2; exit 1; }

mkdir -p "$workdir"
rootfs=$(mktemp -d "$workdir/relabel_dali-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

echo "make_base.sh: debootstrap $suite into $rootfs (packages: $packages)"
start=$(date +%s)
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" ${mirror:+"$mirror"}
# Package lists and caches are not needed in the image.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb

echo "make_base.sh: importing as $name with $tool"
tar -C "$rootfs" --numeric-owner -cf "$rootfs.tar" .
trap 'rm -rf "$rootfs" "$rootfs.tar"' EXIT
case "$tool" in
  buildah)  # buildah has no import command: unpack the archive into an empty image
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd /bin/bash "$container"
    buildah commit --quiet --rm "$container" "$name" >/dev/null ;;
  podman|docker)
    "$tool" import --change 'CMD ["/bin/bash"]' "$rootfs.tar" "$name" >/dev/null ;;
esac
echo "make_base.sh: $name ready in $(( $(date +%s) - start )) s"
