"""Module form of the fused linear losses: an LM head (or any final classifier) and its loss
in one module, called with (hidden, target)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


class LinearCrossEntropy(nn.Module):
    """``nn.Linear(in_features, num_classes, bias)`` (here ``bias=False`` by default, as LM heads
    have none) followed by cross-entropy, fused
    (:func:`fastloss.ops.linear_cross_entropy`): replaces ``lm_head`` + loss in a training
    step without ever forming the ``[tokens, vocab]`` logits.

    ``weight`` (``[num_classes, in_features]``) and ``bias`` are parameters initialised as
    ``nn.Linear`` initialises them; :meth:`from_linear` shares an existing layer's parameters
    instead (so a model's ``lm_head`` keeps serving generation). ``class_weight`` is a buffer.
    ``low_memory`` and ``filter_eps`` are those of :func:`fastloss.ops.linear_cross_entropy`.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False,
                 class_weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                 block_rows: Optional[int] = None, device=None, dtype=None,
                 low_memory: bool = False, filter_eps=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.block_rows = block_rows
        if filter_eps is not None and not low_memory:  # (at construction, not at the first call)
            raise ValueError("LinearCrossEntropy: filter_eps (gradient filtering) applies to "
                             "low_memory=True")
        self.low_memory = low_memory
        self.filter_eps = filter_eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1]) if self.weight.shape[1] > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **loss_kwargs) -> "LinearCrossEntropy":
        """A loss module sharing ``linear``'s weight and bias (no copy)."""
        w = getattr(linear, "weight", None)
        if not (isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2):
            # (a QuantLinear's packed buffers, a bitsandbytes layer's packed uint8 weight: the
            # fused loss reads a float [V, D] matrix)
            raise TypeError(f"LinearCrossEntropy.from_linear: linear must hold a float weight (an "
                            f"nn.Linear), got {type(linear).__name__}; keep the LM head unquantized "
                            f"(quantize_linear_layers_ takes a skip list)")
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                     **loss_kwargs)
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        return ops.linear_cross_entropy(
            hidden, self.weight, target, bias=self.bias, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
            softcap=self.softcap, block_rows=self.block_rows, low_memory=self.low_memory,
            filter_eps=self.filter_eps)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}"
                + (f", low_memory=True, filter_eps={self.filter_eps!r}" if self.low_memory else ""))
