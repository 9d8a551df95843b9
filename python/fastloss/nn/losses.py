"""nn.Module wrappers of fastloss.ops.losses: hyper-parameters at construction, class
weights as a buffer (so .to(device) and state_dict carry them), call with (logits, target)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops


class _RowLoss(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", inplace_backward: bool = False,
                 grad_in_forward: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward
        self.grad_in_forward = grad_in_forward

    def _common(self) -> dict:
        return dict(weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                    inplace_backward=self.inplace_backward, grad_in_forward=self.grad_in_forward)

    # the loss's own hyper-parameters, shown by repr() (each subclass names its attributes)
    _shown: tuple = ()

    def extra_repr(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in self._shown]
        defaults = dict(ignore_index=-100, reduction="mean", inplace_backward=False, grad_in_forward=False)
        parts += [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
        if self.weight is not None:
            parts.append(f"weight=[{self.weight.numel()}]")
        return ", ".join(parts)


class CrossEntropyLoss(_RowLoss):
    """Module form of :func:`fastloss.ops.cross_entropy`: replaces ``nn.CrossEntropyLoss`` for
    ``[N, C]`` (or ``[N, C, d1, ...]``, or unbatched ``[C]``) logits and class-index targets,
    with the same keyword arguments (not torch's positional order, its deprecated
    ``size_average`` / ``reduce``, probability targets or float64)."""

    _shown = ("label_smoothing", "lse_square_scale", "softcap")

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                 inplace_backward: bool = False, grad_in_forward: bool = False) -> None:
        super().__init__(weight, ignore_index, reduction, inplace_backward, grad_in_forward)
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(logits, target, label_smoothing=self.label_smoothing,
                                 lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                                 **self._common())


class CompSumLoss(_RowLoss):
    """Module form of :func:`fastloss.ops.comp_sum_loss`."""

    _shown = ("tau",)

    def __init__(self, tau: float, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", inplace_backward: bool = False,
                 grad_in_forward: bool = False) -> None:
        super().__init__(weight, ignore_index, reduction, inplace_backward, grad_in_forward)
        self.tau = tau

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.comp_sum_loss(logits, target, self.tau, **self._common())


class LDRLoss(_RowLoss):
    """Module form of :func:`fastloss.ops.ldr_loss` (LDR-KL, or ALDR-KL with adaptive=True)."""

    _shown = ("lam", "margin", "adaptive", "alpha")

    def __init__(self, lam: float, margin: float = 1.0, adaptive: bool = False,
                 alpha: float = 2.0, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", inplace_backward: bool = False,
                 grad_in_forward: bool = False) -> None:
        super().__init__(weight, ignore_index, reduction, inplace_backward, grad_in_forward)
        self.lam, self.margin, self.adaptive, self.alpha = lam, margin, adaptive, alpha

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.ldr_loss(logits, target, self.lam, self.margin, self.adaptive, self.alpha,
                            **self._common())


class SphericalZLoss(_RowLoss):
    """Module form of :func:`fastloss.ops.spherical_z_loss`."""

    _shown = ("a", "b", "eps")

    def __init__(self, a: float, b: float, eps: float = 1e-6, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean",
                 inplace_backward: bool = False, grad_in_forward: bool = False) -> None:
        super().__init__(weight, ignore_index, reduction, inplace_backward, grad_in_forward)
        self.a, self.b, self.eps = a, b, eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.spherical_z_loss(logits, target, self.a, self.b, self.eps, **self._common())


class StableMaxCrossEntropyLoss(_RowLoss):
    """Module form of :func:`fastloss.ops.stablemax_cross_entropy`."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.stablemax_cross_entropy(logits, target, **self._common())


