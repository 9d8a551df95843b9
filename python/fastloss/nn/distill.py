"""Distillation modules: the module forms of :func:`fastloss.ops.kd_loss`, ``topk_kl_loss``
and ``pld_loss`` (hyper-parameters at construction, called with the logits), and the dual-head
arrangement."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class KDLoss(nn.Module):
    """Module form of :func:`fastloss.ops.kd_loss`: ``loss(student_logits, teacher_logits)``,
    forward / reverse KL or JSD at temperature ``T``, times ``T^2``."""

    def __init__(self, T: float = 1.0, kind: str = "forward_kl", beta: float = 0.5,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.T, self.kind, self.beta, self.reduction = T, kind, beta, reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ops.kd_loss(student, teacher, T=self.T, kind=self.kind, beta=self.beta,
                           reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"T={self.T}, kind={self.kind!r}, beta={self.beta}, reduction={self.reduction!r}"


class TopKKLLoss(nn.Module):
    """Module form of :func:`fastloss.ops.topk_kl_loss`: the KL over the teacher's top-``k``
    classes (OstQuant's KL-Top)."""

    def __init__(self, k: int, T: float = 1.0, renormalize: bool = False,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.k, self.T, self.renormalize, self.reduction = k, T, renormalize, reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ops.topk_kl_loss(student, teacher, k=self.k, T=self.T, renormalize=self.renormalize,
                                reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"k={self.k}, T={self.T}, renormalize={self.renormalize}, "
                f"reduction={self.reduction!r}")


class PLDLoss(nn.Module):
    """Module form of :func:`fastloss.ops.pld_loss`: Plackett-Luce distillation,
    ``loss(student_logits, teacher_logits, target)``."""

    def __init__(self, T: float = 1.0, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.T, self.ignore_index, self.reduction = T, ignore_index, reduction

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return ops.pld_loss(student, teacher, target, T=self.T, ignore_index=self.ignore_index,
                            reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"T={self.T}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class DualHeadKD(nn.Module):
    """Dual-head knowledge distillation (Yang et al.): two linear classification heads on the
    same features; the main head is trained with cross-entropy on the labels (plus, with
    ``prob_weight > 0``, the probability-level distillation ``kd_loss`` towards the teacher),
    the auxiliary head only with the logit-level distillation loss. The backbone receives the
    gradients of both losses, each head only those of its own, which is the paper's point:
    the two losses conflict in a shared classifier but not in the backbone.

    ``loss = CE(main(f), y) + prob_weight * kd_loss(main(f), t, T) + aux_weight * aux(aux(f), t)``
    with ``aux`` = ``"mse"`` (mean squared error between logits, the default logit-level loss)
    or one of :func:`fastloss.ops.kd_loss`'s kinds (``"forward_kl"``, ``"reverse_kl"``,
    ``"jsd"``) at temperature ``T``. ``predict(f)`` returns the main head's logits (inference
    uses the main head only). The choice of logit-level loss is a parameter because the
    abstract does not fix it.
    """

    def __init__(self, in_features: int, num_classes: int, T: float = 4.0,
                 aux_weight: float = 1.0, prob_weight: float = 0.0, aux_loss: str = "mse",
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if aux_loss not in ("mse", "forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"DualHeadKD: aux_loss must be 'mse', 'forward_kl', 'reverse_kl' or "
                             f"'jsd', got {aux_loss!r}")
        if not T > 0:
            raise ValueError(f"DualHeadKD: T must be > 0, got {T}")
        factory = dict(device=device, dtype=dtype)
        self.main = nn.Linear(in_features, num_classes, bias=bias, **factory)
        self.aux = nn.Linear(in_features, num_classes, bias=bias, **factory)
        self.T, self.aux_weight, self.prob_weight, self.aux_loss = T, aux_weight, prob_weight, aux_loss

    def predict(self, features: Tensor) -> Tensor:
        return self.main(features)

    def forward(self, features: Tensor, target: Tensor, teacher_logits: Tensor,
                ignore_index: int = -100) -> Tensor:
        """features ``[N, D]``, target ``[N]`` class indices, teacher_logits ``[N, C]``.
        ``ignore_index`` leaves rows out of the cross-entropy only: the distillation terms use
        every row (the teacher gives targets for unlabelled rows too); pass only the rows to
        keep (``features[mask]``, ...) to leave padded rows out of every term."""
        teacher = teacher_logits.detach()
        main = self.main(features)
        if teacher.shape != main.shape:
            raise ValueError(f"DualHeadKD: teacher_logits must be [N, C] = {tuple(main.shape)} (the "
                             f"heads' output), got {tuple(teacher.shape)}")
        loss = ops.cross_entropy(main, target, ignore_index=ignore_index)
        if self.prob_weight:
            loss = loss + self.prob_weight * ops.kd_loss(main, teacher, self.T)
        aux = self.aux(features)
        if self.aux_loss == "mse":
            aux_term = F.mse_loss(aux, teacher.to(aux.dtype))
        else:
            aux_term = ops.kd_loss(aux, teacher.to(aux.dtype), self.T, self.aux_loss)
        return loss + self.aux_weight * aux_term

    def extra_repr(self) -> str:
        return (f"T={self.T}, aux_weight={self.aux_weight}, prob_weight={self.prob_weight}, "
                f"aux_loss={self.aux_loss!r}")
