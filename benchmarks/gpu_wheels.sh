#!/usr/bin/env bash
# Fetch, here, the wheels benchmarks/gpu_check.sh installs on a GPU machine whose image has
# torch, transformers, triton and safetensors but not the rest of the package's runtime
# dependencies that the engine imports (about 5 MiB; Python 3.12, x86_64). Carry .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions \
    redis xgrammar apache-tvm-ffi
du -sh .whl
