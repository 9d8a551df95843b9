#!/usr/bin/env bash
# One visit to a GPU machine does everything at once: build for the GPU present, check that a
# C++ argument error reaches Python as an exception, run the CUDA tests, the CUDA benchmarks,
# then the CPU tests of the torch integration, and leave logs, JSON and PNG in one folder ($1,
# else $OUT, else bench/results/gpu). The GPU machines have torch, nvcc, cmake, ninja,
# scikit-build-core, pybind11 and pytest-xdist but no package registry, so it uses python3 as
# it is; wheels found in .whl/ (e.g. liger-kernel, a benchmark peer) are installed into
# /tmp/site first. Each step has its own time limit so that one slow step cannot eat the lease.
#
# Compiler: the image's default C++ compiler there (/opt/gcc/bin/g++, GCC 13.3) built a module
# whose every C++ exception segfaulted inside the unwinder (2026-11-28, bench/results notes);
# the distribution's /usr/bin/g++ (also GCC 13.3) built one that works, so it is used when
# present, and the probe still guards against a crash.
#
# Usage on the device tool (the copy of .git there can be stale: pass the commit):
#   FASTLOSS_GIT_COMMIT=<short hash> bash bench/gpu_check.sh "$OUT"
# or in two calls, STEPS="tests" then STEPS="losses tcn sinkhorn distill" (see STEPS below).
# The device tool brings back only a few files: the step logs are appended to one run.log
# (build.log apart), next to the benchmarks' JSON and PNG.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUT_DIR"
LOGS=$(mktemp -d)   # per-step logs; each is appended to $OUT_DIR/run.log when its step ends
keep() { for f in "$@"; do { echo "===== $f"; cat "$LOGS/$f"; } >> "$OUT_DIR/run.log"; done; }
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
  echo "c++: $(command -v c++ g++ | tr '\n' ' ')"; g++ -v 2>&1 | tail -2; ls /usr/bin/*g++* 2>&1
} > "$LOGS/env.txt" 2>&1
keep env.txt

cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
build() {  # build [extra env...]: an editable install for this GPU only
  env "$@" CUDAFLAGS="-Xptxas=-v" FASTLOSS_CUDA_ARCHS="$cap" timeout 300 "$PY" -m pip install -v \
    --no-build-isolation --no-deps -e . >> "$OUT_DIR/build.log" 2>&1 \
    || { tail -40 "$OUT_DIR/build.log"; exit 1; }
}
probe() { timeout 60 "$PY" scripts/check_exceptions.py 2>&1 | tail -3; return "${PIPESTATUS[0]}"; }
so() { ls python/fastloss/_C*.so build/*/_C*.so 2>/dev/null | head -n 1; }

sys_cxx=$(ls /usr/bin/g++ 2> /dev/null)
stamp "build for sm_$cap with ${sys_cxx:-the default compiler}"
if [ -n "$sys_cxx" ]; then build CXX="$sys_cxx" CUDAHOSTCXX="$sys_cxx"; else build; fi
grep -E "registers|spill" "$OUT_DIR/build.log" | sort | uniq -c | sort -rn | head -4
if ! probe; then
  echo "C++ exceptions crash: diagnostics in crash.txt"
  { readelf -lW "$(so)" | grep -i eh_frame
    timeout 45 cuda-gdb -q -batch -ex run -ex bt --args "$PY" scripts/check_exceptions.py 2>&1 | tail -40
  } > "$OUT_DIR/crash.txt" 2>&1
fi

XDIST=""
"$PY" -c "import xdist" 2> /dev/null && XDIST="-n 8"
TIMEOUT=""
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT="--timeout 120"

# STEPS picks what runs after the build (default: everything, which takes longer than one
# 10-minute device call): e.g. STEPS="tests" first, then STEPS="losses tcn sinkhorn distill metric pair" on
# the still-warm machine, where the build is incremental. Each step has its own time limit.
STEPS=${STEPS:-"tests losses linear quant tcn sinkhorn distill metric pair cpu"}
want() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
bench() {  # bench NAME SCRIPT SECONDS [extra args]: bench/SCRIPT --device cuda, if NAME is in STEPS
  local name=$1 script=$2 limit=$3
  shift 3
  want "$name" || return 0
  stamp "$name benchmarks"
  timeout "$limit" "$PY" "bench/$script" --device cuda --out "$OUT_DIR" "$@" \
    > "$LOGS/bench_${name}_cuda.log" 2>&1
  echo "$name bench rc=$?"
  keep "bench_${name}_cuda.log"
  tail -3 "$LOGS/bench_${name}_cuda.log"   # the full tables are in run.log and the JSON
}

if want tests; then
  stamp "CUDA tests"
  timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -m cuda $XDIST $TIMEOUT tests > "$LOGS/tests_cuda.log" 2>&1
  echo "cuda tests rc=$?"; grep -E "^(FAILED|ERROR)" "$LOGS/tests_cuda.log" | head -20
  tail -1 "$LOGS/tests_cuda.log"
  keep tests_cuda.log
fi

bench losses bench_losses.py "${BENCH_TIMEOUT:-180}" --kernels
bench linear bench_linear_losses.py "${LINEAR_BENCH_TIMEOUT:-150}"
bench quant bench_quant.py "${QUANT_BENCH_TIMEOUT:-150}"
bench tcn bench_tcn.py "${TCN_BENCH_TIMEOUT:-150}"
bench sinkhorn bench_sinkhorn.py "${SINKHORN_BENCH_TIMEOUT:-120}"
bench distill bench_distill.py "${DISTILL_BENCH_TIMEOUT:-150}"
bench metric bench_metric_losses.py "${METRIC_BENCH_TIMEOUT:-120}"
bench pair bench_pair_losses.py "${PAIR_BENCH_TIMEOUT:-150}"

if want cpu; then
  stamp "CPU tests of the torch integration and the argument checks"
  # (torch.compile on the CPU is left out: ~250 CPU tests took over 90 s there; the CUDA step
  # already compiles a graph of every loss)
  timeout 120 "$PY" -m pytest -q -m "not cuda" $XDIST $TIMEOUT tests/test_bad_input.py tests/test_build.py \
    tests/test_losses.py -k "bad or opcheck or autocast or no_grad or twice or Every or build" \
    > "$LOGS/tests_cpu.log" 2>&1
  echo "cpu tests rc=$?"; grep -E "^(FAILED|ERROR)" "$LOGS/tests_cpu.log" | head -10
  tail -1 "$LOGS/tests_cpu.log"
  keep tests_cpu.log
fi
stamp "done"
