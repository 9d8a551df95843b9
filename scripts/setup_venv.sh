# Sourced by scripts/test.sh and scripts/bench.sh: creates/updates the venv and installs
# fastloss into it. Sets PY to the venv's python. Settings (environment): FASTLOSS_VENV (the
# venv's folder, .venv), FASTLOSS_PYTHON (the interpreter that makes it, python3),
# FASTLOSS_TORCH_SPEC (a version specifier appended to "torch", e.g. "==2.14.1"),
# FASTLOSS_TORCH_INDEX (a package index for torch alone, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build: plain `pip install torch` on Linux
# x86-64 fetches the CUDA build and its libraries, several GB), FASTLOSS_CUDA_ARCHS.
VENV="${FASTLOSS_VENV:-.venv}"
BASE_PY="${FASTLOSS_PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  # (pyproject.toml asks for 3.10+: an older interpreter would first download an old torch)
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "fastloss: $BASE_PY is Python $("$BASE_PY" -c 'import platform; print(platform.python_version())'); 3.10 or newer is needed (FASTLOSS_PYTHON=...)" >&2; exit 1; }
  "$BASE_PY" -m venv "$VENV" \
    || { echo "fastloss: could not make a virtual environment with $BASE_PY (Debian / Ubuntu: install python3-venv)" >&2; exit 1; }
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet ${FASTLOSS_TORCH_INDEX:+--index-url "$FASTLOSS_TORCH_INDEX"} "torch${FASTLOSS_TORCH_SPEC:-}"
"$PY" -m pip install --quiet scikit-build-core pybind11 cmake ninja \
    pytest numpy scipy matplotlib pytorch-metric-learning
if [ -z "${FASTLOSS_CUDA_ARCHS:-}" ]; then
  # Build for the GPU that is here (fast); without one, for sm_90 (CUDA torch and nvcc: the
  # kernels are still compiled); a wheel build sets the list itself.
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ' || true)
  [[ "$cap" =~ ^[0-9]+$ ]] || cap=  # (a failing nvidia-smi prints its error on stdout)
  export FASTLOSS_CUDA_ARCHS="${cap:-90}"
fi
echo "fastloss: building (CUDA archs if CUDA: $FASTLOSS_CUDA_ARCHS)"
"$PY" -m pip install --quiet --no-build-isolation .
"$PY" -c 'import fastloss' \
  || { echo "fastloss: the module built but does not import (see the error above)" >&2; exit 1; }
# A module whose C++ exceptions crash (the GPU machines' default compiler, /opt/gcc/bin/g++,
# built one; see README "Status and limits") is rebuilt once with the system's g++: only when
# the check dies from a signal (exit status 128 + n), not when it fails otherwise.
check_rc=0
"$PY" scripts/check_exceptions.py || check_rc=$?
if [ "$check_rc" -ge 128 ]; then
  if [ -x /usr/bin/g++ ] && [ "${CXX:-}" != /usr/bin/g++ ]; then
    echo "fastloss: C++ errors crash the module built with ${CXX:-the default compiler};" \
         "rebuilding with /usr/bin/g++" >&2
    rm -rf build
    CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ "$PY" -m pip install --quiet --no-build-isolation \
        --no-deps --force-reinstall .
    "$PY" scripts/check_exceptions.py \
      || { echo "fastloss: C++ errors still crash; see README 'Status and limits'" >&2; exit 1; }
  else
    echo "fastloss: C++ errors crash this build; see README 'Status and limits'" >&2
    exit 1
  fi
elif [ "$check_rc" -ne 0 ]; then
  echo "fastloss: scripts/check_exceptions.py failed (status $check_rc; see above)" >&2
  exit 1
fi
