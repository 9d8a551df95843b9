"""Module forms of fastloss's functions, with the conventions of torch.nn."""

from .losses import (
    CompSumLoss,
    CrossEntropyLoss,
    LDRLoss,
    SphericalZLoss,
    StableMaxCrossEntropyLoss,
)
from .linear_losses import LinearCrossEntropy

__all__ = [
    "CrossEntropyLoss",
    "CompSumLoss",
    "LDRLoss",
    "SphericalZLoss",
    "StableMaxCrossEntropyLoss",
    "LinearCrossEntropy",
]
