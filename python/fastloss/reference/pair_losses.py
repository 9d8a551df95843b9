"""Eager float64 references of the pair-based losses, from their formulas."""

import torch

__all__ = ["mw_auc_loss"]


def mw_auc_loss(scores_pos, scores_neg, reduction="mean", *, compute_dtype=torch.float64):
    """Per query, mean over the pairs of -log sigmoid(s_i - s_j) (the pair matrix is built)."""
    cd = compute_dtype or scores_pos.dtype
    pos, neg = scores_pos.to(cd), scores_neg.to(cd)
    one = pos.dim() == 1
    pos, neg = (pos[None], neg[None]) if one else (pos, neg)
    diff = pos[:, :, None] - neg[:, None, :]
    rows = -torch.nn.functional.logsigmoid(diff).mean((1, 2))
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows[0] if one else rows
