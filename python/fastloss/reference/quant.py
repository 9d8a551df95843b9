"""Eager float64 reference of the packed low-bit format: unpacking written from the format's
definition (python/fastloss/ops/quant.py docstring) value by value, independently of the
kernels and of the packing code."""

import torch

__all__ = ["unpack_codes", "unpack_weight"]


def unpack_codes(qweight, bits, group):
    """The codes q [N, K] (int64): value j * P + i of a group (P = group / planes) is read from
    bit field j of the group's byte i; 3-bit codes join a 2-bit field and a 1-bit field."""
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    b = qweight.to(torch.int64).reshape(n, k // group, group * bits // 8)
    q = torch.empty(n, k // group, group, dtype=torch.int64)
    if bits == 3:
        p = group // 8
        for v in range(group):
            j, i = divmod(v, p)
            low = (b[:, :, (j % 2) * p + i] >> (2 * (j // 2))) & 3
            high = (b[:, :, 2 * p + i] >> j) & 1
            q[:, :, v] = low + 4 * high
    else:
        p = group * bits // 8
        for v in range(group):
            j, i = divmod(v, p)
            q[:, :, v] = (b[:, :, i] >> (j * bits)) % (1 << bits)
    return q.reshape(n, k)


def unpack_weight(qweight, scales, zeros, bits, group, codebook=None):
    """w[n, k] = (v - zeros[n, k // group]) * scales[n, k // group], v = q[n, k] or
    codebook[c, q[n, k]] (c = 0 or n), float64."""
    q = unpack_codes(qweight, bits, group)
    if codebook is None:
        v = q.double()
    else:
        cb = codebook.double().expand(q.shape[0], -1)
        v = cb.gather(1, q)
    idx = torch.arange(q.shape[1], device=q.device) // group
    z = zeros.double()[:, idx] if zeros is not None else 0.0
    return (v - z) * scales.double()[:, idx]
