"""Eager float64 reference of AnyLoss, written per label with explicit loops over the
confusion-matrix cells (an independent form of the same definition)."""

import torch

__all__ = ["anyloss"]


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
