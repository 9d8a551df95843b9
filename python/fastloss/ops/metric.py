"""Metric-learning losses over embeddings ``[B, D]`` and labels ``[B]``, by blocks of anchors.

``multi_similarity_loss(emb, labels, alpha, beta, base, epsilon)`` is the Multi-Similarity loss
(Wang et al., CVPR 2019) with its pair mining, as pytorch-metric-learning's
``MultiSimilarityLoss(alpha, beta, base)`` with ``MultiSimilarityMiner(epsilon)`` computes it on
cosine similarities ``S = normalize(emb) @ normalize(emb).T``: for anchor ``i``, positives
``P_i`` (same label, not ``i``) and negatives ``N_i``, mining keeps the positives with
``S_ip - epsilon < max_{n in N_i} S_in`` and the negatives with
``S_in + epsilon > min_{p in P_i} S_ip`` (``epsilon=None``: every pair), and

.. math:: \\ell_i = \\frac1\\alpha\\log\\Big(1 + \\sum_{p} e^{-\\alpha (S_{ip} - \\lambda)}\\Big)
          + \\frac1\\beta\\log\\Big(1 + \\sum_{n} e^{\\beta (S_{in} - \\lambda)}\\Big)

(``lambda = base``; an anchor with no mined pair has loss 0), averaged over all ``B`` anchors.
The mining is not differentiated (as the miner's indices are not). Every anchor's terms depend
only on its own row of ``S``, so the op goes over blocks of anchor rows (a GEMM per block, then
float32 torch math on it) and the backward forms each block again: extra memory is one
``[rows, B]`` block (4 MiB by default) and its temporaries, not the ``B x B`` matrix and the
masks eager code builds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_BLOCK_BYTES = 4 << 20  # small: each block has a dozen block-sized temporaries (masks, exps)
_INF = float("inf")


def _masks(s, labels_rows, labels, r0, epsilon):
    """Positive and negative masks of a block of anchor rows, after mining."""
    rows = torch.arange(r0, r0 + s.shape[0], device=s.device)
    same = labels_rows[:, None] == labels[None, :]
    not_self = rows[:, None] != torch.arange(labels.shape[0], device=s.device)[None, :]
    pos, neg = same & not_self, ~same
    if epsilon is not None:
        min_pos = torch.where(pos, s, _INF).amin(1, keepdim=True)
        max_neg = torch.where(neg, s, -_INF).amax(1, keepdim=True)
        pos = pos & (s - epsilon < max_neg)
        neg = neg & (s + epsilon > min_pos)
    return pos, neg


def _log1p_sum_exp(x, mask):
    """log(1 + sum_{mask} exp(x)) per row (0 for rows with no kept entry)."""
    lse = torch.logsumexp(torch.where(mask, x, -_INF), 1)
    return torch.logaddexp(torch.zeros_like(lse), lse)


class _MultiSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, labels, alpha, beta, base, epsilon, block):
        n = e.shape[0]
        rows = torch.empty(n, dtype=torch.float32, device=e.device)
        lse_pos, lse_neg = torch.empty_like(rows), torch.empty_like(rows)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            s = (e[r0:r1] @ e.t()).float()
            pos, neg = _masks(s, labels[r0:r1], labels, r0, epsilon)
            lse_pos[r0:r1] = _log1p_sum_exp(alpha * (base - s), pos)
            lse_neg[r0:r1] = _log1p_sum_exp(beta * (s - base), neg)
        rows = lse_pos / alpha + lse_neg / beta
        ctx.save_for_backward(e, labels, lse_pos, lse_neg)
        ctx.args = (alpha, beta, base, epsilon, block)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        e, labels, lse_pos, lse_neg = ctx.saved_tensors
        alpha, beta, base, epsilon, block = ctx.args
        n = e.shape[0]
        g = grad_rows.float()
        ef = e.float()
        grad = torch.zeros(e.shape, dtype=torch.float32, device=e.device)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            s = (e[r0:r1] @ e.t()).float()
            pos, neg = _masks(s, labels[r0:r1], labels, r0, epsilon)
            # d l_i / d S_ip = -exp(alpha (base - S_ip) - lse_pos_i), d l_i / d S_in = +exp(...)
            d_pos = torch.where(pos, torch.exp(alpha * (base - s) - lse_pos[r0:r1, None]), 0.0)
            d_neg = torch.where(neg, torch.exp(beta * (s - base) - lse_neg[r0:r1, None]), 0.0)
            ds = (d_neg - d_pos) * g[r0:r1, None]
            grad[r0:r1] += ds @ ef               # S = e e^T: both factors get a gradient
            grad.addmm_(ds.t(), ef[r0:r1])
        return grad.to(e.dtype), None, None, None, None, None, None


def multi_similarity_loss(emb: Tensor, labels: Tensor, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, epsilon: Optional[float] = 0.1,
                          reduction: str = "mean", block_rows: Optional[int] = None) -> Tensor:
    """Multi-Similarity loss with its miner (see the module docstring).

    Args:
        emb: ``[B, D]`` embeddings (normalised inside, as cosine similarity does).
        labels: ``[B]`` integer class labels.
        alpha, beta, base: the loss's positive weight, negative weight and margin ``lambda``.
        epsilon: the miner's margin; None keeps every pair.
        reduction: ``"mean"`` over the ``B`` anchors, ``"sum"`` or ``"none"`` (``[B]``).
        block_rows: anchors per block (None: 4 MiB of float32 similarities).
    """
    fn = "multi_similarity_loss"
    if not isinstance(emb, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: emb and labels must be Tensors")
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{fn}: emb must be a floating [B, D] tensor, got {emb.dtype} {tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be integer [B] = [{emb.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.device != emb.device:
        raise ValueError(f"{fn}: labels is on {labels.device} but emb is on {emb.device}")
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"{fn}: alpha and beta must be > 0, got {alpha} and {beta}")
    if epsilon is not None and not epsilon >= 0:
        raise ValueError(f"{fn}: epsilon must be >= 0 or None, got {epsilon}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    n = emb.shape[0]
    if block_rows is None:
        block_rows = max(1, _BLOCK_BYTES // (4 * max(n, 1)))
    elif not (isinstance(block_rows, int) and block_rows > 0):
        raise ValueError(f"{fn}: block_rows must be a positive int or None, got {block_rows!r}")
    e = F.normalize(emb, dim=1)
    rows = _MultiSimilarity.apply(e, labels, float(alpha), float(beta), float(base),
                                  None if epsilon is None else float(epsilon), block_rows)
    if reduction == "mean":
        return rows.mean().to(emb.dtype)
    if reduction == "sum":
        return rows.sum().to(emb.dtype)
    return rows.to(emb.dtype)
