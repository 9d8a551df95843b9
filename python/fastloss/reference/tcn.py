"""Eager reference of the dilated convolution, from its formula (not F.conv1d):
y[b, c, t] = bias[c] + sum_k w[c, k] x[b, c, t - P + k d], x zero outside [0, L)."""

import torch

__all__ = ["dilated_conv1d"]


def dilated_conv1d(x, weight, bias=None, dilation=1, causal=True, *, compute_dtype=torch.float64):
    """Depthwise ``weight [C, K]``; computed in ``compute_dtype`` (None: x's dtype)."""
    cd = compute_dtype or x.dtype
    x, w = x.to(cd), weight.to(cd)
    k = w.shape[1]
    span = dilation * (k - 1)
    pad = span if causal else span // 2
    length = x.shape[2]
    xp = torch.nn.functional.pad(x, (pad, span - pad))   # zeros outside [0, L)
    y = sum(w[None, :, j, None] * xp[:, :, j * dilation: j * dilation + length] for j in range(k))
    return y + bias.to(cd)[None, :, None] if bias is not None else y
