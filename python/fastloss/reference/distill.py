"""Eager float64 references of the distillation losses, from their definitions."""

import torch

__all__ = ["kd_loss", "topk_kl_loss", "pld_loss"]


def kd_loss(student, teacher, T=1.0, kind="forward_kl", beta=0.5, reduction="mean", *,
            compute_dtype=torch.float64):
    cd = compute_dtype or student.dtype
    p = torch.softmax(student.to(cd) / T, -1)
    q = torch.softmax(teacher.to(cd).detach() / T, -1)
    kl = lambda a, b: (a * (torch.log(a) - torch.log(b))).sum(-1)  # noqa: E731 (sum a log(a / b))
    if kind == "forward_kl":
        rows = kl(q, p)
    elif kind == "reverse_kl":
        rows = kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        rows = beta * kl(q, m) + (1 - beta) * kl(p, m)
    rows = rows * T * T
    if reduction == "batchmean":  # F.kl_div's: the sum over the first dimension's size
        return rows.sum() / student.shape[0]
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def _reduce(rows, reduction, count=None):
    if reduction == "mean":
        return rows.sum() / (rows.numel() if count is None else count)
    return rows.sum() if reduction == "sum" else rows


def _rank_desc(values):
    """Ranks (0 = largest) with ties towards the lower index, by counting, not sorting."""
    n = values.shape[-1]
    i = torch.arange(n, device=values.device)
    a, b = values[..., :, None], values[..., None, :]
    before = (b > a) | ((b == a) & (i[None, :] < i[:, None]))
    return before.sum(-1)


def topk_kl_loss(student, teacher, k, T=1.0, renormalize=False, reduction="mean"):
    """sum over the teacher's top-k classes of q (log q - log p), times T^2 (masks, no gather)."""
    s = student.double() / T
    t = teacher.double().detach() / T
    keep = _rank_desc(teacher.double()) < k
    if renormalize:
        s = s.masked_fill(~keep, float("-inf"))
        t = t.masked_fill(~keep, float("-inf"))
    lp = s - torch.logsumexp(s, -1, keepdim=True)
    lq = t - torch.logsumexp(t, -1, keepdim=True)
    terms = torch.where(keep, lq.exp() * (lq - torch.where(keep, lp, 0.0)), 0.0)
    return _reduce(terms.sum(-1) * T * T, reduction)


def pld_loss(student, teacher, target, T=1.0, ignore_index=-100, reduction="mean"):
    """The Plackett-Luce list loss from its definition: for every position k of the ranking (the
    target, then descending teacher logit), -log of the probability that the student picks the
    class at k among the classes ranked at k or later, weighted by the teacher's softmax."""
    s = student.double()
    t = teacher.double().detach()
    keep = target != ignore_index
    y = torch.where(keep, target, 0)
    lifted = t.scatter(-1, y[..., None], float("inf"))
    rank = _rank_desc(lifted)  # [.., C]: position of each class in the ranking
    later = rank[..., None, :] >= rank[..., :, None]  # [.., C(k), C(l)]: l ranked at or after k
    lse = torch.logsumexp(s[..., None, :].masked_fill(~later, float("-inf")), -1)
    w = torch.softmax(t / T, -1)
    rows = torch.where(keep, (w * (lse - s)).sum(-1), 0.0)
    return _reduce(rows, reduction, keep.sum())
