"""Low-bit weights and ``y = x @ W^T + b`` computed from them without a float copy of ``W``.

Format (``QuantizedWeight``): a weight ``[N, K]`` (``nn.Linear``'s ``[out, in]``) is split into
groups of ``group_size`` consecutive inputs of one output row; each group has a float32 scale
``s`` and, for uniform formats, a zero point ``z`` (in quantized units); ``q`` is an unsigned
``bits``-bit code (``bits`` 2, 3, 4 or 8) and

* uniform: ``w = (q - z) * s``;
* codebook (non-uniform: NF4, NUPES power grids, learned values): ``w = codebook[c, q] * s`` with
  a float32 ``codebook`` ``[1, 2^bits]`` (per tensor, ``c = 0``) or ``[N, 2^bits]`` (per output
  channel, ``c = n``).

``group_size`` 32, 64, 128, 256, ... (dividing ``K``), ``-1`` per output channel, ``0`` per
tensor (every row the same scale and zero). Uniform symmetric: ``z = 2^(bits-1)``,
``s = max|w| / (2^(bits-1) - 1)``; asymmetric: ``s = (max - min) / (2^bits - 1)``,
``z = round(-min / s)`` with the range widened to hold 0 (``min <= 0 <= max``: ``z`` is a code); codebook: ``s = max|w| / max|codebook|`` and ``q`` the nearest entry.
A group of zeros has ``s = 0`` (its weights are exactly 0 in every format).
Rounding to nearest. Packing (``qweight`` uint8 ``[N, K * bits / 8]``, ``group * bits / 8``
bytes per group, in planes so that the kernels unpack with a few contiguous vector loads): with
``P = group / planes``, bits 2, 4 and 8 (``planes = 8 / bits``) put value ``j * P + i`` of a
group in bits ``[j * bits, (j + 1) * bits)`` of the group's byte ``i``; bits 3 (``planes = 8``)
store the low two bits in the 2-bit layout (``2P`` bytes) followed by the third bits (bit ``j``
of byte ``2P + i`` is that of value ``j * P + i``). A group's length is therefore a multiple of
``planes`` (2-bit: 4, 3-bit: 8, 4-bit: 2).

``dequant_gemm(x, qw, bias)``: CPU kernels (``csrc/quant``): up to 16 rows of ``x`` stream each
packed row once and dequantize it in registers (memory-bound: 4-bit moves 1/8 of float32's
bytes, 2-bit 1/16; codebooks of up to 16 entries are looked up with in-register permutes); more
rows dequantize tiles of 256 output rows and use torch's GEMM. CUDA kernels
(``csrc/quant/quant_cuda.cu``): up to 16 rows, uniform 2/4/8-bit weights with float16 ``x``
(2/4-bit with bfloat16) decode into 16-bit floats (exact small integers ``q - z``) and multiply
on tensor cores with float32 sums scaled per group (``quant_gemv_mma_cuda.cu``); the other
formats, one warp per output row decodes the packed row in registers from coalesced 32-bit
loads; more rows of float16 / bfloat16 ``x`` go through tensor-core GEMMs (sm_80+): the
GEMV's formats a pipelined one that copies the packed bytes and ``x`` into shared memory with
``cp.async`` and decodes the words into fragment registers (``quant_gemm_pipe_cuda.cu``), the
other formats one that decodes the packed words into shared memory (``quant_mma_cuda.cu``); from
512 rows, and in every backward with 16-bit gradients, tiles of the weight dequantized in the
activations' dtype go to cuBLAS's 16-bit GEMM; the rest (float32 ``x``, the backward) dequantize tiles of about 64 MB for cuBLAS. Gradients flow to ``x``
(frozen-weight fine-tuning) and ``bias``, not to the packed weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._checks import as_int
from ._dtypes import cast_for_autocast


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_PLANES = {2: 4, 3: 8, 4: 2, 8: 1}   # values packed per byte position of a group


@dataclass
class QuantizedWeight:
    """The packed weight: ``qweight`` uint8 ``[N, K * bits / 8]``, ``scales`` float32
    ``[N, K / group]``, ``zeros`` (uniform formats) float32 ``[N, K / group]`` or None,
    ``codebook`` (non-uniform formats) float32 ``[1 or N, 2^bits]`` or None; ``group`` is the
    group length actually used (``K`` for per-channel and per-tensor)."""

    qweight: Tensor
    scales: Tensor
    zeros: Optional[Tensor]
    bits: int
    group: int
    codebook: Optional[Tensor] = None

    @property
    def shape(self) -> tuple:
        return (self.qweight.shape[0], self.qweight.shape[1] * 8 // self.bits)

    @property
    def op_args(self) -> tuple:
        """The op arguments ``(qweight, scales, zeros, codebook, bits, group)``."""
        return (self.qweight, self.scales, self.zeros, self.codebook, self.bits, self.group)

    def to(self, device) -> "QuantizedWeight":
        """The same weight on ``device`` (its tensors keep their dtypes: the kernels' layout)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"QuantizedWeight.to takes a device, got the dtype {device}: the packed "
                            "format's dtypes are fixed (uint8 codes, float32 scales / zeros / codebook)")
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(move(self.qweight), move(self.scales), move(self.zeros), self.bits,
                               self.group, move(self.codebook))

    @classmethod
    def from_int(cls, q: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int,
                 codebook: Optional[Tensor] = None) -> "QuantizedWeight":
        """Import integer weights quantized elsewhere (GPTQ / AWQ style): ``q`` ``[N, K]`` of
        codes in ``[0, 2^bits)``, ``scales`` and ``zeros`` ``[N, K / group_size]`` (finite; zeros in
        quantized units, or None for ``z = 0``: a symmetric export's ``2^(bits-1)`` must be
        passed), or an optional ``codebook`` without zeros (module docstring)."""
        bits = _check_bits(bits)
        if not isinstance(q, Tensor) or q.dim() != 2 or q.numel() == 0:
            raise ValueError(f"QuantizedWeight.from_int: q must be a non-empty [N, K] tensor of codes, got "
                             f"{tuple(getattr(q, 'shape', ()))}")
        n, k = q.shape
        group = _group_length(group_size, k, bits)
        if q.dtype.is_floating_point or int(q.min()) < 0 or int(q.max()) >= 1 << bits:
            raise ValueError(f"QuantizedWeight.from_int: q must hold integers in [0, {1 << bits})")
        if zeros is not None and codebook is not None:
            raise ValueError("QuantizedWeight.from_int: a codebook format has no zero points (pass zeros=None)")
        expect = (n, k // group)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t is None and name == "zeros":
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != expect:
                raise ValueError(f"QuantizedWeight.from_int: {name} must be a float tensor {list(expect)}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if not t.is_meta and not bool(torch.isfinite(t).all()):
                raise ValueError(f"QuantizedWeight.from_int: {name} must hold finite values")
        return cls(_pack(q.to(torch.int32), bits, group), scales.float().contiguous(),
                   None if zeros is None else zeros.float().contiguous(), bits, group,
                   None if codebook is None else _check_codebook(codebook, bits, n))


def _check_bits(bits) -> int:
    """bits, checked, as an int."""
    bits = as_int(bits)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in _PLANES:
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    return bits


def _group_length(group_size: int, k: int, bits: int) -> int:
    group_size = as_int(group_size)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"group_size must be an int (-1 per channel, 0 per tensor), got {group_size!r}")
    group = k if group_size in (-1, 0) else group_size
    if group < 1 or k % group:
        raise ValueError(f"group_size ({group_size}) must divide the input features K = {k} "
                         "(or be -1 per channel, 0 per tensor)")
    if group % _PLANES[bits]:
        raise ValueError(f"{bits}-bit groups must have a length divisible by {_PLANES[bits]}, got {group}")
    return group


def _check_codebook(codebook: Tensor, bits: int, n: int) -> Tensor:
    cb = torch.as_tensor(codebook)
    cb = cb.reshape(1, -1) if cb.dim() == 1 else cb
    if cb.dim() != 2 or cb.shape[1] != 1 << bits or cb.shape[0] not in (1, n) or not cb.is_floating_point():
        raise ValueError(f"codebook must be a float tensor of 2^bits = {1 << bits} values, per tensor "
                         f"[{1 << bits}] / [1, {1 << bits}] or per output channel [{n}, {1 << bits}], "
                         f"got {tuple(cb.shape)}")
    if not bool(torch.isfinite(cb).all()):
        raise ValueError("codebook must hold finite values")
    return cb.float().contiguous()


def _pack(q: Tensor, bits: int, group: int) -> Tensor:
    """Codes ``[N, K]`` into the plane layout (module docstring)."""
    n, k = q.shape
    if bits == 3:
        low = _pack(q & 3, 2, group).reshape(n, k // group, group // 4)
        high = _pack(q >> 2, 1, group).reshape(n, k // group, group // 8)
        return torch.cat([low, high], 2).reshape(n, k * 3 // 8).contiguous()
    # bits 1 (the third bits of 3-bit codes), 2, 4, 8: plane j of a group in bits [j*bits, ...)
    planes = 8 // bits
    qg = q.reshape(n, k // group, planes, group // planes)
    packed = torch.zeros(n, k // group, group // planes, dtype=torch.int32, device=q.device)
    for j in range(planes):
        packed |= qg[:, :, j] << (j * bits)
    return packed.to(torch.uint8).reshape(n, k * bits // 8).contiguous()


def _nearest_code(t: Tensor, codebook: Tensor) -> Tensor:
    """Index of the codebook entry nearest to each value of ``t`` ``[N, K]`` (codebook
    ``[1 or N, C]``), by binary search over the sorted entries' midpoints."""
    values, order = codebook.sort(-1)
    mid = ((values[:, 1:] + values[:, :-1]) / 2).expand(t.shape[0], -1).contiguous()
    pos = torch.searchsorted(mid, t.contiguous())
    return order.expand(t.shape[0], -1).gather(1, pos)


def quantize_weight(w: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                    codebook: Optional[Tensor] = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` ``[N, K]`` into the packed format (module
    docstring); with ``codebook`` (``[2^bits]``, ``[1, 2^bits]`` or ``[N, 2^bits]``, e.g.
    :func:`nf_codebook` or :func:`power_codebook`) the non-uniform format."""
    bits = _check_bits(bits)
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a floating [N, K] tensor, got "
                         f"{getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"quantize_weight: w must have at least one row and one column, got {tuple(w.shape)}")
    group = _group_length(group_size, k, bits)
    if not w.is_meta and not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_weight: w must hold finite values (a NaN or inf has no code)")
    if codebook is not None:
        if not symmetric:
            raise ValueError("quantize_weight: a codebook format has no zero points (symmetric must be True)")
        codebook = _check_codebook(codebook, bits, n).to(w.device)
        if not codebook.is_meta and not bool((codebook.abs().amax(1) > 0).all()):
            raise ValueError("quantize_weight: every codebook row needs a nonzero value (the scale is "
                             "max|w| / max|codebook|)")
    wf = w.detach().float().reshape(n, k // group, group)
    if group_size == 0:  # per tensor: one range for every row
        wf_all = wf.reshape(1, 1, -1)
        lo, hi = wf_all.amin(-1, keepdim=True).expand(n, k // group, 1), wf_all.amax(-1, keepdim=True).expand(n, k // group, 1)
    else:
        lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    absmax = torch.maximum(hi.abs(), lo.abs())
    if codebook is not None:
        reach = codebook.abs().amax(1).reshape(-1, 1, 1)   # the codebook's largest magnitude
        scale = absmax / reach
        vanishing = ~(scale > 0)   # (zeros, or values whose scale underflows)
        scale = torch.where(vanishing, torch.ones_like(scale), scale)
        q = _nearest_code((wf / scale).reshape(n, k), codebook)
        # such a group gets scale 0: its codes (the entry nearest 0) are not 0 in a codebook
        # without an exact zero
        scale = torch.where(vanishing, torch.zeros_like(scale), scale)
        return QuantizedWeight(_pack(q.to(torch.int32), bits, group), scale.reshape(n, -1).contiguous(),
                               None, bits, group, codebook)
    qmax = (1 << bits) - 1
    if symmetric:
        zero = torch.full_like(lo, float(1 << (bits - 1)))
        scale = absmax / ((1 << (bits - 1)) - 1)
        vanishing = ~(scale > 0)   # zeros, or values whose scale underflows
    else:
        # the range widened to hold 0, so that the zero point is a code in [0, qmax] (as GPTQ's
        # and torch's observers do): a group of one sign had kept [min, max], and its zero point,
        # clamped into the codes, moved every value (0.7 -> 1.0)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / qmax
        vanishing = ~(scale > 0)
        scale = torch.where(vanishing, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    scale = torch.where(vanishing, torch.ones_like(scale), scale)   # (for the codes)
    q = torch.clamp(torch.round(wf / scale) + zero, 0, qmax).to(torch.int32).reshape(n, k)
    # An all-zero group gets scale 0, so that its weights are 0 in every kernel: with scale 1 and
    # the symmetric zero point 2^(bits-1), the kernels that apply zero points as s (q.x - z sum(x))
    # left float32 rounding noise in place of its zero contribution (relative to the row's other,
    # possibly much smaller, groups: 1e-3 of a row of weights ~1e-3, ~15% at 8 bits and 1e-4)
    # (also a group of values so small that its scale underflowed to 0: 1e-45 had kept s = 1)
    scale = torch.where(vanishing, torch.zeros_like(scale), scale)
    return QuantizedWeight(_pack(q, bits, group), scale.reshape(n, -1).contiguous(),
                           zero.reshape(n, -1).contiguous(), bits, group)


def nf_codebook(bits: int = 4) -> Tensor:
    """The NormalFloat grid of QLoRA (NF4 at ``bits=4``): quantiles of the standard normal,
    ``2^(bits-1)`` positive levels, ``2^(bits-1) - 1`` negative ones and an exact zero,
    normalized to [-1, 1]; float32 ``[2^bits]``, ascending."""
    bits = _check_bits(bits)
    n = 1 << bits
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def power_codebook(bits: int, exponent: float) -> Tensor:
    """A power-exponent grid (NUPES): ``sign(t) |t|^exponent`` for ``2^bits`` evenly spaced
    ``t`` in [-1, 1] (``exponent > 1`` puts more levels near zero, for bell-shaped weights);
    float32 ``[2^bits]``, ascending."""
    bits = _check_bits(bits)
    if not exponent > 0:
        raise ValueError(f"power_codebook: exponent must be > 0, got {exponent}")
    t = torch.linspace(-1, 1, 1 << bits, dtype=torch.float64)
    return (t.sign() * t.abs() ** exponent).float()


# ---- ops: fake kernels -------------------------------------------------------------------------

@torch.library.register_fake("fastloss::dequant_gemm")
def _fake_gemm(x, qweight, scales, zeros, codebook, bits, group_size, bias):
    torch._check(x.dim() == 2, lambda: "x must be [M, K]")
    torch._check(bias is None or bias.dtype == x.dtype,
                 lambda: f"dequant_gemm: bias is {bias.dtype} but x is {x.dtype}")
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("fastloss::dequant_gemm_grad_input")
def _fake_grad_input(grad_y, qweight, scales, zeros, codebook, bits, group_size):
    return grad_y.new_empty((grad_y.shape[0], qweight.shape[1] * 8 // bits))


@torch.library.register_fake("fastloss::dequantize_weight")
def _fake_dequantize(qweight, scales, zeros, codebook, bits, group_size):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 8 // bits), dtype=torch.float32)


# Autograd of dequant_gemm and dequant_gemm_grad_input: csrc/quant/quant_op.cpp (C++, so that a
# call that records nothing runs no Python between the op and its kernel).


def dequantize_weight(qw: QuantizedWeight) -> Tensor:
    """The exact float32 weights ``[N, K]`` the kernels use."""
    return torch.ops.fastloss.dequantize_weight(*qw.op_args)


def dequant_gemm(x: Tensor, qw: QuantizedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequantize_weight(qw).T + bias`` for ``x`` ``[..., K]`` (float32, float16 or
    bfloat16; the result has ``x``'s dtype, float32 accumulation; under autocast ``x`` and
    ``bias`` are cast to its dtype first, as ``F.linear`` casts them; outside it a ``bias`` of
    another dtype than ``x``'s raises, as in ``F.linear``). On CPUs with AMX-INT8, 1-16
    rows of ``x`` against uniform 2-, 3-, 4- or 8-bit weights take integer tile products: each group
    of ``x`` in fixed point (rounded by at most 2^-30 of the group's largest ``|x|``), exact
    integer sums, then float32; ``fastloss.set_cpu_isa("avx512")`` gives float32 FMAs."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"dequant_gemm: qw must be a QuantizedWeight (from quantize_weight), got "
                        f"{type(qw).__name__}")
    if not isinstance(x, Tensor) or x.dtype not in _FLOATS:
        raise ValueError(f"dequant_gemm: x must be a float32, float16 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x))}")
    x, bias = cast_for_autocast(x, bias)
    k = qw.shape[1]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"dequant_gemm: x must be [..., {k}] (the weight's input features), got "
                         f"{tuple(x.shape)}")
    # (the op refuses qw's tensors that require grad; a 2-D x goes as it is: every view costs a
    # few microseconds after a weight stream has evicted the interpreter's lines)
    if x.dim() == 2:
        return torch.ops.fastloss.dequant_gemm(x, *qw.op_args, bias)
    y = torch.ops.fastloss.dequant_gemm(x.reshape(-1, k), *qw.op_args, bias)
    return y.reshape(*x.shape[:-1], qw.shape[0])
