"""The dtype a loss comes back in, and autocast: one rule for every family.

torch's losses return the inputs' dtype (``F.cross_entropy`` of bfloat16 logits is a bfloat16
loss), except under ``torch.autocast``, which runs them in float32 and so returns float32.
fastloss's kernels read 16-bit inputs as they are and sum in float32 in either case; their ops
return that float32 loss, and :func:`as_loss_dtype` rounds it to the inputs' dtype outside
autocast. The ops with a C++ autograd formula (row, fused linear, distillation, Dice, AnyLoss,
AUC and CLIP losses) round it themselves when the caller passes ``round_loss=True``
(:func:`call_rounding`, by :func:`rounds_loss`): no cast op and autograd node after them,
~10-20% of a small 16-bit call's host time. (Rounding inside the op whatever autocast said,
as before 2026-11-30, gave a bfloat16 loss under autocast: 8 significant bits, a ``"sum"``
over 4096 tokens of 39424 against 39395.1.)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype where autocast is on for ``x``'s device, else None (meta tensors and
    other devices without autocast: None)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(*tensors):
    """``tensors`` in the autocast dtype where autocast is on for the first one's device, as
    torch casts the inputs of F.linear and F.conv1d (float64 and non-floating tensors, and
    None, as they are); otherwise as they are. For the ops that are a linear layer or a
    convolution at heart: the fused linear losses, dequant_gemm, dilated_conv1d."""
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def as_loss_dtype(loss: Tensor, like: Tensor) -> Tensor:
    """``loss`` (summed in float32) as torch's losses return it: float32 under autocast for
    ``like``'s device, ``like``'s dtype otherwise."""
    if loss.dtype == like.dtype or autocast_dtype(like) is not None:
        return loss
    return loss.to(like.dtype)


def rounds_loss(like) -> bool:
    """Whether a loss summed in float32 goes back in ``like``'s 16-bit dtype (outside autocast):
    :func:`as_loss_dtype`'s rule, as the ``round_loss`` flag of the ops that round it
    themselves. False for float32 inputs (nothing to round) and for non-tensors (the op's own
    checks name what is wrong)."""
    return (isinstance(like, Tensor) and like.dtype in (torch.bfloat16, torch.float16)
            and autocast_dtype(like) is None)


def fake_loss(like: Tensor, shape, round_loss: bool) -> Tensor:
    """A fake kernel's loss of ``shape``: float32, or ``like``'s dtype with ``round_loss``, as
    the real op returns it."""
    return like.new_empty(shape, dtype=like.dtype if round_loss else torch.float32)


def call_rounding(op, like, *args):
    """``op(*args)`` for an op that takes ``round_loss`` (its loss in ``like``'s 16-bit dtype,
    rounded inside it): the keyword passed only where :func:`rounds_loss` holds, which costs a
    call ~0.6 us of argument parsing."""
    return op(*args, round_loss=True) if rounds_loss(like) else op(*args)


def without_autocast(x: Tensor):
    """A context with autocast off for ``x``'s device, for a fastloss function's own torch
    operations (autocast would redo its float32 GEMMs in 16 bits; the C++ ops are shielded
    in csrc/registration.cpp)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def runs_without_autocast(fn):
    """Decorate a function (an autograd.Function's forward or backward, whose torch GEMMs work
    in float32) to run with autocast off for the device of its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = next((a for a in args if isinstance(a, Tensor)), None)
        if x is None:
            return fn(*args, **kwargs)
        with without_autocast(x):
            return fn(*args, **kwargs)
    return wrapper
