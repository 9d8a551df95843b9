"""Module forms of fastloss's functions, with the conventions of torch.nn."""

from .losses import (
    CompSumLoss,
    CrossEntropyLoss,
    LDRLoss,
    SphericalZLoss,
    StableMaxCrossEntropyLoss,
)
from .linear_losses import LinearCrossEntropy
from .tcn import TCN, DilatedConv1d
from .distill import DualHeadKD, KDLoss, PLDLoss, TopKKLLoss
from .pair_losses import (
    ContrastiveLoss,
    ICNNLoss,
    MultiSimilarityLoss,
    MWAUCLoss,
    ProtoTripletLoss,
    TCMLoss,
)
from .metric_losses import AnyLoss, DiceLoss
from .quant import QuantLinear, quantize_linear_layers_
from .sinkhorn import SinkhornLoss

__all__ = [
    "CrossEntropyLoss",
    "CompSumLoss",
    "LDRLoss",
    "SphericalZLoss",
    "StableMaxCrossEntropyLoss",
    "LinearCrossEntropy",
    "DilatedConv1d",
    "TCN",
    "DualHeadKD",
    "KDLoss",
    "TopKKLLoss",
    "PLDLoss",
    "MultiSimilarityLoss",
    "TCMLoss",
    "ContrastiveLoss",
    "MWAUCLoss",
    "ProtoTripletLoss",
    "ICNNLoss",
    "DiceLoss",
    "AnyLoss",
    "QuantLinear",
    "quantize_linear_layers_",
    "SinkhornLoss",
]
