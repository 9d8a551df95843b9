"""Public functions of fastloss, one module per family."""

from .losses import (
    comp_sum_loss,
    cross_entropy,
    ldr_loss,
    spherical_z_loss,
    stablemax_cross_entropy,
)
from .linear_losses import (
    linear_comp_sum_loss,
    linear_cross_entropy,
    linear_ldr_loss,
    linear_spherical_z_loss,
    linear_stablemax_cross_entropy,
)
from .vocab_parallel import vocab_parallel_linear_cross_entropy
from .tcn import dilated_conv1d, tcn_level
from .pair_losses import mw_auc_loss
from .distill import kd_loss, pld_loss, topk_kl_loss
from .contrastive import contrastive_loss
from .metric import multi_similarity_loss, tcm_loss
from .metric_losses import anyloss, dice_loss
from .few_shot import icnn_loss, proto_triplet_loss
from .quant import (QuantizedWeight, dequant_gemm, dequantize_weight, nf_codebook, power_codebook,
                    quantize_weight)
from .sinkhorn import SinkhornResult, self_transport_cost, sinkhorn, wasserstein

__all__ = [
    "cross_entropy",
    "comp_sum_loss",
    "ldr_loss",
    "spherical_z_loss",
    "stablemax_cross_entropy",
    "linear_cross_entropy",
    "linear_comp_sum_loss",
    "linear_ldr_loss",
    "linear_spherical_z_loss",
    "linear_stablemax_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "dilated_conv1d",
    "tcn_level",
    "mw_auc_loss",
    "kd_loss",
    "topk_kl_loss",
    "pld_loss",
    "contrastive_loss",
    "multi_similarity_loss",
    "tcm_loss",
    "anyloss",
    "dice_loss",
    "proto_triplet_loss",
    "icnn_loss",
    "QuantizedWeight",
    "quantize_weight",
    "dequantize_weight",
    "dequant_gemm",
    "nf_codebook",
    "power_codebook",
    "SinkhornResult",
    "sinkhorn",
    "self_transport_cost",
    "wasserstein",
]
