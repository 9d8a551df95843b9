"""Eager float64 reference of the contrastive (InfoNCE / CLIP / CWCL) loss: the whole B x B
similarity matrix, softmaxes by rows and by columns."""

import torch

__all__ = ["contrastive_loss"]


def contrastive_loss(a, b, T=0.07, weights=None, symmetric=True, reduction="mean", *,
                     compute_dtype=torch.float64):
    cd = compute_dtype or a.dtype
    s = (a.to(cd) @ b.to(cd).T) / T
    n = s.shape[0]
    w = torch.eye(n, dtype=cd, device=s.device) if weights is None else weights.to(cd)
    row = -(w / w.sum(1, keepdim=True) * torch.log_softmax(s, 1)).sum(1)
    rows = row
    if symmetric:
        col = -(w / w.sum(0, keepdim=True) * torch.log_softmax(s, 0)).sum(0)
        rows = (row + col) / 2
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
