#!/usr/bin/env bash
# One visit to a GPU machine does everything at once: build for the GPU present, check that a
# C++ argument error reaches Python as an exception, run the CUDA tests, the CUDA benchmarks,
# then the CPU tests of the torch integration. The GPU machines have torch, nvcc, cmake, ninja,
# scikit-build-core, pybind11 and pytest-xdist but no package registry, so it uses python3 as
# it is; wheels found in .whl/ (liger-kernel, cut-cross-entropy: benchmark peers) are installed
# into /tmp/site first.
#
# Time: a visit is short (15 device-minutes a session, machine start included), so the whole
# run keeps to DEADLINE seconds (default 540): every step's own limit is cut to what is left,
# and a step that no longer fits is skipped and says so. Benchmarks write their JSON row by row
# (`<name>.json.tmp`), so a step cut short still brings back the rows it measured.
#
# What comes back: the device tool returns at most 8 files, so the output folder ($1, else
# $OUT, else bench/results/gpu) gets run.log (the summary and every step's log), build.log, and
# results.tgz (the benchmarks' JSON / PNG and the test logs), written when the run ends.
#
# Compiler: the image's default C++ compiler there (/opt/gcc/bin/g++, GCC 13.3) built a module
# whose every C++ exception segfaulted inside the unwinder (2026-11-28, README "Status and
# limits"); the distribution's /usr/bin/g++ (also GCC 13.3) built one that works, so it is used
# when present, and the probe still guards against a crash.
#
# Usage on the device tool (the copy of .git there can be stale: pass the commit):
#   FASTLOSS_GIT_COMMIT=<short hash> bash bench/gpu_check.sh "$OUT"
# STEPS picks what runs after the build, in that order (default at the end); a second call on
# the still-warm machine can take the rest, e.g. STEPS="linear tcn sinkhorn losses" DEADLINE=200.
# Steps: sanitize, tests (or tests_tcn, tests_quant, tests_rest), profile (scripts/
# gpu_profile.py), the benchmarks distill, metric, pair, quant, linear, tcn, sinkhorn, losses,
# and cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUT_DIR"
RES=$(mktemp -d)          # benchmark JSON / PNG and per-step logs, packed into results.tgz
LOG="$OUT_DIR/run.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The image's torch may be older than the oldest tested (2.11 there in 2026-11): build anyway.
export FASTLOSS_ALLOW_OLD_TORCH=1
# Seconds of timed calls per benchmark row (harness.measure): short, so every family fits.
export FASTLOSS_BENCH_TARGET_S=${FASTLOSS_BENCH_TARGET_S:-0.1}
DEADLINE=${DEADLINE:-540}
T0=$SECONDS
left() { echo $((DEADLINE - (SECONDS - T0))); }
say() { echo "== [$((SECONDS - T0)) s] $*" | tee -a "$LOG"; }
# a step's exit status: logged, and counted when not 0 (the script's own status at the end)
FAILED=0
status() { local rc=$1; shift; say "$* rc=$rc"; [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1)); }
keep() { for f in "$@"; do { echo "===== $f"; cat "$RES/$f"; } >> "$LOG"; done; }
pack() { tar -C "$RES" -czf "$OUT_DIR/results.tgz" . 2> /dev/null; say "packed results.tgz"; }
trap pack EXIT
limit() {  # limit WANTED: seconds a step may take now (0 when it no longer fits)
  local l=$(( $(left) - 15 ))
  [ "$l" -lt 20 ] && { echo 0; return; }
  [ "$1" -lt "$l" ] && echo "$1" || echo "$l"
}

if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
  date -u; nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${FASTLOSS_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"; nvcc --version | tail -2
  echo "c++: $(command -v c++ g++ | tr '\n' ' ')"; nproc
} >> "$LOG" 2>&1

cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
sys_cxx=$(ls /usr/bin/g++ 2> /dev/null)
say "build for sm_$cap with ${sys_cxx:-the default compiler}"
cxx_env=()
[ -n "$sys_cxx" ] && cxx_env=(CXX="$sys_cxx" CUDAHOSTCXX="$sys_cxx")
env "${cxx_env[@]}" CUDAFLAGS="-Xptxas=-v" FASTLOSS_CUDA_ARCHS="$cap" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  timeout "$(limit 300)" "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
  >> "$OUT_DIR/build.log" 2>&1 || { say "BUILD FAILED"; tail -40 "$OUT_DIR/build.log" | tee -a "$LOG"; exit 1; }
say "built"
grep -E "registers|spill" "$OUT_DIR/build.log" | sort | uniq -c | sort -rn | head -4 | tee -a "$LOG"
if ! timeout 60 "$PY" scripts/check_exceptions.py 2>&1 | tail -3 | tee -a "$LOG"; then
  say "C++ exceptions crash: stopping (see README 'Status and limits')"
  exit 1
fi

XDIST=""
"$PY" -c "import xdist" 2> /dev/null && XDIST="-n $(( $(nproc) > 13 ? 12 : $(nproc) ))"
TIMEOUT=""
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT="--timeout 90"

