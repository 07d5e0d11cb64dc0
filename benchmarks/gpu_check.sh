#!/usr/bin/env bash
# The first run on a GPU, in one command: benchmarks/gpu.py on CUDA (the 1B and 8B shapes),
# the table and last-line JSON written to $OUT (where the device tool collects files; else
# benchmarks/gpu-results/). Arguments go to gpu.py (e.g. --shapes 1b). Budget: under 8 minutes
# on one H200; gpu.py is stopped at 7m50s.
#
# Needs torch (CUDA), transformers, triton and safetensors, as a GPU image has them, plus the
# package's other runtime dependencies: where they are missing, carry them as wheels in .whl/
# (benchmarks/gpu_wheels.sh fetches them), installed here into a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu-results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vbserve-site .whl/*.whl
    export PYTHONPATH="/tmp/vbserve-site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$py" - <<'PY' | tee "$out/versions.txt"
import torch, transformers, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, triton {triton.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
set -o pipefail
timeout 470 "$py" benchmarks/gpu.py "$@" 2> >(tee "$out/gpu.log" >&2) | tee "$out/gpu.md"
tail -n 1 "$out/gpu.md" > "$out/gpu.json"
