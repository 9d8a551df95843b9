"""Plain eager (float64 by default) reference implementations of the fastloss losses."""

from .losses import (
    comp_sum_loss,
    cross_entropy,
    ldr_adaptive_lambda,
    ldr_loss,
    spherical_z_loss,
    stablemax,
    stablemax_cross_entropy,
)
from .linear_losses import linear_loss
from . import contrastive, distill, few_shot, metric, metric_losses, pair_losses, quant, sinkhorn, tcn

__all__ = [
    "cross_entropy",
    "comp_sum_loss",
    "ldr_loss",
    "ldr_adaptive_lambda",
    "spherical_z_loss",
    "stablemax",
    "stablemax_cross_entropy",
    "linear_loss",
    "tcn",
    "pair_losses",
    "distill",
    "contrastive",
    "few_shot",
    "metric",
    "metric_losses",
    "quant",
    "sinkhorn",
]
