# Sourced by the scripts in docker/: picks the container tool that can build here.
# CONTAINER_TOOL (buildah, podman or docker) forces one. A docker client without a reachable
# daemon does not count.

pick_container_tool() {
  if [[ -n "${CONTAINER_TOOL:-}" ]]; then
    case "$CONTAINER_TOOL" in
      docker|podman|buildah) ;;
      *) echo "CONTAINER_TOOL must be docker, podman or buildah, not '$CONTAINER_TOOL'" >&2; return 1 ;;
    esac
    command -v "$CONTAINER_TOOL" >/dev/null || { echo "CONTAINER_TOOL=$CONTAINER_TOOL is not installed" >&2; return 1; }
    echo "$CONTAINER_TOOL"; return 0
  fi
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return 0; fi
  if command -v podman >/dev/null; then echo podman; return 0; fi
  if command -v buildah >/dev/null; then echo buildah; return 0; fi
  echo "none of docker (with a running daemon), podman or buildah is installed" >&2
  return 1
}
