#!/bin/sh
# Install wsi-mil into the image's virtual environment /app/.venv, reconciled with uv.lock:
#   install-locked.sh deps [TORCH_INDEX]   every locked dependency, from uv.lock with its hash
#   install-locked.sh project              the wsi_mil package itself (not editable, no dependencies)
# With TORCH_INDEX (PyTorch's CPU wheel index), torch and torchvision are installed at the versions
# uv.lock pins but as that index's CPU builds (their hashes are not in uv.lock, which records PyPI's
# CUDA builds), and the CUDA-only packages PyPI's torch requires (nvidia-*, cuda-*, triton) are left
# out. Without it, the environment is exactly the lock's (PyPI's torch, the CUDA build).
set -eu
venv=/app/.venv
export VIRTUAL_ENV="$venv"
case "${1:-}" in
  deps)
    torch_index=${2:-}
    uv venv --python python3 "$venv"
    locked=$(uv export --locked --no-emit-project --no-hashes --format requirements.txt)
    skip=""
    if [ -n "$torch_index" ]; then
      for name in torch torchvision $(printf '%s\n' "$locked" | sed -n -E 's/^((nvidia|cuda)-[a-z0-9-]+|triton)==.*/\1/p'); do
        skip="$skip --no-emit-package $name"
      done
    fi
    # shellcheck disable=SC2086  # $skip is a list of options
    uv export --locked --no-emit-project --format requirements.txt $skip -o /tmp/locked-requirements.txt
    uv pip install --no-deps --require-hashes -r /tmp/locked-requirements.txt
    if [ -n "$torch_index" ]; then
      pins=$(printf '%s\n' "$locked" | sed -n -E 's/^((torch|torchvision)==[^ ;]+).*/\1/p')
      # shellcheck disable=SC2086  # $pins is a list of requirements
      uv pip install --no-deps --index-url "$torch_index" $pins
    fi
    "$venv/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    ;;
  project)
    uv pip install --no-deps .
    "$venv/bin/python" -c "import timm, wsi_mil.service, wsi_mil.cli; print('wsi_mil', wsi_mil.__version__)"
    ;;
  *)
    echo "usage: install-locked.sh deps [TORCH_INDEX] | project" >&2
    exit 2
    ;;
esac
