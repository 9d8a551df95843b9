#!/usr/bin/env bash
# Runs fastloss's benchmarks on a fresh machine, set-up free: makes a virtual environment
# (.venv, or $FASTLOSS_VENV), installs torch from the package registry and the build tools,
# builds and installs the extension with --no-build-isolation (scripts/setup_venv.sh, as
# scripts/test.sh does), then runs every family's benchmark (bench/bench_losses.py,
# bench_linear_losses.py, bench_tcn.py, bench_pair_losses.py, bench_distill.py,
# bench_metric_losses.py, bench_quant.py, bench_sinkhorn.py); the arguments common to them are
# passed on (--device, --quick, --out DIR). Results: bench/results/*.json and *.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
for family in losses linear_losses tcn pair_losses distill metric_losses quant sinkhorn; do
  "$PY" "bench/bench_$family.py" "$@"
done
