"""Eager float64 reference of AnyLoss, written per label with explicit loops over the
confusion-matrix cells (an independent form of the same definition)."""

import torch

__all__ = ["anyloss", "dice_loss"]


def anyloss(scores, target, metric="f1", L=73.0, beta=1.0, from_logits=True):
    s = scores.double().reshape(scores.shape[0], -1)
    y = target.double().reshape(s.shape)
    losses = []
    for k in range(s.shape[1]):
        terms = []
        for i in range(s.shape[0]):
            p = torch.sigmoid(s[i, k]) if from_logits else s[i, k]
            a = 1.0 / (1.0 + torch.exp(-L * (p - 0.5)))
            terms.append((y[i, k], a))
        tp = sum(t * a for t, a in terms)
        fn = sum(t * (1 - a) for t, a in terms)
        fp = sum((1 - t) * a for t, a in terms)
        tn = sum((1 - t) * (1 - a) for t, a in terms)
        if metric == "f1":
            m = 2 * tp / (2 * tp + fn + fp)
        elif metric == "fbeta":
            m = (1 + beta ** 2) * tp / ((1 + beta ** 2) * tp + beta ** 2 * fn + fp)
        elif metric == "accuracy":
            m = (tp + tn) / (tp + tn + fp + fn)
        elif metric == "balanced_accuracy":
            m = (tp / (tp + fn) + tn / (tn + fp)) / 2
        else:
            m = torch.sqrt((tp / (tp + fn)) * (tn / (tn + fp)))
        losses.append(1 - m)
    return torch.stack(losses).mean()


def dice_loss(logits, target, alpha=1.0, gamma=1.0, smooth=0.0, ignore_index=-100, reduction="mean"):
    """The paper's per-example self-adjusting Dice, summed over classes; float64 autograd, with
    log(1 - p) taken from the logits (a log-sigmoid; for the softmax's largest class the
    log-sum-exp of the others minus the row's, for the rest log1p(-p), p <= 1/2 there): 1 - p
    itself rounds to 0 in float64 past logit gaps of ~37, where (1 - p)^alpha is far from 0
    for the paper's alpha = 0.1 .. 0.001."""
    x = logits.double()
    if target.shape == logits.shape:
        p = torch.sigmoid(x)
        log_q = torch.nn.functional.logsigmoid(-x)
        y = target.double()
        keep = None
    else:
        p = torch.softmax(x, -1)
        is_top = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).bool()
        log_q_top = x.masked_fill(is_top, float("-inf")).logsumexp(-1, keepdim=True) - x.logsumexp(-1, keepdim=True)
        log_q = torch.where(is_top, log_q_top, torch.log1p(-p.masked_fill(is_top, 0.0)))  # (finite gradients)
        keep = target != ignore_index
        y = torch.nn.functional.one_hot(torch.where(keep, target, 0), x.shape[-1]).double()
    pt = (torch.exp(alpha * log_q) if alpha != 0 else torch.ones_like(p)) * p
    dsc = (2 * pt * y + gamma) / (pt + y + gamma + smooth)
    rows = (1 - dsc).sum(-1) if x.dim() == 2 else 1 - dsc
    if keep is not None:
        rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (rows.shape[0] if keep is None else keep.sum())
