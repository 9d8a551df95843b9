"""Pair-based losses computed without materializing the pair matrix.

``mw_auc_loss(scores_pos, scores_neg)``: the Mann-Whitney (AUC) surrogate, binary
cross-entropy of ``sigmoid(s_i - s_j)`` against 1 over every positive-negative pair of a
query, averaged over the pairs:

.. math:: \\ell_b = \\frac{1}{P N}\\sum_{i=1}^{P}\\sum_{j=1}^{N} \\log(1 + e^{s^-_j - s^+_i})

``scores_pos`` ``[P]`` and ``scores_neg`` ``[N]`` are one query; ``[B, P]`` and ``[B, N]`` are
``B`` queries (the per-query form). The CPU kernel (``csrc/pair_losses``) forms the loss and
both gradients in one pass over the pairs with O(B (P + N)) memory; the CUDA kernels in two
(a thread per positive, then a thread per negative, each walking the other side's scores staged
in shared memory); eager PyTorch would build the ``[B, P, N]`` matrix (and keep it for
backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._devices import has_kernel
from ._autograd import once_differentiable
from ._dtypes import as_loss_dtype, call_rounding, fake_loss

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("fastloss::mw_auc_forward")
def _fake_auc(scores_pos, scores_neg, compute_grad):
    torch._check(scores_pos.dim() == 2 and scores_neg.dim() == 2
                 and scores_pos.shape[0] == scores_neg.shape[0],
                 lambda: "scores_pos and scores_neg must be [B, P] and [B, N]")
    b = scores_pos.shape[0]
    f32 = torch.float32
    return (scores_pos.new_empty((b,), dtype=f32),
            scores_pos.new_empty(scores_pos.shape if compute_grad else (0,), dtype=f32),
            scores_neg.new_empty(scores_neg.shape if compute_grad else (0,), dtype=f32))


_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


@torch.library.register_fake("fastloss::mw_auc_loss")
def _fake_auc_loss(scores_pos, scores_neg, reduction, round_loss=False):
    _fake_auc(scores_pos, scores_neg, False)
    return fake_loss(scores_pos, (scores_pos.shape[0],) if reduction == 0 else (), round_loss)


def _setup(ctx, inputs, output):
    pos, neg, compute_grad = inputs
    _, grad_pos, grad_neg = output
    ctx.save_for_backward(grad_pos, grad_neg)
    ctx.dtypes = (pos.dtype, neg.dtype)
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(grad_pos, grad_neg)


@once_differentiable("mw_auc_loss")
def _backward(ctx, grad_loss, _g1, _g2):
    grad_pos, grad_neg = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("mw_auc_forward was called with compute_grad=False; call "
                           "fastloss.ops.mw_auc_loss, which asks for the gradients when needed")
    g = grad_loss.float()[:, None]
    return (grad_pos * g).to(ctx.dtypes[0]), (grad_neg * g).to(ctx.dtypes[1]), None


torch.library.register_autograd("fastloss::mw_auc_forward", _backward, setup_context=_setup)


def mw_auc_loss(scores_pos: Tensor, scores_neg: Tensor, reduction: str = "mean") -> Tensor:
    """Mann-Whitney (AUC) loss; see the module docstring.

    Args:
        scores_pos: ``[P]`` or ``[B, P]`` scores of the positives (float32/16, bfloat16).
        scores_neg: ``[N]`` or ``[B, N]`` scores of the negatives, same dtype and device.
        reduction: over the queries: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``, or a 0-d
            tensor for 1-D inputs).
    """
    fn = "mw_auc_loss"
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    for name, t in (("scores_pos", scores_pos), ("scores_neg", scores_neg)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    one_query = scores_pos.dim() == 1 and scores_neg.dim() == 1
    if not one_query and not (scores_pos.dim() == 2 and scores_neg.dim() == 2
                              and scores_pos.shape[0] == scores_neg.shape[0]):
        raise ValueError(f"{fn}: scores_pos and scores_neg must be [P] and [N], or [B, P] and "
                         f"[B, N], got {tuple(scores_pos.shape)} and {tuple(scores_neg.shape)}")
    pos = scores_pos.unsqueeze(0) if one_query else scores_pos
    neg = scores_neg.unsqueeze(0) if one_query else scores_neg
    if has_kernel(pos):  # one op with its C++ autograd formula (pair_losses_op.cpp)
        out = call_rounding(torch.ops.fastloss.mw_auc_loss, pos, pos, neg, _REDUCTION[reduction])
        return out[0] if one_query and reduction == "none" else out
    if pos.shape[1] < 1 or neg.shape[1] < 1:
        raise ValueError(f"{fn}: every query needs at least one positive and one negative score")
    rows = F.softplus(neg.float()[:, None, :] - pos.float()[:, :, None]).mean((1, 2))
    if reduction == "mean":
        return as_loss_dtype(rows.mean(), pos)
    if reduction == "sum":
        return as_loss_dtype(rows.sum(), pos)
    out = as_loss_dtype(rows, pos)
    return out[0] if one_query else out
