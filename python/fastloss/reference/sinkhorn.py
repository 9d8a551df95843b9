"""Eager float64 reference of entropic OT: plain (not log-domain) Sinkhorn scaling with the
Gibbs kernel K = exp(-C / eps), for moderate eps, differentiable by unrolling the iterations."""

import torch

__all__ = ["sinkhorn_plan", "ot_eps"]


def sinkhorn_plan(c, a, b, eps, iters=5000):
    """P = diag(u) K diag(v) after `iters` scaling steps (u = a / K v, v = b / K^T u)."""
    k = torch.exp(-c / eps)
    v = torch.ones_like(b)
    for _ in range(iters):
        u = a / (k @ v)
        v = b / (k.T @ u)
    return u[:, None] * k * v[None, :]


def ot_eps(c, a, b, eps, iters=5000):
    """<P, C> + eps KL(P || a b^T) at the computed plan."""
    p = sinkhorn_plan(c, a, b, eps, iters)
    ab = a[:, None] * b[None, :]
    mask = p > 0
    kl = (p[mask] * torch.log(p[mask] / ab[mask])).sum() - p.sum() + ab.sum()
    return (p * c).sum() + eps * kl
