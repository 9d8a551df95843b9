"""Module forms of the pair-based, contrastive and metric-learning losses (fastloss.ops's
``multi_similarity_loss``, ``tcm_loss``, ``contrastive_loss``, ``mw_auc_loss``,
``proto_triplet_loss`` and ``icnn_loss``): hyper-parameters at construction, called with the
embeddings (or scores) and labels, as pytorch-metric-learning's losses are. No parameters or
buffers of their own, except a learnable temperature when ContrastiveLoss is asked for one."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._checks import require_finite


class MultiSimilarityLoss(nn.Module):
    """Module form of :func:`fastloss.ops.multi_similarity_loss`: ``loss(embeddings, labels)``,
    with the paper's mining step (``epsilon``; None: every pair), as pytorch-metric-learning's
    ``MultiSimilarityLoss`` with its ``MultiSimilarityMiner`` (that loss without a miner is
    ``epsilon=None``)."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 epsilon: Optional[float] = 0.1, reduction: str = "mean",
                 block_rows: Optional[int] = None) -> None:
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.reduction, self.block_rows = reduction, block_rows

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        return ops.multi_similarity_loss(emb, labels, alpha=self.alpha, beta=self.beta,
                                         base=self.base, epsilon=self.epsilon,
                                         reduction=self.reduction, block_rows=self.block_rows)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
                f"reduction={self.reduction!r}")


class TCMLoss(nn.Module):
    """Module form of :func:`fastloss.ops.tcm_loss`, the threshold-consistent margin
    regularizer: ``loss(embeddings, labels)``, added to a metric loss."""

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.5, pos_weight: float = 1.0,
                 neg_weight: float = 1.0, block_rows: Optional[int] = None) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.pos_weight, self.neg_weight, self.block_rows = pos_weight, neg_weight, block_rows

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        return ops.tcm_loss(emb, labels, pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                            pos_weight=self.pos_weight, neg_weight=self.neg_weight,
                            block_rows=self.block_rows)

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"pos_weight={self.pos_weight}, neg_weight={self.neg_weight}")


class ContrastiveLoss(nn.Module):
    """Module form of :func:`fastloss.ops.contrastive_loss` (InfoNCE / CLIP, CWCL with
    ``weights``): ``loss(a, b, weights=None)`` for paired ``[B, D]`` embeddings.

    ``learnable=True`` learns the temperature as CLIP does: a parameter ``logit_scale``
    initialised to ``log(1 / T)``, the loss taken at ``T = exp(-logit_scale)`` (clamp it as
    CLIP does, e.g. ``logit_scale.data.clamp_(max=math.log(100))`` after each step, if it
    should stay bounded); otherwise ``T`` is a fixed hyper-parameter."""

    def __init__(self, T: float = 0.07, symmetric: bool = True, reduction: str = "mean",
                 block_rows: Optional[int] = None, learnable: bool = False) -> None:
        super().__init__()
        self.symmetric, self.reduction, self.block_rows = symmetric, reduction, block_rows
        if learnable:
            require_finite("ContrastiveLoss", T=T)
            if not T > 0:
                raise ValueError(f"ContrastiveLoss: T must be > 0, got {T}")
            self.initial_T = T
            self.logit_scale = nn.Parameter(torch.empty(()))
            self.T = None
            self.reset_parameters()
        else:
            self.logit_scale = None
            self.T = T

    def reset_parameters(self) -> None:
        """A learnable temperature back to its initial ``T`` (``logit_scale = log(1 / T)``; also
        what a model built on the meta device and moved with ``to_empty`` calls)."""
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.fill_(-math.log(self.initial_T))

    def temperature(self):
        """The temperature in use: ``T``, or ``exp(-logit_scale)`` (a tensor) when learnable."""
        return self.T if self.logit_scale is None else torch.exp(-self.logit_scale)

    def forward(self, a: Tensor, b: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        return ops.contrastive_loss(a, b, T=self.temperature(), weights=weights,
                                    symmetric=self.symmetric, reduction=self.reduction,
                                    block_rows=self.block_rows)

    def extra_repr(self) -> str:
        t = "learnable" if self.logit_scale is not None else f"T={self.T}"
        return f"{t}, symmetric={self.symmetric}, reduction={self.reduction!r}"


class MWAUCLoss(nn.Module):
    """Module form of :func:`fastloss.ops.mw_auc_loss`: the Mann-Whitney (AUC) loss,
    ``loss(scores_pos, scores_neg)``."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, scores_pos: Tensor, scores_neg: Tensor) -> Tensor:
        return ops.mw_auc_loss(scores_pos, scores_neg, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class ProtoTripletLoss(nn.Module):
    """Module form of :func:`fastloss.ops.proto_triplet_loss`:
    ``loss(query, query_labels, support=None, support_labels=None)``."""

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, query: Tensor, query_labels: Tensor, support: Optional[Tensor] = None,
                support_labels: Optional[Tensor] = None) -> Tensor:
        return ops.proto_triplet_loss(query, query_labels, support, support_labels,
                                      margin=self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class ICNNLoss(nn.Module):
    """Module form of :func:`fastloss.ops.icnn_loss`:
    ``loss(embeddings, labels, target=None, target_labels=None)``."""

    def __init__(self, k: int = 4, num_neighbors: Optional[int] = None) -> None:
        super().__init__()
        self.k, self.num_neighbors = k, num_neighbors

    def forward(self, emb: Tensor, labels: Tensor, target: Optional[Tensor] = None,
                target_labels: Optional[Tensor] = None) -> Tensor:
        return ops.icnn_loss(emb, labels, target, target_labels, k=self.k,
                             num_neighbors=self.num_neighbors)

    def extra_repr(self) -> str:
        return f"k={self.k}, num_neighbors={self.num_neighbors}"
