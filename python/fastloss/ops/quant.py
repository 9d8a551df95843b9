"""Low-bit weights and ``y = x @ W^T + b`` computed from them without a float copy of ``W``.

Format (``QuantizedWeight``): a weight ``[N, K]`` (``nn.Linear``'s ``[out, in]``) is split into
groups of ``group_size`` consecutive inputs of one output row; each group has a float32 scale
``s`` and zero point ``z`` (in quantized units), and ``w = (q - z) * s`` with ``q`` an unsigned
``bits``-bit integer. ``bits`` is 4 or 8 (2 and 3 are not supported yet); ``group_size`` 32, 64,
128, 256, ... (dividing ``K``), ``-1`` per output channel, ``0`` per tensor (every row the same
scale and zero). Symmetric: ``z = 2^(bits-1)``, ``s = max|w| / (2^(bits-1) - 1)``; asymmetric:
``s = (max - min) / (2^bits - 1)``, ``z = round(-min / s)``. Rounding to nearest. Packing
(``qweight`` uint8 ``[N, K * bits / 8]``): 8-bit one byte per value; 4-bit, within each group,
byte ``i`` holds value ``i`` in its low nibble and value ``group_size / 2 + i`` in its high nibble.

``dequant_gemm(x, qw, bias)``: CPU kernels (``csrc/quant``): up to 16 rows of ``x`` stream each
packed row once and dequantize it in registers (memory-bound: 4-bit moves 1/8 of float32's
bytes); more rows dequantize tiles of 256 output rows and use torch's GEMM. Gradients flow to
``x`` (frozen-weight fine-tuning) and ``bias``, not to the packed weight. CUDA kernels are not
written yet: CUDA tensors are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantizedWeight:
    """The packed weight: ``qweight`` uint8 ``[N, K * bits / 8]``, ``scales`` and ``zeros``
    float32 ``[N, K / group]``; ``group`` is the group length actually used (``K`` for per-channel
    and per-tensor)."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group: int

    @property
    def shape(self) -> tuple:
        return (self.qweight.shape[0], self.qweight.shape[1] * 8 // self.bits)

    @classmethod
    def from_int(cls, q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> "QuantizedWeight":
        """Import integer weights quantized elsewhere (GPTQ / AWQ style): ``q`` ``[N, K]`` of
        values in ``[0, 2^bits)``, ``scales`` and ``zeros`` ``[N, K / group_size]`` (zeros in
        quantized units), ``w = (q - zeros) * scales``."""
        _check_bits(bits)
        n, k = q.shape
        group = _group_length(group_size, k, bits)
        if q.dtype.is_floating_point or int(q.min()) < 0 or int(q.max()) >= 1 << bits:
            raise ValueError(f"QuantizedWeight.from_int: q must hold integers in [0, {1 << bits})")
        expect = (n, k // group)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != expect:
                raise ValueError(f"QuantizedWeight.from_int: {name} must be {list(expect)}, got {tuple(t.shape)}")
        return cls(_pack(q.to(torch.int32), bits, group), scales.float().contiguous(),
                   zeros.float().contiguous(), bits, group)


def _check_bits(bits):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (2 and 3 are not supported yet), got {bits}")


def _group_length(group_size: int, k: int, bits: int) -> int:
    group = k if group_size in (-1, 0) else group_size
    if group < 1 or k % group:
        raise ValueError(f"group_size ({group_size}) must divide the input features K = {k} "
                         "(or be -1 per channel, 0 per tensor)")
    if bits == 4 and group % 2:
        raise ValueError(f"4-bit groups must have an even length, got {group}")
    return group


def _pack(q: Tensor, bits: int, group: int) -> Tensor:
    n, k = q.shape
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    half = group // 2
    qg = q.reshape(n, k // group, group)
    return (qg[:, :, :half] | (qg[:, :, half:] << 4)).to(torch.uint8).reshape(n, k // 2).contiguous()


def quantize_weight(w: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` ``[N, K]`` into the packed format (module docstring)."""
    _check_bits(bits)
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a floating [N, K] tensor, got "
                         f"{getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}")
    n, k = w.shape
    group = _group_length(group_size, k, bits)
    wf = w.detach().float().reshape(n, k // group, group)
    if group_size == 0:  # per tensor: one range for every row
        wf_all = wf.reshape(1, 1, -1)
        lo, hi = wf_all.amin(-1, keepdim=True).expand(n, k // group, 1), wf_all.amax(-1, keepdim=True).expand(n, k // group, 1)
    else:
        lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    qmax = (1 << bits) - 1
    if symmetric:
        zero = torch.full_like(lo, float(1 << (bits - 1)))
        scale = torch.maximum(hi.abs(), lo.abs()) / ((1 << (bits - 1)) - 1)
    else:
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # all-zero groups
    q = torch.clamp(torch.round(wf / scale) + zero, 0, qmax).to(torch.int32).reshape(n, k)
    return QuantizedWeight(_pack(q, bits, group), scale.reshape(n, -1).contiguous(),
                           zero.reshape(n, -1).contiguous(), bits, group)


# ---- ops: fake kernels and autograd ------------------------------------------------------------

@torch.library.register_fake("fastloss::dequant_gemm")
def _fake_gemm(x, qweight, scales, zeros, bits, group_size, bias):
    torch._check(x.dim() == 2, lambda: "x must be [M, K]")
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("fastloss::dequant_gemm_grad_input")
def _fake_grad_input(grad_y, qweight, scales, zeros, bits, group_size):
    return grad_y.new_empty((grad_y.shape[0], qweight.shape[1] * 8 // bits), dtype=torch.float32)


@torch.library.register_fake("fastloss::dequantize_weight")
def _fake_dequantize(qweight, scales, zeros, bits, group_size):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 8 // bits), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, qweight, scales, zeros, bits, group_size, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.args = (bits, group_size)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y):
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fastloss.dequant_gemm_grad_input(grad_y, qweight, scales, zeros,
                                                            *ctx.args).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad_y.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias


torch.library.register_autograd("fastloss::dequant_gemm", _backward, setup_context=_setup)


def dequantize_weight(qw: QuantizedWeight) -> Tensor:
    """The exact float32 weights ``[N, K]`` the kernels use."""
    return torch.ops.fastloss.dequantize_weight(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group)


def dequant_gemm(x: Tensor, qw: QuantizedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequantize_weight(qw).T + bias`` for ``x`` ``[..., K]`` (float32, float16 or
    bfloat16; the result has ``x``'s dtype, float32 accumulation)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"dequant_gemm: qw must be a QuantizedWeight (from quantize_weight), got "
                        f"{type(qw).__name__}")
    if not isinstance(x, Tensor) or x.dtype not in _FLOATS:
        raise ValueError(f"dequant_gemm: x must be a float32, float16 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x))}")
    k = qw.shape[1]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"dequant_gemm: x must be [..., {k}] (the weight's input features), got "
                         f"{tuple(x.shape)}")
    y = torch.ops.fastloss.dequant_gemm(x.reshape(-1, k), qw.qweight, qw.scales, qw.zeros,
                                        qw.bits, qw.group, bias)
    return y.reshape(*x.shape[:-1], qw.shape[0])
