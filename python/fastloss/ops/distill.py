"""Logit distillation losses over student and teacher logits ``[N, C]``.

``kd_loss(student, teacher, T, kind, beta)``, per row with ``p = softmax(student / T)`` and
``q = softmax(teacher / T)``:

* ``"forward_kl"``: ``T^2 KL(q || p)``; with ``reduction="mean"`` (the mean over rows) this is
  ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True,
  reduction="batchmean") * T^2`` (``kl_div``'s own default ``"mean"`` divides by ``N C``);
* ``"reverse_kl"``: ``T^2 KL(p || q)``;
* ``"jsd"``: ``T^2 [beta KL(q || m) + (1 - beta) KL(p || m)]`` with ``m = beta q + (1 - beta) p``,
  ``0 < beta < 1`` (the generalized Jensen-Shannon divergence; 0.5 is the symmetric one).

Gradients flow to the student only (the teacher is a target). The CPU kernels (``csrc/distill``)
read both rows twice in the forward (three times for jsd), keep three floats per row, and read
them once more in the backward, which writes the gradient once: no ``[N, C]`` probability
tensor is kept. CUDA tensors use the same formulas in torch operations for now.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("fastloss::kd_forward")
def _fake_forward(student, teacher, kind, temperature, beta):
    torch._check(student.dim() == 2 and teacher.shape == student.shape,
                 lambda: "student and teacher must be [N, C] of the same shape")
    n = student.shape[0]
    return (student.new_empty((n,), dtype=torch.float32),
            student.new_empty((n, 3), dtype=torch.float32))


@torch.library.register_fake("fastloss::kd_backward")
def _fake_backward(grad_loss, student, teacher, stats, kind, temperature, beta):
    return student.new_empty(student.shape)


def _setup(ctx, inputs, output):
    student, teacher, kind, temperature, beta = inputs
    ctx.save_for_backward(student, teacher, output[1])
    ctx.args = (kind, temperature, beta)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fastloss.kd_backward(grad_loss, student, teacher, stats, *ctx.args)
    return grad, None, None, None, None


torch.library.register_autograd("fastloss::kd_forward", _backward, setup_context=_setup)


def _rows_torch(student, teacher, kind, temperature, beta):
    """The same per-row losses in torch operations (CUDA tensors, for now)."""
    ls = F.log_softmax(student.float() / temperature, -1)
    lt = F.log_softmax(teacher.float() / temperature, -1).detach()
    if kind == "forward_kl":
        rows = (lt.exp() * (lt - ls)).sum(-1)
    elif kind == "reverse_kl":
        rows = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + torch.log(torch.tensor(beta)), ls + torch.log(torch.tensor(1 - beta)))
        rows = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    return rows * temperature ** 2


def kd_loss(student: Tensor, teacher: Tensor, T: float = 1.0, kind: str = "forward_kl",
            beta: float = 0.5, reduction: str = "mean") -> Tensor:
    """Distillation loss of ``student`` logits towards ``teacher`` logits (module docstring).

    Args:
        student, teacher: ``[N, C]`` (or ``[..., C]``, flattened), float32/16 or bfloat16.
        T: temperature > 0 (the loss is multiplied by ``T^2``).
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD mixture weight of the teacher, in (0, 1).
        reduction: over rows, ``"mean"``, ``"sum"`` or ``"none"`` (the leading shape).
    """
    fn = "kd_loss"
    if kind not in _KINDS:
        raise ValueError(f"{fn}: kind must be one of {list(_KINDS)}, got {kind!r}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not T > 0:
        raise ValueError(f"{fn}: T must be > 0, got {T}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"{fn}: beta must be in (0, 1) for jsd, got {beta}")
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if student.dim() < 1 or teacher.shape != student.shape:
        raise ValueError(f"{fn}: teacher must have student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if student.dtype not in _FLOATS or teacher.dtype != student.dtype:
        raise ValueError(f"{fn}: student and teacher must share a dtype among float32, float16 "
                         f"and bfloat16, got {student.dtype} and {teacher.dtype}")
    if student.shape[-1] == 0:
        raise ValueError(f"{fn}: student and teacher need at least one class, got shape "
                         f"{tuple(student.shape)}")
    lead = student.shape[:-1]
    s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    if s2.device.type == "cpu":
        rows = torch.ops.fastloss.kd_forward(s2, t2.detach(), _KINDS[kind], float(T), float(beta))[0]
    else:
        rows = _rows_torch(s2, t2, kind, float(T), float(beta))
    if reduction == "mean":
        return rows.mean().to(student.dtype)
    if reduction == "sum":
        return rows.sum().to(student.dtype)
    return rows.reshape(lead).to(student.dtype)
