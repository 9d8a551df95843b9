"""Eager float64 references of the Multi-Similarity loss with its miner and of the TCM
regularizer, from the formulas (the whole B x B similarity matrix)."""

import torch
import torch.nn.functional as F

__all__ = ["multi_similarity_loss", "tcm_loss"]


def multi_similarity_loss(emb, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1,
                          reduction="mean", *, compute_dtype=torch.float64):
    cd = compute_dtype or emb.dtype
    e = F.normalize(emb.to(cd), dim=1)
    s = e @ e.T
    n = s.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    pos, neg = same & ~eye, ~same
    if epsilon is not None:
        inf = torch.tensor(float("inf"), dtype=cd, device=s.device)
        min_pos = torch.where(pos, s, inf).min(1, keepdim=True).values
        max_neg = torch.where(neg, s, -inf).max(1, keepdim=True).values
        pos = pos & (s.detach() - epsilon < max_neg.detach())
        neg = neg & (s.detach() + epsilon > min_pos.detach())
    pos_sum = torch.where(pos, torch.exp(alpha * (base - s)), torch.zeros_like(s)).sum(1)
    neg_sum = torch.where(neg, torch.exp(beta * (s - base)), torch.zeros_like(s)).sum(1)
    rows = torch.log1p(pos_sum) / alpha + torch.log1p(neg_sum) / beta
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def tcm_loss(emb, labels, pos_margin=0.9, neg_margin=0.5, pos_weight=1.0, neg_weight=1.0, *,
             compute_dtype=torch.float64):
    """Mean margin violation over the hard positive and hard negative pairs (lists of pairs)."""
    cd = compute_dtype or emb.dtype
    e = F.normalize(emb.to(cd), dim=1)
    s = e @ e.T
    n = s.shape[0]
    i, j = torch.triu_indices(n, n, 1)  # unordered pairs: the same means as ordered ones
    sij, same = s[i, j], labels[i] == labels[j]
    hard_pos = same & (sij <= pos_margin)
    hard_neg = ~same & (sij >= neg_margin)
    zero = sij.sum() * 0
    pos = (pos_margin - sij[hard_pos]).mean() if hard_pos.any() else zero
    neg = (sij[hard_neg] - neg_margin).mean() if hard_neg.any() else zero
    return pos_weight * pos + neg_weight * neg
