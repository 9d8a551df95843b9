"""Eager references of the fused linear losses: form the logits, then apply the reference loss.

``linear_loss(loss_fn, hidden, weight, target, bias, class_weight=..., **loss_kwargs)`` is
``loss_fn(hidden @ weight.T + bias, target, weight=class_weight, **loss_kwargs)`` with
``hidden [..., D]`` flattened to rows and ``reduction="none"`` reshaped to the target's
shape; everything in ``compute_dtype`` (float64 by default; None: the inputs' own dtype, the
unfused eager baseline).
"""

import torch

__all__ = ["linear_loss"]


def linear_loss(loss_fn, hidden, weight, target, bias=None, *, class_weight=None,
                compute_dtype=torch.float64, **loss_kwargs):
    cd = compute_dtype or hidden.dtype
    x = hidden.reshape(-1, hidden.shape[-1]).to(cd)
    logits = x @ weight.to(cd).T
    if bias is not None:
        logits = logits + bias.to(cd)
    out = loss_fn(logits, target.reshape(-1), weight=class_weight, compute_dtype=cd, **loss_kwargs)
    return out.reshape(target.shape) if loss_kwargs.get("reduction") == "none" else out
