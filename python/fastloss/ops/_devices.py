"""Which devices have fastloss kernels in this build (the families' routing rule)."""

from __future__ import annotations

from torch import Tensor

from .. import _C


def has_kernel(x: Tensor) -> bool:
    """Whether a fastloss kernel runs on x's device: the CPU always, CUDA in a CUDA build.
    Elsewhere (or CUDA tensors with a CPU-only build) the families use torch operations."""
    return x.device.type == "cpu" or (x.device.type == "cuda" and bool(_C.built_with_cuda))
