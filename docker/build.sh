#!/usr/bin/env bash
# Builds the training image with whichever of docker / podman / buildah is installed and prints
# its size and build time. Run from anywhere; the build context is the repository root.
#
#   docker/build.sh [--flavour cuda|cuda-debian|cpu] [--tag TAG] [--base IMAGE] [--dali-variant VARIANT]
#                   [--cuda-archs "80;90"] [--pip-ca FILE] [--tool docker|podman|buildah]
#
#   --flavour cuda   (default) CUDA 13 PyTorch base named in docker/Dockerfile; tag relabel_dali:cuda
#   --flavour cuda-debian
#                    the CUDA flavour without any image registry: the plain base below, torch from the
#                    package registry, nvcc and the CUDA headers as registry wheels (CUDA_WHEELS=1);
#                    the operator's CUDA backend is compiled for --cuda-archs; tag relabel_dali:cuda-debian
#   --flavour cpu    plain Python base relabel_dali-base:bookworm, made by docker/make_base.sh when
#                    missing (needs root and debootstrap); tag relabel_dali:cpu
#   --base IMAGE     any other base image (overrides the flavour's)
#   --pip-ca FILE    CA bundle handed to pip as the build secret pip_ca (a TLS-inspecting proxy),
#                    e.g. /etc/ssl/certs/ca-certificates.crt; also read from PIP_CA
#   --tool TOOL      force the tool (also CONTAINER_TOOL); by default the first of docker (with a
#                    running daemon), podman, buildah
#
# buildah runs with --isolation chroot --network host (works inside unprivileged containers and
# CI runners); BUILDAH_ISOLATION overrides the isolation.
# Exit codes: 0 built, 1 build failed or no tool, 2 bad command line.
set -euo pipefail

flavour=cuda
tag=""
base=""
dali_variant=""
cuda_archs=""
pip_ca=${PIP_CA:-}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die_usage() { echo "build.sh: $1 (see --help)" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --flavour) need_value "$@"; flavour=$2; shift 2 ;;
    --tag) need_value "$@"; tag=$2; shift 2 ;;
    --base) need_value "$@"; base=$2; shift 2 ;;
    --dali-variant) need_value "$@"; dali_variant=$2; shift 2 ;;
    --cuda-archs) need_value "$@"; cuda_archs=$2; shift 2 ;;
    --pip-ca) need_value "$@"; pip_ca=$2; shift 2 ;;
    --tool) need_value "$@"; export CONTAINER_TOOL=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done

case "$flavour" in
  cuda) tag=${tag:-relabel_dali:cuda} ;;
  cuda-debian) tag=${tag:-relabel_dali:cuda-debian}; plain_base=relabel_dali-base:bookworm; base=${base:-$plain_base} ;;
  cpu) tag=${tag:-relabel_dali:cpu}; plain_base=relabel_dali-base:bookworm; base=${base:-$plain_base} ;;
  *) die_usage "--flavour must be cuda, cuda-debian or cpu, not '$flavour'" ;;
esac
if [[ -n "$dali_variant" && ! "$dali_variant" =~ ^cuda[0-9]+$ ]]; then
  die_usage "--dali-variant must look like cuda130, not '$dali_variant'"
fi
if [[ -n "$pip_ca" && ! -r "$pip_ca" ]]; then
  echo "build.sh: --pip-ca $pip_ca: no such readable file" >&2; exit 2
fi

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=docker/tool.sh
source "$here/tool.sh"
tool=$(pick_container_tool) || exit 1

image_exists() {
  case "$tool" in
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    *) "$tool" image inspect "$1" >/dev/null 2>&1 ;;
  esac
}

if [[ -n "${plain_base:-}" && "$base" == "$plain_base" ]] && ! image_exists "$base"; then
  echo "build.sh: base $base is missing: making it with docker/make_base.sh"
  CONTAINER_TOOL=$tool "$here/make_base.sh" --name "$base"
fi

args=(-f "$root/docker/Dockerfile" -t "$tag")
[[ -n "$base" ]] && args+=(--build-arg "BASE_IMAGE=$base")
[[ -n "$dali_variant" ]] && args+=(--build-arg "DALI_VARIANT=$dali_variant")
[[ -n "$cuda_archs" ]] && args+=(--build-arg "CUDA_ARCHS=$cuda_archs")
[[ "$flavour" == cuda-debian ]] && args+=(--build-arg "CUDA_WHEELS=1")
[[ -n "$pip_ca" ]] && args+=(--secret "id=pip_ca,src=$pip_ca")

case "$tool" in
  docker) command=(env DOCKER_BUILDKIT=1 docker build "${args[@]}" "$root") ;;
  podman) command=(podman build "${args[@]}" "$root") ;;
  buildah) command=(buildah bud --layers --isolation "${BUILDAH_ISOLATION:-chroot}" --network host "${args[@]}" "$root") ;;
esac

echo "build.sh: ${command[*]}"
start=$(date +%s)
"${command[@]}"
seconds=$(( $(date +%s) - start ))

case "$tool" in
  buildah) size=$(buildah images --noheading --format '{{.Size}}' "$tag" | sed -n 1p) ;;
  *) bytes=$("$tool" image inspect --format '{{.Size}}' "$tag")
     size=$(awk -v b="$bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }') ;;
esac
echo "build.sh: built $tag with $tool in ${seconds} s; image size $size"
