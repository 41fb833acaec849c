#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels (array-api-compat, fla-core),
# run the GPU tests, then the peer benchmark; logs and JSON go to $OUT.
#
#   bash docs/scripts/gpu_session.sh [--shapes quick] [--dtypes bf16 fp32] ...
#
# TEST_TIMEOUT and BUDGET (seconds) bound the two parts; SKIP_TESTS=1 runs the benchmark only.
set -uo pipefail
OUT=${OUT:-/tmp/linattn-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import cupy, torch, triton; print('cupy', cupy.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # six workers: the kernels compile (NVRTC) on first use, in parallel across processes
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/gpu -q -p no:cacheprovider -p no:benchmark -n 6 --maxfail=15 -rs 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -40
fi
python3 docs/scripts/gpu_peers.py --json "$OUT/gpu_peers.json" --budget "${BUDGET:-300}" "$@" 2>&1 \
  | tee "$OUT/gpu_peers.log" | tail -70
