"""Eager float64 reference of the packed low-bit format: unpacking written from the format's
definition (python/fastloss/ops/quant.py docstring), independently of the kernels."""

import torch

__all__ = ["unpack_weight"]


def unpack_weight(qweight, scales, zeros, bits, group):
    """w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group], float64."""
    n = qweight.shape[0]
    b = qweight.to(torch.int64)
    if bits == 8:
        q = b
    else:
        k = qweight.shape[1] * 2
        q = torch.empty(n, k, dtype=torch.int64)
        half = group // 2
        for g in range(k // group):
            byte = b[:, g * half:(g + 1) * half]
            q[:, g * group:g * group + half] = byte % 16
            q[:, g * group + half:(g + 1) * group] = byte // 16
    idx = torch.arange(q.shape[1]) // group
    return (q.double() - zeros.double()[:, idx]) * scales.double()[:, idx]