bench() {  # bench NAME SCRIPT SECONDS [extra args]: bench/SCRIPT --device cuda
  local name=$1 script=$2 l
  l=$(limit "$3")
  shift 3
  [ "$l" -eq 0 ] && { say "$name benchmarks SKIPPED: no time left"; return 0; }
  say "$name benchmarks (limit $l s)"
  timeout "$l" "$PY" "bench/$script" --device cuda --out "$RES" "$@" > "$RES/bench_${name}_cuda.log" 2>&1
  status $? "$name bench"
  keep "bench_${name}_cuda.log"
}

sanitize() {  # a bad access reported with its kernel (memcheck works on the Firecracker machines)
  local l san
  l=$(limit 90)
  say "compute-sanitizer memcheck of scripts/gpu_sanitize.py ${SANITIZE:-tcn} (limit $l s)"
  CUDA_LAUNCH_BLOCKING=1 timeout "$l" "$PY" scripts/gpu_sanitize.py ${SANITIZE:-tcn} > "$RES/blocking.log" 2>&1
  status $? "plain run with CUDA_LAUNCH_BLOCKING=1"; tail -4 "$RES/blocking.log" | tee -a "$LOG"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1)
  timeout "$(limit 90)" "${san:-compute-sanitizer}" --tool memcheck --print-limit 20 "$PY" scripts/gpu_sanitize.py \
    ${SANITIZE:-tcn} > "$RES/sanitize.log" 2>&1
  status $? "memcheck"; grep -v "^ok " "$RES/sanitize.log" | head -60 | tee -a "$LOG"
  grep "^ok " "$RES/sanitize.log" | tail -2 | tee -a "$LOG"
}

cuda_tests() {  # cuda_tests NAME LIMIT FILES...: one pytest process (a bad access poisons its
  local name=$1 l  # CUDA context and every later test of that process fails with it)
  l=$(limit "$2")
  shift 2
  [ "$l" -eq 0 ] && { say "CUDA tests $name SKIPPED: no time left"; return 0; }
  say "CUDA tests $name (limit $l s)"
  timeout "$l" "$PY" -m pytest -q -m cuda -p no:cacheprovider $XDIST $TIMEOUT --durations=10 "$@" \
    > "$RES/tests_cuda_$name.log" 2>&1
  status $? "cuda tests $name"
  grep -E "^(FAILED|ERROR)" "$RES/tests_cuda_$name.log" | head -40 | tee -a "$LOG"
  tail -1 "$RES/tests_cuda_$name.log" | tee -a "$LOG"
}

profile() {  # where the time of the slow or unexplained calls goes (scripts/gpu_profile.py)
  local l
  l=$(limit 90)
  [ "$l" -eq 0 ] && { say "profile SKIPPED: no time left"; return 0; }
  say "profile (limit $l s)"
  timeout "$l" "$PY" scripts/gpu_profile.py > "$RES/profile.log" 2>&1
  status $? "profile"
  keep profile.log
}

cpu_tests() {
  [ "$(limit 60)" -eq 0 ] && { say "CPU tests SKIPPED: no time left"; return 0; }
  say "CPU tests of the torch integration and the argument checks"
  timeout "$(limit 60)" "$PY" -m pytest -q -m "not cuda" -p no:cacheprovider $XDIST $TIMEOUT \
    tests/test_bad_input.py tests/test_build.py \
    tests/test_losses.py -k "bad or opcheck or autocast or no_grad or twice or Every or build" \
    > "$RES/tests_cpu.log" 2>&1
  status $? "cpu tests"
  grep -E "^(FAILED|ERROR)" "$RES/tests_cpu.log" | head -10 | tee -a "$LOG"
  tail -1 "$RES/tests_cpu.log" | tee -a "$LOG"
}

# The steps, in the order STEPS names them. "tests" is the three CUDA test sets: the
# convolution apart (its half-precision forward faulted on the first GPU run), the low-bit
# GEMM, then the rest (the row losses, run at 5734ba4, last).
STEPS=${STEPS:-"tests profile losses quant linear distill pair metric tcn sinkhorn cpu"}
run_step() {
  case $1 in
    tests) run_step tests_tcn; run_step tests_quant; run_step tests_rest ;;
    sanitize) sanitize ;;
    profile) profile ;;
    tests_tcn) cuda_tests tcn 60 tests/test_tcn.py ;;
    tests_quant) cuda_tests quant 75 tests/test_quant.py ;;  # (52 tests: 38 s at f95b002)
    tests_rest)  # every other test file (a list by hand once left test_few_shot.py out)
      cuda_tests rest "${TESTS_TIMEOUT:-200}" $(ls tests/test_*.py | grep -v -e test_tcn.py \
        -e test_quant.py -e test_cuda_emulation.py) ;;
    distill) bench distill bench_distill.py 90 ;;
    metric) bench metric bench_metric_losses.py 60 ;;
    pair) bench pair bench_pair_losses.py 120 ;;
    quant) bench quant bench_quant.py 150 ;;
    linear) bench linear bench_linear_losses.py 180 ;;
    tcn) bench tcn bench_tcn.py 120 ;;
    sinkhorn) bench sinkhorn bench_sinkhorn.py 100 ;;
    losses) bench losses bench_losses.py 150 --kernels ;;
    cpu) cpu_tests ;;
    *) say "unknown step $1" ;;
  esac
}
for step in $STEPS; do run_step "$step"; done
say "done ($FAILED step(s) failed)"
[ "$FAILED" -eq 0 ]
