#!/usr/bin/env bash
# Smoke test of a built image on the CPU, as an arbitrary user and without writing into the image:
#
#   docker/smoke.sh [--image TAG] [--tool docker|podman|buildah] [--user UID:GID]
#                   [--shm-size SIZE] [--workdir DIR] [--keep] [--cuda]
#
#   1. operator: docker/check_operator.py in the image: the prebuilt plugin and C ABI library load
#      from the image's cache (nothing compiled) and register LabelPool; with --cuda (a CUDA
#      image) also for DALI's GPU backend, with the C ABI's CUDA entry point, and both libraries
#      hold SASS for every arch of RELABEL_DALI_CUDA_ARCHS and PTX for the newest. No GPU needed:
#      nothing runs on one;
#   2. pytest: a fast subset of the test suite inside the container (operator, pooling, shards,
#      packing, configuration);
#   3. demo data: tools/make_demo_data.py and tools/pack_labels.py write the demo-sized data set
#      and its label shards into a mounted folder;
#   4. train: the image's entrypoint (torchrun) trains configs/demo.yaml for 1 epoch on it, with
#      SIZE of shared memory, and must leave its last checkpoint in the mounted output folder;
#   5. pack_labels --help answers;
#   6. (buildah) the container's own layer holds no file outside /tmp.
#
# Defaults: --image relabel_dali:cpu, --user 4242:4242 (no such user in the image), --shm-size 1g,
# --workdir a new folder under ${TMPDIR:-/var/tmp}, removed afterwards unless --keep.
# docker and podman run the container with a read-only root file system and a tmpfs /tmp.
# Exit codes: 0 every step passed, 1 a step failed (or no tool), 2 bad command line.
set -euo pipefail

image=relabel_dali:cpu
user=4242:4242
shm=1g
workdir=""
keep=0
cuda=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die_usage() { echo "smoke.sh: $1 (see --help)" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) need_value "$@"; image=$2; shift 2 ;;
    --tool) need_value "$@"; export CONTAINER_TOOL=$2; shift 2 ;;
    --user) need_value "$@"; user=$2; shift 2 ;;
    --shm-size) need_value "$@"; shm=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --cuda) cuda=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
[[ "$user" =~ ^[0-9]+:[0-9]+$ ]] || die_usage "--user must be numeric UID:GID, not '$user'"
[[ "$shm" =~ ^[0-9]+[kmgKMG]?$ ]] || die_usage "--shm-size must look like 512m or 1g, not '$shm'"

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/tool.sh
source "$here/tool.sh"
tool=$(pick_container_tool) || exit 1

if [[ -z "$workdir" ]]; then
  workdir=$(mktemp -d "${TMPDIR:-/var/tmp}/relabel_dali-smoke.XXXXXX")
else
  mkdir -p "$workdir"
fi
# The container's user is not the caller: it must be able to write the mounted folder.
chmod 0777 "$workdir"

container=""
cleanup() {
  [[ -n "$container" ]] && buildah rm "$container" >/dev/null 2>&1
  if [[ $keep -eq 0 ]]; then rm -rf "$workdir"; else echo "smoke.sh: kept $workdir"; fi
}
trap cleanup EXIT

if [[ "$tool" == buildah ]]; then
  container=$(buildah from --pull=never "$image")
fi

# run_in ENTRYPOINT? ARGS...: one command in a fresh container (buildah: in the working container).
run_in() {
  case "$tool" in
    buildah)
      buildah run --isolation "${BUILDAH_ISOLATION:-chroot}" --network host --user "$user" \
        --mount "type=tmpfs,destination=/dev/shm,tmpfs-size=$shm" -v "$workdir:/smoke" \
        "$container" -- "$@" ;;
    *)
      "$tool" run --rm --network none --user "$user" --read-only --tmpfs /tmp:rw,exec \
        --shm-size "$shm" -v "$workdir:/smoke" --entrypoint "$1" "$image" "${@:2}" ;;
  esac
}

