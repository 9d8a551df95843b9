#!/usr/bin/env bash
# Runs fastloss's tests on a fresh machine, set-up free: makes a virtual environment (.venv,
# or $FASTLOSS_VENV), installs torch from the package registry and the build tools, builds
# and installs the extension with --no-build-isolation, then runs pytest (arguments are
# passed on). The CUDA kernels are built when the installed torch has CUDA and nvcc exists;
# CUDA tests run when a GPU is visible and are skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
"$PY" -m pytest -q "$@"
