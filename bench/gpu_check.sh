#!/usr/bin/env bash
# The GPU check: correctness of the GPU path, the attention benchmark beside
# every peer and one FLUX step, in at most 300 s on an H100/H200 (the script
# holds itself to that from here on), at most 8 files out, nothing fetched.
#   bench/gpu_check.sh            # results in $OUT if set, else bench/results/gpu-<date>/
#   bench/gpu_check.sh --dry      # CPU, tiny shapes, every section (CI); also GPU_CHECK_DRY=1
# More options: bench/gpu_check.sh --help. See bench/README.md, "GPU check".
set -euo pipefail
export GPU_CHECK_START="${GPU_CHECK_START:-$(date +%s.%N)}"  # the deadline counts Python's start-up too
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
