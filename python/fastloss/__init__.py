"""fastloss: hand-written CUDA and AVX2 kernels for fused losses, as PyTorch ops.

Functions live in :mod:`fastloss.ops`, modules in :mod:`fastloss.nn`, and the plain eager
float64 references every kernel is tested against in :mod:`fastloss.reference`.
"""

import os
import warnings

import torch  # noqa: F401  (loads libtorch before the extension that links it)

try:
    from . import _C
except ImportError as e:  # (the raw message names a symbol or a file, not the cause)
    raise ImportError(
        f"fastloss: its compiled module (fastloss._C) does not load with torch {torch.__version__}: "
        f"{e}. It is built against the torch installed when it was built: rebuild it with this "
        "torch (pip install --no-build-isolation --force-reinstall --no-deps .)") from e
from . import ops, nn, reference

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this installation."""
    return bool(_C.built_with_cuda)


def cuda_available() -> bool:
    """Whether fastloss can run on a GPU here: CUDA kernels built and a device visible."""
    return built_with_cuda() and torch.cuda.is_available()


def cuda_archs() -> list[str]:
    """The CUDA architectures the kernels were compiled for (empty without CUDA)."""
    return [a for a in str(_C.cuda_archs).split(",") if a]


def cpu_isas() -> list[str]:
    """The CPU kernel paths this machine can run, best last."""
    return (["generic"] + (["avx2"] if _C.cpu_supports_avx2() else [])
            + (["avx512"] if _C.cpu_supports_avx512() else [])
            + (["amx"] if _C.cpu_supports_amx() else []))


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: ``"amx"``, ``"avx512"``, ``"avx2"`` or
    ``"generic"``. ``"amx"`` is the AVX-512 kernels plus the tile products of the low-bit
    GEMM: AMX-INT8 for batches of 1-16 of the uniform 2-, 3-, 4- and 8-bit formats (x in fixed
    point per group, exact integer sums; the groups it reads are in the README), AMX-BF16 for
    larger batches and the other uniform groups from 8 rows (exact float32 products; see
    ``ops.dequant_gemm``)."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Choose the CPU kernels: ``"auto"`` (the best this CPU has), or one of :func:`cpu_isas`.

    The environment variable ``FASTLOSS_CPU_ISA=generic`` (or ``avx2``, ``avx512``) does the
    same at start-up.
    """
    if not _C.set_cpu_isa(name):
        raise ValueError(f"set_cpu_isa: {name!r} is not available here; expected 'auto' or one "
                         f"of {cpu_isas()}")


# FASTLOSS_CPU_ISA is read by the compiled module at start-up; a value it cannot use (a typo, a
# level this CPU lacks) leaves the best level in place, which set_cpu_isa would refuse: say so.
_asked = os.environ.get("FASTLOSS_CPU_ISA", "")
if _asked and _asked != "auto" and _asked != cpu_isa():
    warnings.warn(f"fastloss: FASTLOSS_CPU_ISA={_asked!r} is not one of this CPU's levels "
                  f"{cpu_isas()} (or 'auto'); using {cpu_isa()!r}", RuntimeWarning, stacklevel=2)

__all__ = [
    "ops",
    "nn",
    "reference",
    "built_with_cuda",
    "cuda_available",
    "cuda_archs",
    "cpu_isa",
    "cpu_isas",
    "set_cpu_isa",
]
