#!/usr/bin/env bash
# The GPU check: correctness of the GPU path, the attention benchmark beside
# every peer and one FLUX step, in one run of under 8 minutes on an H100/H200.
#   bench/gpu_check.sh            # results in $OUT if set, else bench/results/gpu-<date>/
#   bench/gpu_check.sh --dry      # CPU, tiny shapes, every code path (CI); also GPU_CHECK_DRY=1
# More options: bench/gpu_check.sh --help. See bench/README.md, "GPU check".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
command -v "$py" >/dev/null || py=python3
# The scripts import the package as comfyui_clear: where it is not installed,
# point a throwaway folder's comfyui_clear link at this checkout.
if ! (cd /tmp && "$py" -c "import comfyui_clear" 2>/dev/null); then
    link="$(mktemp -d)"
    trap 'rm -rf "$link"' EXIT
    ln -s "$repo" "$link/comfyui_clear"
    export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$repo"
"$py" bench/gpu_check.py "$@"
