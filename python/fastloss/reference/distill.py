"""Eager float64 references of the distillation losses, from their definitions."""

import torch

__all__ = ["kd_loss"]


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
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
