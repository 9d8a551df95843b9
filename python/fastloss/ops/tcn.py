"""Dilated 1-D convolution for temporal convolution networks (TCNCA-style stacks).

``dilated_conv1d(x, weight, bias, dilation, causal)`` with ``x`` ``[B, C, L]``:

* depthwise ``weight [C, K]``: ``y[b, c, t] = bias[c] + sum_k weight[c, k] x[b, c, t - P + k d]``
  with ``x`` zero outside ``[0, L)``; ``P = d (K - 1)`` when ``causal`` (output ``t`` sees
  inputs up to ``t`` only), ``P = d (K - 1) // 2`` otherwise (centred; for even ``K`` one more
  tap on the right, as ``padding="same"`` does). Output length ``L`` either way, whatever
  ``L`` is against the receptive field ``d (K - 1) + 1`` (missing inputs are zeros).
  It runs fastloss's kernels (``csrc/tcn``: AVX2 / AVX-512 on the CPU, CUDA on a GPU when
  fastloss was built with CUDA), forward and backward, on channels-first memory or on
  channels-last memory (``x = x_blc.transpose(1, 2)`` of a contiguous ``[B, L, C]`` tensor: no
  copy, and the output comes back in the same layout).
* full or grouped ``weight [C_out, C / groups, K]``: ``F.conv1d`` with the same padding
  (no fastloss kernel yet).

float32, float16, bfloat16; float32 math inside the kernels. float64 (gradcheck, float64
models) takes ``F.conv1d`` with the same padding, as full weights do (no fastloss kernel). Under ``torch.autocast``,
``dilated_conv1d`` casts its inputs to the autocast dtype as ``F.conv1d`` does (output in that
dtype); ``tcn_level`` takes them as they are (float32 ``x`` gives a float32 result, as the unfused
``x + act(conv(x))`` does; its convolution in float32 too, on either path).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import as_int
from ._dtypes import cast_for_autocast, without_autocast
from ._devices import has_kernel
from ._autograd import once_differentiable

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _like_the_kernels_output(x):
    """An empty tensor laid out as the ops' outputs are (tcn_op.cpp: canonical, then
    empty_like): x's own strides where x is dense channels last, a channels-last copy's where
    it is channels last otherwise, else contiguous. (empty_like(x) had kept the strides of a
    permuted or expanded x, which the kernels' outputs do not have: torch.compile's stride
    checks failed on them.)"""
    if x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) != 1:
        blc = x.transpose(1, 2)
        return torch.empty_like(x if blc.is_contiguous() else blc.contiguous().transpose(1, 2))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastloss::dilated_conv1d_forward")
def _fake_forward(x, weight, bias, dilation, pad):
    torch._check(x.dim() == 3, lambda: f"x must be 3-D [B, C, L], got {tuple(x.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[0] == x.shape[1],
                 lambda: f"a depthwise weight must be [C, K] with C = {x.shape[1]}")
    return _like_the_kernels_output(x)


@torch.library.register_fake("fastloss::dilated_conv1d_backward")
def _fake_backward(grad_y, x, weight, dilation, pad, grad_mask):
    return (_like_the_kernels_output(x) if grad_mask[0] else x.new_empty((0,)),
            weight.new_empty(weight.shape if grad_mask[1] else (0,)),
            weight.new_empty((weight.shape[0],) if grad_mask[2] else (0,)))


def _setup(ctx, inputs, output):
    x, weight, bias, dilation, pad = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation, ctx.pad, ctx.has_bias = dilation, pad, bias is not None


@once_differentiable("dilated_conv1d")
def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.fastloss.dilated_conv1d_backward(grad_y, x, weight, ctx.dilation,
                                                            ctx.pad, need)
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None, None)


torch.library.register_autograd("fastloss::dilated_conv1d_forward", _backward, setup_context=_setup)


@torch.library.register_fake("fastloss::tcn_level_forward")
def _fake_level(x, weight, bias, dilation, pad, act):
    return _fake_forward(x, weight, bias, dilation, pad)


@torch.library.register_fake("fastloss::tcn_level_backward")
def _fake_level_backward(grad_y, x, weight, bias, dilation, pad, act, grad_mask):
    return _fake_backward(grad_y, x, weight, dilation, pad, grad_mask)


def _setup_level(ctx, inputs, output):
    x, weight, bias, dilation, pad, act = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.dilation, ctx.pad, ctx.act = dilation, pad, act


@once_differentiable("tcn_level")
def _backward_level(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.fastloss.tcn_level_backward(grad_y, x, weight, bias, ctx.dilation,
                                                       ctx.pad, ctx.act, need)
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
            None, None, None)


torch.library.register_autograd("fastloss::tcn_level_forward", _backward_level,
                                setup_context=_setup_level)

# activation name -> (kernel code, the same function in torch)
ACTIVATIONS = {None: (0, lambda h: h), "relu": (1, F.relu), "silu": (2, F.silu), "gelu": (3, F.gelu)}


def left_padding(kernel_size: int, dilation: int, causal: bool) -> int:
    """P of the formula above: the inputs before t that output t sees."""
    span = dilation * (kernel_size - 1)
    return span if causal else span // 2


def _dilation_is_int(dilation) -> bool:
    return isinstance(dilation, int) and not isinstance(dilation, bool) and dilation >= 1


def _padding_fits(dilation: int, k: int) -> bool:
    return dilation * (k - 1) < 1 << 62  # (the padding must fit an int64 index)


def dilated_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, dilation: int = 1,
                   causal: bool = True, groups: Optional[int] = None) -> Tensor:
    """Dilated convolution along the last axis of ``x [B, C, L]`` (see the module docstring).

    Args:
        weight: ``[C, K]`` (depthwise) or ``[C_out, C / groups, K]``.
        bias: ``[C]`` (``[C_out]``) or None.
        dilation: ``d >= 1``.
        causal: left padding only (True) or centred.
        groups: for a 3-D weight; None means ``C / weight.shape[1]``.
    """
    fn = "dilated_conv1d"
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be 3-D [B, C, L], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS and x.dtype != torch.float64:
        raise ValueError(f"{fn}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    dilation = as_int(dilation)
    if not _dilation_is_int(dilation):
        raise ValueError(f"{fn}: dilation must be an int >= 1, got {dilation!r}")
    if not isinstance(causal, bool):  # (F.conv1d's positional stride, padding must not land here)
        raise ValueError(f"{fn}: causal must be True or False, got {causal!r} (F.conv1d's "
                         f"padding='same' is causal=False)")
    if weight.dim() not in (2, 3) or weight.shape[-1] < 1:
        raise ValueError(f"{fn}: weight must be [C, K] (depthwise) or [C_out, C / groups, K] "
                         f"with K >= 1, got shape {tuple(weight.shape)}")
    c, k = x.shape[1], weight.shape[-1]
    if weight.dim() == 2 and weight.shape[0] != c:
        raise ValueError(f"{fn}: a depthwise weight must be [C, K] with C = {c} (x's channels), "
                         f"got shape {tuple(weight.shape)}")
    out_channels = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"{fn}: bias must be [{out_channels}], got shape {tuple(bias.shape)}")
    if not _padding_fits(dilation, k):
        raise ValueError(f"{fn}: dilation * (K - 1) must be below 2^62, got {dilation} * {k - 1}")
    pad = left_padding(k, dilation, causal)
    x, weight, bias = cast_for_autocast(x, weight, bias)  # (as F.conv1d; the torch path's own)
    if weight.dim() == 2 and has_kernel(x) and x.dtype in _FLOATS:
        return torch.ops.fastloss.dilated_conv1d_forward(x, weight, bias, dilation, pad)
    for name, t in (("weight", weight), ("bias", bias)):  # (the kernels' check, in their words)
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{fn}: {name} is {t.dtype} but x is {x.dtype}")
    if weight.dim() == 2:
        w3, g = weight.unsqueeze(1), c
    else:
        g = groups if groups is not None else c // max(weight.shape[1], 1)
        if weight.shape[1] * g != c or out_channels % g:
            raise ValueError(f"{fn}: weight {tuple(weight.shape)} and groups={g} do not fit "
                             f"{c} input channels")
        w3 = weight
    return F.conv1d(F.pad(x, (pad, dilation * (k - 1) - pad)), w3, bias, dilation=dilation, groups=g)


def tcn_level(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, dilation: int = 1,
              activation: Optional[str] = "gelu", causal: bool = True) -> Tensor:
    """One TCN level, ``x + act(dilated_conv1d(x, weight, bias, dilation, causal))``, fused for
    depthwise weights: one pass over ``x`` forward, and a backward that recomputes the
    convolution instead of keeping its output and the activation's (only ``x`` is saved).
    ``activation``: ``"gelu"`` (the erf form, as ``F.gelu``), ``"relu"``, ``"silu"`` or None.
    Full or grouped weights (or CUDA tensors in a build without CUDA): the same composition of
    torch operations.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"tcn_level: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"tcn_level: causal must be True or False, got {causal!r}")
    code, act = ACTIVATIONS[activation]
    dilation = as_int(dilation)
    fused = (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() == 3
             and weight.dim() == 2 and has_kernel(x) and x.dtype in _FLOATS
             and weight.shape[0] == x.shape[1] and weight.shape[-1] >= 1
             and _dilation_is_int(dilation) and _padding_fits(dilation, weight.shape[-1]))
    if not fused:  # (the convolution in x's dtype, as the fused kernel: autocast off)
        with without_autocast(x):
            return x + act(dilated_conv1d(x, weight, bias, dilation, causal))
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"tcn_level: bias must be [{x.shape[1]}], got shape {tuple(bias.shape)}")
    pad = left_padding(weight.shape[1], dilation, causal)
    return torch.ops.fastloss.tcn_level_forward(x, weight, bias, dilation, pad, code)
