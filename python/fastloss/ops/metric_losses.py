"""Metric-driven losses: AnyLoss (Han, Moniz and Chawla, 2024).

``anyloss(scores, target, metric, L=73.0, beta=1.0, from_logits=True)``: a confusion matrix made
differentiable by the amplification ``A(p) = 1 / (1 + exp(-L (p - 1/2)))`` of the predicted
probabilities ``p`` (``sigmoid(scores)`` when ``from_logits``), with binary targets ``y``:

    TP = sum y A(p),  FN = sum y (1 - A(p)),  FP = sum (1 - y) A(p),  TN = sum (1 - y)(1 - A(p))

and the loss ``1 - metric(TP, FN, FP, TN)`` for ``metric`` in ``"f1"``, ``"fbeta"`` (``beta``),
``"accuracy"``, ``"balanced_accuracy"`` ((TPR + TNR) / 2) and ``"gmean"`` (sqrt(TPR TNR)).
``scores`` ``[N]`` is one binary task; ``[N, K]`` is ``K`` labels (multi-label): one confusion
matrix per label and the mean of their losses. Sums over the batch, so there is no per-example
reduction. Built from torch operations (no hand-written kernel yet); any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

_METRICS = ("f1", "fbeta", "accuracy", "balanced_accuracy", "gmean")


def _metric(tp, fn_, fp, tn, metric, beta):
    if metric in ("f1", "fbeta"):
        b2 = 1.0 if metric == "f1" else beta * beta
        return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn_ + fp)
    if metric == "accuracy":
        return (tp + tn) / (tp + tn + fp + fn_)
    tpr, tnr = tp / (tp + fn_), tn / (tn + fp)
    return (tpr + tnr) / 2 if metric == "balanced_accuracy" else torch.sqrt(tpr * tnr)


def anyloss(scores: Tensor, target: Tensor, metric: str = "f1", L: float = 73.0, beta: float = 1.0,
            from_logits: bool = True) -> Tensor:
    """AnyLoss (see the module docstring).

    Args:
        scores: ``[N]`` or ``[N, K]`` logits (``from_logits``) or probabilities in [0, 1].
        target: binary targets of the same shape (0/1, bool or float).
        metric: ``"f1"``, ``"fbeta"``, ``"accuracy"``, ``"balanced_accuracy"``, ``"gmean"``.
        L: the amplification scale (the paper uses 73).
        beta: F-beta's beta (``metric="fbeta"``).
    """
    fn = "anyloss"
    if metric not in _METRICS:
        raise ValueError(f"{fn}: metric must be one of {_METRICS}, got {metric!r}")
    if not L > 0:
        raise ValueError(f"{fn}: L must be > 0, got {L}")
    if metric == "fbeta" and not beta > 0:
        raise ValueError(f"{fn}: beta must be > 0, got {beta}")
    if not isinstance(scores, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{fn}: scores and target must be Tensors")
    if scores.dim() not in (1, 2) or target.shape != scores.shape:
        raise ValueError(f"{fn}: scores must be [N] or [N, K] and target the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(target.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{fn}: scores must be floating point, got {scores.dtype}")
    s = scores.float().reshape(scores.shape[0], -1)
    y = target.to(torch.float32).reshape(s.shape)
    p = torch.sigmoid(s) if from_logits else s
    a = torch.sigmoid(L * (p - 0.5))                 # the amplified probability A(p)
    tp = (y * a).sum(0)
    fn_ = (y * (1 - a)).sum(0)
    fp = ((1 - y) * a).sum(0)
    tn = ((1 - y) * (1 - a)).sum(0)
    return (1 - _metric(tp, fn_, fp, tn, metric, beta)).mean().to(scores.dtype)
