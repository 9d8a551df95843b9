#!/usr/bin/env bash
# Runs fastloss's benchmarks on a fresh machine, set-up free: makes a virtual environment
# (.venv, or $FASTLOSS_VENV), installs torch from the package registry and the build tools,
# builds and installs the extension with --no-build-isolation (scripts/setup_venv.sh, as
# scripts/test.sh does), then runs every family's benchmark (bench/bench_losses.py,
# bench_linear_losses.py, bench_tcn.py, bench_pair_losses.py, bench_distill.py,
# bench_metric_losses.py, bench_quant.py, bench_sinkhorn.py); the arguments common to them are
# passed on (--device, --quick, --out DIR). Results: bench/results/*.json and *.png (the
# committed ones are overwritten: --out DIR keeps them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
# The peers the benchmarks compare with (optional: a row says "missing" when its package is
# not there): POT and GeomLoss (Sinkhorn; scikit-learn for the digits data), pytorch-tcn
# (dilated convolution), torchao (the low-bit GEMM; no runtime dependencies, so it leaves the
# installed torch alone); liger-kernel and Cut Cross-Entropy only run on a GPU.
peers="pot geomloss scikit-learn pytorch-tcn torchao"
if command -v nvidia-smi > /dev/null 2>&1; then peers="$peers liger-kernel cut-cross-entropy"; fi
# (with the installed torch pinned: a peer that asked for another torch would replace the one
# fastloss was just built against)
constraints="$(mktemp)"
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
for peer in $peers; do
  "$PY" -m pip install --quiet -c "$constraints" "$peer" \
    || echo "fastloss: $peer did not install; its rows are skipped" >&2
done
rm -f "$constraints"
for family in losses linear_losses tcn pair_losses distill metric_losses quant sinkhorn; do
  "$PY" "bench/bench_$family.py" "$@"
done
