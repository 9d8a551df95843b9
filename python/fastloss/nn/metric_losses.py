"""Module forms of the imbalance and metric-driven losses (fastloss.ops's ``dice_loss`` and
``anyloss``): hyper-parameters at construction, called with the predictions and targets."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops


class DiceLoss(nn.Module):
    """Module form of :func:`fastloss.ops.dice_loss`, the self-adjusting Dice loss:
    ``loss(logits, target)``."""

    def __init__(self, alpha: float = 1.0, gamma: float = 1.0, smooth: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha, self.gamma, self.smooth = alpha, gamma, smooth
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.dice_loss(logits, target, alpha=self.alpha, gamma=self.gamma, smooth=self.smooth,
                             ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, smooth={self.smooth}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class AnyLoss(nn.Module):
    """Module form of :func:`fastloss.ops.anyloss`: one minus a confusion-matrix metric
    (``"f1"``, ``"fbeta"``, ``"accuracy"``, ``"balanced_accuracy"``, ``"gmean"``) of the
    amplified predictions, ``loss(scores, target)``."""

    def __init__(self, metric: str = "f1", L: float = 73.0, beta: float = 1.0,
                 from_logits: bool = True) -> None:
        super().__init__()
        self.metric, self.L, self.beta, self.from_logits = metric, L, beta, from_logits

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        return ops.anyloss(scores, target, metric=self.metric, L=self.L, beta=self.beta,
                           from_logits=self.from_logits)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, L={self.L}, beta={self.beta}, from_logits={self.from_logits}"
