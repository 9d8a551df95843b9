#!/usr/bin/env bash
# One visit to a GPU machine does everything at once: build for the GPU present, run the CUDA
# tests, run the CUDA benchmarks, then the rest of the tests, and leave logs, JSON and PNG in
# one folder ($1, else $OUT, else bench/results/gpu). The GPU machines have torch, nvcc, cmake,
# ninja, scikit-build-core, pybind11 and pytest-xdist but no package registry, so it uses
# python3 as it is; wheels found in .whl/ (e.g. liger-kernel, a benchmark peer) are installed
# into /tmp/site first. Each step has its own time limit so that one slow step cannot eat
# the device lease. Usage on the device tool: bash bench/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$SECONDS
stamp() { echo "== [$((SECONDS - T0)) s] $*"; }

if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
  date -u; nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null; nvcc --version | tail -2
} > "$OUT_DIR/env.txt" 2>&1

cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
stamp "build for sm_$cap"
CUDAFLAGS="-Xptxas=-v" FASTLOSS_CUDA_ARCHS="$cap" timeout 400 "$PY" -m pip install -v \
  --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1 \
  || { tail -40 "$OUT_DIR/build.log"; exit 1; }
grep -E "registers|spill" "$OUT_DIR/build.log" | sort | uniq -c | sort -rn | head -5

XDIST=""
"$PY" -c "import xdist" 2> /dev/null && XDIST="-n 8"
TIMEOUT=""
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT="--timeout 300"

stamp "CUDA tests"
timeout 300 "$PY" -m pytest -q -m cuda $XDIST $TIMEOUT tests > "$OUT_DIR/tests_cuda.log" 2>&1
echo "cuda tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests_cuda.log" | head -30
tail -1 "$OUT_DIR/tests_cuda.log"

stamp "benchmarks"
timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/bench_losses.py --device cuda --out "$OUT_DIR" \
  > "$OUT_DIR/bench_cuda.log" 2>&1
echo "bench rc=$?"

stamp "all other tests"
timeout 200 "$PY" -m pytest -q -m "not cuda" $XDIST $TIMEOUT tests > "$OUT_DIR/tests_cpu.log" 2>&1
echo "cpu tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests_cpu.log" | head -10
tail -1 "$OUT_DIR/tests_cpu.log"
stamp "done"
tail -4 "$OUT_DIR/bench_cuda.log"   # the full table is in bench_cuda.log and the JSON
