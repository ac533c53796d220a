#!/usr/bin/env bash
# `make docker-smoke`: build docker/Dockerfile's CPU image, run it and check it from outside
# (tests/service/test_docker_image.py: /healthz and start time, HEALTHCHECK, non-root, a prediction, a job).
#   ENGINE=podman|docker   default: podman when installed, else docker
#   IMAGE=wsi-mil:cpu      the tag built and tested
#   TORCH_INDEX=URL        where the CPU image takes torch (default: PyTorch's CPU index). When that index
#                          cannot be reached, or TORCH_INDEX is set empty, the image gets the lock's PyPI
#                          torch (the CUDA build: several GB larger, still runs on the CPU), and it says so.
# No container engine? On Debian as root, the team's ../shared/tools/container-base.sh installs podman and
# a local base image for machines without a container registry.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
command -v "$engine" >/dev/null 2>&1 || { echo "docker-smoke: neither podman nor docker is installed" >&2; exit 2; }
image=${IMAGE:-wsi-mil:cpu}
conf=/var/tmp/wsi-mil-containers/containers.conf  # written by container-base.sh (runc, ulimits)
if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ -f "$conf" ]; then export CONTAINERS_CONF=$conf; fi

torch_index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
if [ -n "$torch_index" ] && ! python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
    "${torch_index%/}/torch/" >/dev/null 2>&1; then
  echo "docker-smoke: $torch_index cannot be reached: building with the lock's PyPI torch (CUDA build, larger image)" >&2
  torch_index=""
fi

build=(build -f docker/Dockerfile --build-arg "TORCH_INDEX=$torch_index" -t "$image")
if [ "$engine" = podman ]; then
  # docker format keeps the HEALTHCHECK (OCI images drop it); podman reads no <Dockerfile>.dockerignore itself
  build+=(--format docker --ignorefile docker/Dockerfile.dockerignore)
  if podman image exists python:3.11-slim-bookworm; then build+=(--pull=never); fi
fi
started=$(date +%s)
"$engine" "${build[@]}" .
echo "docker-smoke: built $image in $(($(date +%s) - started)) s"

export WSI_MIL_CONTAINER_ENGINE=$engine WSI_MIL_IMAGE=$image
export WSI_MIL_IMAGE_CUDA_TORCH=$([ -z "$torch_index" ] && echo 1 || echo 0)
exec uv run --locked --extra dev pytest -q -s -p no:cacheprovider -m container tests/service/test_docker_image.py
