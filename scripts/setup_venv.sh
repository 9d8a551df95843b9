# Sourced by scripts/test.sh and scripts/bench.sh: creates/updates the venv and installs
# fastloss into it. Sets PY to the venv's python.
VENV="${FASTLOSS_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet "torch${FASTLOSS_TORCH_SPEC:-}" scikit-build-core pybind11 cmake ninja \
    pytest numpy scipy matplotlib pytorch-metric-learning
if [ -z "${FASTLOSS_CUDA_ARCHS:-}" ]; then
  # Build for the GPU that is here (fast); a wheel build sets the list itself.
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.' || true)
  export FASTLOSS_CUDA_ARCHS="${cap:-90}"
fi
echo "fastloss: building (CUDA archs if CUDA: $FASTLOSS_CUDA_ARCHS)"
"$PY" -m pip install --quiet --no-build-isolation .
# A module whose C++ exceptions crash (the GPU machines' default compiler, /opt/gcc/bin/g++,
# built one; see README "Status and limits") is rebuilt once with the system's g++.
if ! "$PY" scripts/check_exceptions.py; then
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
fi