declare -a results=()
failed=0
step() {  # step NAME COMMAND...: runs it, records PASS/FAIL with its time
  local name=$1 start rc
  shift
  echo "=== smoke: $name"
  start=$(date +%s)
  if "$@"; then rc=0; else rc=$?; fi
  if [[ $rc -eq 0 ]]; then
    results+=("PASS  $name ($(( $(date +%s) - start )) s)")
  else
    results+=("FAIL  $name (exit $rc, $(( $(date +%s) - start )) s)")
    failed=1
  fi
  return 0
}

operator_backends() {
  if [[ $cuda -eq 1 ]]; then run_in python docker/check_operator.py --cuda; else run_in python docker/check_operator.py; fi
}

pytest_subset() {
  run_in python -m pytest -q -p no:cacheprovider -m "not slow and not gpu" \
    tests/test_ops.py tests/test_pooling.py tests/test_shards.py tests/test_pack_labels.py \
    tests/test_config.py tests/test_package.py
}

demo_data() {
  run_in python tools/make_demo_data.py /smoke/data \
    && run_in python tools/pack_labels.py /smoke/data/relabel_pt /smoke/labels \
         --image-root /smoke/data/train --dtype float16 \
    && [[ -f "$workdir/data/manifest.json" ]] \
    || { echo "smoke.sh: demo data or labels missing under $workdir" >&2; return 1; }
}

train_one_epoch() {
  # The generator's label maps are in the 1000-class ImageNet space.
  local log="$workdir/train.log" rc
  run_in /usr/local/bin/relabel-train --config-file-path configs/demo.yaml --optim.epochs 1 \
    --data.data_path /smoke/data --data.relabel.path /smoke/labels --data.num_classes 1000 \
    --data.class_map imagenet --util.output_dir /smoke/runs 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  [[ $rc -eq 0 ]] || return "$rc"
  [[ -s "$workdir/runs/checkpoint-last.pth" ]] \
    || { echo "smoke.sh: no checkpoint-last.pth in the output folder $workdir/runs" >&2; return 1; }
  # A clean exit: no extension (triton's nanobind bindings) reporting objects left alive.
  ! grep -q "leaked" "$log" \
    || { echo "smoke.sh: the training run's exit reported leaked objects ($log):" >&2; grep -m 3 leaked "$log" >&2; return 1; }
}

pack_labels_help() {
  local out
  out=$(run_in python tools/pack_labels.py --help) || return
  grep -q '^usage: pack_labels.py' <<<"$out" \
    || { echo "smoke.sh: pack_labels.py --help printed no usage line" >&2; return 1; }
}

# buildah runs the steps in one working container with a writable root: afterwards its own layer
# (overlay driver: the diff folder next to the mount point) must hold no file outside /tmp.
nothing_written_outside_tmp() {
  local merged diff found
  merged=$(buildah mount "$container") || return
  diff=${merged%/merged}/diff
  if [[ "$merged" != */merged || ! -d "$diff" ]]; then
    buildah umount "$container" >/dev/null
    echo "smoke.sh: no overlay layer next to $merged (another storage driver?): not checked" >&2
    return 1
  fi
  found=$(find "$diff" -path "$diff/tmp" -prune -o \( -type f -o -type l \) -print | sed "s|^$diff||")
  buildah umount "$container" >/dev/null
  [[ -z "$found" ]] || { echo "smoke.sh: written into the container outside /tmp:" >&2; head -n 20 <<<"$found" >&2; return 1; }
}

echo "smoke.sh: image $image, tool $tool, user $user, shm $shm, workdir $workdir, CUDA backend expected: $cuda"
step "operator backends$([[ $cuda -eq 1 ]] && echo ' (CPU and CUDA)')" operator_backends
step "pytest fast subset" pytest_subset
step "demo data and label shards" demo_data
if [[ -f "$workdir/data/manifest.json" ]]; then
  step "train 1 epoch (torchrun entrypoint)" train_one_epoch
else
  results+=("FAIL  train 1 epoch (no demo data)"); failed=1
fi
step "pack_labels.py --help" pack_labels_help
# docker and podman ran every step on a read-only root file system already.
[[ "$tool" == buildah ]] && step "nothing written outside /tmp" nothing_written_outside_tmp

echo "=== smoke summary ($image)"
printf '%s\n' "${results[@]}"
if [[ $failed -eq 0 ]]; then echo "smoke.sh: PASS"; else echo "smoke.sh: FAIL"; fi
exit $failed
