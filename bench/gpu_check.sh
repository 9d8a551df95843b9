#!/usr/bin/env bash
# One visit to a GPU machine does everything at once: build for the GPU present, run the whole
# test suite (the CUDA tests included), run the CUDA benchmarks, and leave logs, JSON and PNG
# in one folder ($1, else $OUT, else bench/results/gpu). The GPU machines have torch, nvcc,
# cmake, ninja, scikit-build-core and pybind11 but no package registry, so it uses python3 as
# it is. Usage on the device tool: bash bench/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
{
  date -u; nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT_DIR/env.txt" 2>&1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
echo "== build for sm_$cap"
FASTLOSS_CUDA_ARCHS="$cap" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1 \
  || { tail -40 "$OUT_DIR/build.log"; exit 1; }
echo "== tests (CUDA first)"
"$PY" -m pytest -q -x tests -m cuda > "$OUT_DIR/tests_cuda.log" 2>&1; echo "cuda tests rc=$?"; tail -3 "$OUT_DIR/tests_cuda.log"
"$PY" -m pytest -q tests > "$OUT_DIR/tests_all.log" 2>&1; echo "all tests rc=$?"; tail -3 "$OUT_DIR/tests_all.log"
echo "== benchmarks"
"$PY" bench/bench_losses.py --device cuda --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench_cuda.log" | tail -40
