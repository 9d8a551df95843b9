"""CUDA kernels run on the CPU under the test emulator (tests/cuda_emu), against float64
references, or against the CPU ops (themselves tested against float64 references: top-k, PLD,
Sinkhorn, Dice, the confusion sums, the similarity rows) or ICNN's torch form: the dilated convolution (csrc/tcn/tcn_cuda.cu: forward with every epilogue and the
taps' gradient, both layouts, every dtype) and the low-bit dequant GEMM (csrc/quant/quant_cuda.cu:
the warp-per-row GEMV and the dequantize kernel; quant_mma_cuda.cu: the tensor-core GEMM, its
mma.sync modelled by tests/cuda_emu/include/mma_emu.h; every format). Inputs sit between NaN guards (a
read out of bounds poisons the result), outputs between sentinel guards that must stay
untouched, and scratch memory starts as NaN (a partial sum left unwritten poisons the result).

This checks the kernels' indexing, grid shapes, reductions, barriers (a __syncthreads or a
warp shuffle that some threads miss, or that lanes reach at different call sites or with
different masks, is an error here), __launch_bounds__, shared memory read before it is written
(it starts as NaN in every block) and load alignment; it sees data races only as results that
change with the thread order (test_results_do_not_depend_on_the_thread_order), and no GPU
timing. The CUDA tests of test_tcn.py and test_quant.py run the same kernels
on a GPU where there is one.
"""

import ctypes
import re

import pytest
import torch
import torch.nn.functional as F

from cuda_emu import build
from fastloss import ops
from fastloss.reference import quant as quant_ref

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SENTINEL = -7777.0
GUARD = 64
ACTS = {0: lambda h: h, 1: torch.relu, 2: F.silu, 3: F.gelu}

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def tcn_lib():
    lib = build.build("tcn/tcn_cuda.cu", "tcn_harness.cpp", "tcn")
    P, I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.emu_conv_forward.argtypes = [P, ctypes.c_int, I64, P, P, I64, P, P]
    lib.emu_conv_forward.restype = ctypes.c_char_p
    lib.emu_weight_grad_scratch.argtypes = [ctypes.c_int, I64, I64]
    lib.emu_weight_grad_scratch.restype = ctypes.c_int64
    lib.emu_weight_grad.argtypes = [P, P, ctypes.c_int, I64, I64, P, P, P]
    lib.emu_weight_grad.restype = ctypes.c_char_p
    return lib


def int64s(*values):
    return (ctypes.c_int64 * len(values))(*values)


def guarded(t, fill):
    """t's values and strides (t dense) inside a larger buffer whose rest holds `fill`; returns
    (view, buffer)."""
    buf = torch.full((t.numel() + 2 * GUARD,), fill, dtype=t.dtype)
    view = buf[GUARD:GUARD + t.numel()].as_strided(t.shape, t.stride())
    view.copy_(t)
    return view, buf


def check_guards(buf, what):
    guards = torch.cat([buf[:GUARD], buf[-GUARD:]])
    assert (guards == torch.tensor(SENTINEL, dtype=buf.dtype)).all(), f"{what}: the kernel wrote outside its output"


def dims_of(x):
    """SeqView's B, C, L and strides, as tcn_op.cpp's view_of fills them."""
    b, c, length = x.shape
    sb, sc, st = x.stride()
    if c == 1:
        sc = length
    if length == 1:
        st = 1
    return int64s(b, c, length, sb, sc, st)


def make(shape, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype)


def conv64(x, w, bias, dilation, pad):
    """float64 reference: y[b, c, t] = bias[c] + sum_k w[c, k] x[b, c, t - pad + k d]."""
    k = w.shape[1]
    xp = F.pad(x.double(), (pad, dilation * (k - 1) - pad))
    return F.conv1d(xp, w.double().unsqueeze(1), None if bias is None else bias.double(),
                    dilation=dilation, groups=x.shape[1])


def close(actual, expected, dtype, what):
    tol = TOL[dtype]
    mag = max(expected.abs().max().item() if expected.numel() else 1.0, 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * mag,
                               msg=lambda m: f"{what}: {m}")


def run_forward(lib, x, w, bias, dilation, pad, act=0, mode=0, other=None):
    """The CUDA forward kernel on x (float32 taps [C, K]) -> y in x's layout."""
    channels_last = x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) != 1
    taps = (w.t() if channels_last else w).float().contiguous()
    b32 = None if bias is None else bias.float().contiguous()
    xg, _ = guarded(x, float("nan"))
    og = None if other is None else guarded(other, float("nan"))[0]
    y, ybuf = guarded(torch.full_like(x, float("nan")), SENTINEL)
    y.fill_(float("nan"))
    err = lib.emu_conv_forward(xg.data_ptr(), DTYPE_CODES[x.dtype], dims_of(xg), taps.data_ptr(),
                               None if b32 is None else b32.data_ptr(),
                               int64s(w.shape[1], dilation, pad, act, mode),
                               None if og is None else og.data_ptr(), y.data_ptr())
    assert err is None, err.decode()
    check_guards(ybuf, "forward")
    assert y.stride() == x.stride()
    return y.clone()


def run_weight_grad(lib, x, g, k, dilation, pad, want_bias=True):
    conv = int64s(k, dilation, pad, 0, 0)
    xg, _ = guarded(x, float("nan"))
    gg, _ = guarded(g, float("nan"))
    n = lib.emu_weight_grad_scratch(DTYPE_CODES[x.dtype], dims_of(xg), conv)
    assert 0 < n <= 4 * x.numel() + 64 * x.shape[1] * (k + 1) * 1024, "scratch out of proportion"
    scratch = torch.full((n,), float("nan"))
    gw, gwbuf = guarded(torch.full((x.shape[1], k), float("nan")), SENTINEL)
    gb, gbbuf = guarded(torch.full((x.shape[1],), float("nan")), SENTINEL)
    err = lib.emu_weight_grad(xg.data_ptr(), gg.data_ptr(), DTYPE_CODES[x.dtype], dims_of(xg), conv,
                              gw.data_ptr(), gb.data_ptr() if want_bias else None,
                              scratch.data_ptr())
    assert err is None, err.decode()
    check_guards(gwbuf, "grad_w")
    check_guards(gbbuf, "grad_b")
    assert want_bias or gb.isnan().all(), "grad_b written though not wanted"
    return gw.clone(), gb.clone()


def weight_grad64(x, g, k, dilation, pad):
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    conv64(x, w, b, dilation, pad).backward(g.double())
    return w.grad, b.grad


CASES = [(1, 1, 0), (2, 1, 1), (3, 4, 4), (4, 9, 13), (8, 2, 14), (16, 3, 22), (5, 60, 240)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
@pytest.mark.parametrize("k,dilation,pad", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_forward_and_weight_grad(tcn_lib, dtype, k, dilation, pad, channels_last):
    x = make((2, 37, 131), dtype, channels_last, seed=k * 100 + dilation)
    w = torch.randn(37, k) / k ** 0.5
    bias = torch.randn(37)
    what = f"K={k} d={dilation} pad={pad} {dtype} cl={channels_last}"
    for p in {pad, dilation * (k - 1) - pad}:  # causal/centred and the pad of the input gradient
        y = run_forward(tcn_lib, x, w, bias, dilation, p)
        close(y, conv64(x, w, bias, dilation, p), dtype, f"{what} y (pad {p})")
        g = make(x.shape, dtype, channels_last, seed=7)
        gw, gb = run_weight_grad(tcn_lib, x, g, k, dilation, p)
        ew, eb = weight_grad64(x, g, k, dilation, p)
        close(gw, ew, dtype, f"{what} grad_w (pad {p})")
        close(gb, eb, dtype, f"{what} grad_b (pad {p})")
        gw, _ = run_weight_grad(tcn_lib, x, g, k, dilation, p, want_bias=False)
        close(gw, ew, dtype, f"{what} grad_w without grad_b (pad {p})")


@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
@pytest.mark.parametrize("act", [0, 1, 2, 3], ids=["none", "relu", "silu", "gelu"])
def test_epilogues(tcn_lib, act, channels_last):
    x = make((3, 19, 70), torch.float32, channels_last, seed=act)
    other = make((3, 19, 70), torch.float32, channels_last, seed=act + 10)
    w, bias = torch.randn(19, 3), torch.randn(19)
    h = conv64(x, w, bias, 4, 8).requires_grad_(True)
    y = ACTS[act](h)
    close(run_forward(tcn_lib, x, w, bias, 4, 8, act, 0), y.detach(), torch.float32, "act(h)")
    close(run_forward(tcn_lib, x, w, bias, 4, 8, act, 0, other), y.detach() + other.double(),
          torch.float32, "other + act(h)")
    (d,) = torch.autograd.grad(y, h, other.double())
    close(run_forward(tcn_lib, x, w, bias, 4, 8, act, 1, other), d, torch.float32, "other * act'(h)")


@pytest.mark.parametrize("shape,channels_last", [((1, 1, 1), False), ((3, 2, 1), True),
                                                 ((1, 1, 40), True), ((2, 5, 7), False),
                                                 ((2, 5, 7), True), ((1, 17, 300), True)],
                         ids=["1x1x1", "3x2x1-BLC", "1x1x40", "2x5x7", "2x5x7-BLC", "1x17x300-BLC"])
def test_awkward_shapes(tcn_lib, shape, channels_last):
    x = make(shape, torch.float32, channels_last, seed=3)
    w, bias = torch.randn(shape[1], 3), torch.randn(shape[1])
    close(run_forward(tcn_lib, x, w, bias, 2, 4), conv64(x, w, bias, 2, 4), torch.float32, "y")
    close(run_forward(tcn_lib, x, w, None, 2, 1), conv64(x, w, None, 2, 1), torch.float32, "y, no bias")
    g = make(shape, torch.float32, channels_last, seed=4)
    for got, exp in zip(run_weight_grad(tcn_lib, x, g, 3, 2, 4), weight_grad64(x, g, 3, 2, 4)):
        close(got, exp, torch.float32, "taps' gradient")


# Past the grid caps: a channels-first row of more than 256 tiles of 1024 (the taps' gradient
# loops over tiles), more than 1024 x 32 x 8 positions channels last (block rows of the
# gradient loop), channels past one block channels last, a batch split into block layers
# that each loop over several batch rows (channels first).
@pytest.mark.parametrize("shape,channels_last,forward", [
    ((1, 2, 300_001), False, True), ((2, 5, 131_100), True, False), ((3, 1500, 20), True, True),
    ((1100, 3, 50), False, False)], ids=["long-BCL", "long-BLC", "wide-BLC", "batch-split-BCL"])
def test_past_the_grid_caps(tcn_lib, shape, channels_last, forward):
    # (forward False: the forward alone would be tens of thousands of emulated blocks, and its
    # grid loop is covered by the other shapes)
    x = make(shape, torch.float32, channels_last, seed=5)
    w, bias = torch.randn(shape[1], 3), torch.randn(shape[1])
    d = 5000 if shape[2] > 1000 else 3
    if forward:
        close(run_forward(tcn_lib, x, w, bias, d, d), conv64(x, w, bias, d, d), torch.float32, "y")
    g = make(shape, torch.float32, channels_last, seed=6)
    for got, exp in zip(run_weight_grad(tcn_lib, x, g, 3, d, d), weight_grad64(x, g, 3, d, d)):
        close(got, exp, torch.float32, "taps' gradient")


# ---- low-bit dequant GEMM ----------------------------------------------------------------------


_P, _I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)


def quant_gemm_lib(cu_file, harness, name, function):
    """A quant harness whose `function` has the GEMM signature they share: the packed weight's
    pointers and shape, bits, x, its dtype code, M, bias, y; it returns null or the error."""
    lib = build.build(cu_file, harness, name)
    fn = getattr(lib, function)
    fn.argtypes = [_P, _P, _P, _P, _I64, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int64, _P, _P]
    fn.restype = ctypes.c_char_p
    return lib


@pytest.fixture(scope="module")
def quant_lib():
    lib = quant_gemm_lib("quant/quant_cuda.cu", "quant_harness.cpp", "quant", "emu_quant_gemv")
    lib.emu_quant_dequant.argtypes = [_P, _P, _P, _P, _I64, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int64,
                                      ctypes.c_int64]
    lib.emu_quant_dequant.restype = ctypes.c_char_p
    return lib


def quant_args(qw):
    """The packed weight's pointers (each inside NaN / random-byte guards) and shape."""
    q = torch.randint(0, 256, (qw.qweight.numel() + 2 * GUARD,), dtype=torch.uint8)
    q[GUARD:GUARD + qw.qweight.numel()] = qw.qweight.flatten()
    ptr = lambda t: None if t is None else guarded(t.contiguous(), float("nan"))[0]  # noqa: E731
    kept = [q, ptr(qw.scales), ptr(qw.zeros), ptr(qw.codebook)]
    n, k = qw.shape
    cb_rows = 0 if qw.codebook is None else qw.codebook.shape[0]
    pointers = [q.data_ptr() + GUARD] + [None if t is None else t.data_ptr() for t in kept[1:]]
    return kept, pointers + [int64s(n, k, qw.group, cb_rows), qw.bits]


def check_quant_gemm(kernel, args, w64, m, dtype, g, tol=None):
    """`kernel` (a harness function: the gemv or the tensor-core GEMM) on x [m, K] of `dtype`
    (NaN-guarded) against x @ w64^T + bias in float64; y in `dtype`, between sentinels."""
    n, k = w64.shape
    x, _ = guarded(torch.randn(m, k, generator=g).to(dtype), float("nan"))
    bias = guarded(torch.randn(n, generator=g), float("nan"))[0]
    y, ybuf = guarded(torch.full((m, n), float("nan"), dtype=dtype), SENTINEL)
    err = kernel(*args, x.data_ptr(), DTYPE_CODES[dtype], m, bias.data_ptr(), y.data_ptr())
    assert err is None, err.decode()
    check_guards(ybuf, "y")
    exp = x.double() @ w64.T + bias.double()
    tol = tol or (1e-5 if dtype == torch.float32 else TOL[dtype])
    torch.testing.assert_close(y.double(), exp, rtol=tol, atol=tol * max(1.0, float(exp.abs().max())))


def quantized(bits, group_size, kind, n, k, g):
    """A random [n, k] weight quantized in the format, and its float64 values (reference)."""
    w = torch.randn(n, k, generator=g) * 0.1
    codebook = {"codebook": ops.nf_codebook(bits) if bits < 8 else ops.power_codebook(bits, 1.7),
                "channel_codebook": torch.randn(n, 1 << bits, generator=g)}.get(kind)
    qw = ops.quantize_weight(w, bits, group_size, kind != "asymmetric", codebook)
    return qw, quant_ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)


QUANT_FORMATS = [(bits, gs, kind) for bits in (2, 3, 4, 8) for gs in (32, 128, -1)
                 for kind in ("symmetric", "asymmetric", "codebook", "channel_codebook")]


@pytest.mark.parametrize("bits,group_size,kind", QUANT_FORMATS, ids=lambda v: str(v))
def test_quant_gemv_and_dequant(quant_lib, bits, group_size, kind):
    g = torch.Generator().manual_seed(bits * 1000 + group_size * 4 + len(kind))
    # per channel: K = 264 at 2 / 3 bits gives a plane length that is not a multiple of 4
    # (the byte-load kernel); the groups give the 32-bit-load kernel
    k = {32: 288, 128: 384}.get(group_size, 266 if bits in (4, 8) else 264)
    n = 37
    qw, w64 = quantized(bits, group_size, kind, n, k, g)
    kept, args = quant_args(qw)
    for m, dtype in ((1, torch.float32), (3, torch.float32), (16, torch.float32),
                     (1, torch.float16), (16, torch.bfloat16)):
        check_quant_gemm(quant_lib.emu_quant_gemv, args, w64, m, dtype, g)
    # the rows in float32, and in 16 bits (the cuBLAS tiles): each value rounded once
    for (n0, n1), dtype in (((0, n), torch.float32), ((5, 23), torch.float32), ((3, 30), torch.float16),
                            ((0, n), torch.bfloat16)):
        out, obuf = guarded(torch.full((n1 - n0, k), float("nan"), dtype=dtype), SENTINEL)
        out.fill_(float("nan"))
        err = quant_lib.emu_quant_dequant(*args, out.data_ptr(), DTYPE_CODES[dtype], n0, n1)
        assert err is None, err.decode()
        check_guards(obuf, "dequantized rows")
        # (float32's two roundings then one to 16 bits: within one 16-bit ulp of the exact value)
        ulp = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
        torch.testing.assert_close(out.double(), w64[n0:n1], rtol=ulp, atol=1e-6)
    del kept


@pytest.mark.parametrize("bits,kind", [(4, "symmetric"), (3, "asymmetric"), (2, "channel_codebook")])
def test_quant_gemv_four_rows_per_warp(quant_lib, bits, kind):
    """Layers of >= 8192 outputs at batch <= 4 take 4 rows per warp (quant_cuda.cu); N = 8195
    leaves a partial warp."""
    g = torch.Generator().manual_seed(bits)
    qw, w64 = quantized(bits, 32, kind, 8195, 64, g)
    kept, args = quant_args(qw)
    for m, dtype in ((1, torch.float32), (4, torch.bfloat16), (5, torch.float16)):  # 5: one row per warp
        check_quant_gemm(quant_lib.emu_quant_gemv, args, w64, m, dtype, g)
    del kept


@pytest.fixture(scope="module")
def quant_gemv_mma_lib():
    return quant_gemm_lib("quant/quant_gemv_mma_cuda.cu", "quant_gemv_mma_harness.cpp", "quant_gemv_mma",
                          "emu_quant_gemv_mma")


GEMV_MMA_FORMATS = [(bits, gs, kind) for bits in (2, 4, 8) for gs in (32, 64, 128, 256, -1)
                    for kind in ("symmetric", "asymmetric") if not (bits == 2 and gs == 32)]


@pytest.mark.parametrize("bits,group_size,kind", GEMV_MMA_FORMATS, ids=lambda v: str(v))
def test_quant_tensor_core_gemv(quant_gemv_mma_lib, bits, group_size, kind):
    """The tensor-core GEMV (batch <= 16, uniform formats, 16-bit x; quant_gemv_mma_cuda.cu)
    against x @ W^T in float64 with W unrounded (the kernel multiplies q - z exactly and scales
    float32 sums): N = 37 leaves a partial block of 16 rows; M = 1 / 5 / 8 fill one 8-column
    fragment, 9 / 16 two. The group sizes give 4, 8 and 16 bytes per lane and step; per
    channel, K = 384 is 1-3 steps per row, fewer than the block's 8 warps."""
    g = torch.Generator().manual_seed(bits * 1000 + group_size * 4 + len(kind) + 11)
    k = 384 if group_size == -1 else 3 * group_size
    qw, w64 = quantized(bits, group_size, kind, 37, k, g)
    kept, args = quant_args(qw)
    dtypes = (torch.float16, torch.bfloat16) if bits < 8 else (torch.float16,)
    for m in (1, 5, 8, 9, 16):
        for dtype in dtypes:
            check_quant_gemm(quant_gemv_mma_lib.emu_quant_gemv_mma, args, w64, m, dtype, g)
    del kept


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (2, 64), (8, -1), (4, -1), (4, 384), (8, 768)],
                         ids=str)
def test_quant_tensor_core_gemv_long_rows(quant_gemv_mma_lib, bits, group_size):
    """Rows of many steps, so that each warp goes round its loop several times and carries its
    step's group along: one step per group (32 to 128 values), one group per row (per
    channel), and 3 or 12 steps per group, where a warp's stride of 16 or 8 steps is no whole
    number of groups and its position within the group wraps into the next group."""
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    qw, w64 = quantized(bits, group_size, "asymmetric", 19, 3072, g)
    kept, args = quant_args(qw)
    for m, dtype in ((1, torch.float16), (11, torch.float16)) + (((3, torch.bfloat16),) if bits < 8 else ()):
        check_quant_gemm(quant_gemv_mma_lib.emu_quant_gemv_mma, args, w64, m, dtype, g)
    del kept


@pytest.mark.parametrize("ring", [2, 3, 8])
def test_quant_tensor_core_gemv_other_rings(quant_gemv_mma_lib, ring):
    """Rings of other sizes than the default 4 shared slots per warp (FASTLOSS_QUANT_GEMV_RING,
    the benchmark's comparison): 1, 2 or 7 steps in flight, slots reused over a row."""
    lib = quant_gemv_mma_lib
    lib.emu_set_gemv_ring.argtypes = [ctypes.c_int]
    lib.emu_set_gemv_ring(ring)
    try:
        test_quant_tensor_core_gemv_long_rows(lib, 4, 128)
        test_quant_tensor_core_gemv_long_rows(lib, 2, 64)
    finally:
        lib.emu_set_gemv_ring(4)


def fractional_zero_weight(bits, dtype, n, g, k=256, group=64):
    """An imported [n, k] weight whose zero points are fractional but for every third row
    (integer: lanes of both kinds within a warp) and one past the range the 16-bit constants
    hold exactly; and its float64 values."""
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    zeros = torch.rand(n, k // group, generator=g) * (1 << bits)
    zeros[::3] = zeros[::3].round()
    zeros[5, 1] = 3000.0 if dtype == torch.float16 else 300.0
    qw = ops.QuantizedWeight.from_int(q, scales, zeros, bits, group)
    return qw, quant_ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)


def test_quant_tensor_core_gemv_fractional_zeros(quant_gemv_mma_lib):
    """Imported weights whose zero points are not integers (or are too large for the 16-bit
    constants) take the kernel's correction by the sums of x; one group of integer zeros in a
    warp of fractional ones, and the reverse, are both right."""
    g = torch.Generator().manual_seed(41)
    for bits, dtype in ((4, torch.float16), (4, torch.bfloat16), (2, torch.float16), (8, torch.float16)):
        qw, w64 = fractional_zero_weight(bits, dtype, 21, g)
        kept, args = quant_args(qw)
        for m in (1, 11):
            check_quant_gemm(quant_gemv_mma_lib.emu_quant_gemv_mma, args, w64, m, dtype, g)
        del kept


def test_quant_tensor_core_gemv_refuses_what_it_cannot_read(quant_gemv_mma_lib):
    """Codebooks, 3-bit weights, 8-bit weights with bfloat16 x, float32 x, plane lengths that are
    no multiple of 16 (2-bit groups of 32: 8 bytes) and batches above 16 keep the other GEMV."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 256, generator=g)
    y = torch.empty(20, 5)
    cases = [(4, 64, ops.nf_codebook(4), torch.float16, 1), (3, 64, None, torch.float16, 1),
             (8, 64, None, torch.bfloat16, 1), (4, 64, None, torch.float32, 1),
             (2, 32, None, torch.float16, 1), (4, 64, None, torch.float16, 17)]
    for bits, gs, codebook, dtype, m in cases:
        qw = ops.quantize_weight(torch.randn(5, 256, generator=g), bits, gs, True, codebook)
        kept, args = quant_args(qw)
        err = quant_gemv_mma_lib.emu_quant_gemv_mma(*args, x.to(dtype).data_ptr(), DTYPE_CODES[dtype], m,
                                                    None, y.to(dtype).data_ptr())
        assert err == b"not applicable", (bits, gs, dtype, m)
        del kept


@pytest.fixture(scope="module")
def quant_mma_lib():
    return quant_gemm_lib("quant/quant_mma_cuda.cu", "quant_mma_harness.cpp", "quant_mma", "emu_quant_mma")


@pytest.mark.parametrize("bits,group_size,kind", QUANT_FORMATS, ids=lambda v: str(v))
def test_quant_tensor_core_gemm(quant_mma_lib, bits, group_size, kind):
    """The tensor-core path (batches above 16, float16 / bfloat16 x; quant_mma_cuda.cu) against
    x @ W^T in float64 with W rounded to x's dtype, as the kernel multiplies it: N = 70 and
    M = 17 / 70 / 200 leave partial 64 x 64 tiles; per channel, K = 272 is no whole number of
    32-value steps at 2, 4 and 8 bits (a 3-bit unit is a whole step). The emulator reports 3
    multiprocessors: M = 17 and 70 (2 and 4 tiles) split K in 2 or 3 (workspace and the
    reduce kernel), M = 200 (8 tiles) does not."""
    g = torch.Generator().manual_seed(bits * 1000 + group_size * 4 + len(kind) + 7)
    k = {32: 288, 128: 384}.get(group_size, 320 if bits == 3 else 272)
    qw, w64 = quantized(bits, group_size, kind, 70, k, g)
    kept, args = quant_args(qw)
    for m, dtype, tol in ((17, torch.float16, 1e-3), (70, torch.bfloat16, 8e-3), (200, torch.float16, 1e-3)):
        check_quant_gemm(quant_mma_lib.emu_quant_mma, args, w64.to(dtype).double(), m, dtype, g, tol)
    del kept


def test_quant_tensor_core_gemm_refuses_what_it_cannot_read(quant_mma_lib):
    """A plane length that is no multiple of 4 (per channel, K = 264 at 2 bits: P = 66) and
    float32 x stay on the dequantize + cuBLAS path."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 264, generator=g)
    y = torch.empty(20, 5)
    for bits, gs, dtype in ((2, -1, torch.float16), (4, 8, torch.float32)):
        qw = ops.quantize_weight(torch.randn(5, 264, generator=g), bits, gs, True)
        kept, args = quant_args(qw)
        err = quant_mma_lib.emu_quant_mma(*args, x.to(dtype).data_ptr(), DTYPE_CODES[dtype], 20, None,
                                          y.to(dtype).data_ptr())
        assert err == b"not applicable"
        del kept


@pytest.fixture(scope="module")
def quant_gemm_pipe_lib():
    return quant_gemm_lib("quant/quant_gemm_pipe_cuda.cu", "quant_gemm_pipe_harness.cpp", "quant_gemm_pipe",
                          "emu_quant_gemm_pipe")


@pytest.mark.parametrize("bits,group_size,kind", GEMV_MMA_FORMATS, ids=lambda v: str(v))
def test_quant_pipelined_gemm(quant_gemm_pipe_lib, bits, group_size, kind):
    """The pipelined tensor-core GEMM (batches above 16, the tensor-core GEMV's formats;
    quant_gemm_pipe_cuda.cu) against x @ W^T in float64 with W unrounded (it multiplies q - z
    exactly and scales float32 sums): N = 150 is one whole and one partial block of 128
    features; M = 17 / 70 leave partial blocks of 64 batch rows. The group sizes give 4, 8 and
    16 bytes per lane and step (2-bit at most 8); per channel, K = 384 is 3-6 steps per row."""
    g = torch.Generator().manual_seed(bits * 1000 + group_size * 4 + len(kind) + 23)
    k = 384 if group_size == -1 else 3 * group_size
    qw, w64 = quantized(bits, group_size, kind, 150, k, g)
    kept, args = quant_args(qw)
    dtypes = (torch.float16, torch.bfloat16) if bits < 8 else (torch.float16,)
    for m, dtype in [(17, dtypes[0]), (70, dtypes[-1])]:
        check_quant_gemm(quant_gemm_pipe_lib.emu_quant_gemm_pipe, args, w64, m, dtype, g)
    del kept


@pytest.mark.parametrize("bits,group_size", [(4, 128), (2, 64), (8, -1), (4, 384)], ids=str)
def test_quant_pipelined_gemm_long_rows(quant_gemm_pipe_lib, bits, group_size):
    """Rows of many steps: the pipeline's stages wrap around several times, the step's group is
    carried along (one group per row; 1 or 3 steps per group), and with 1-2 output tiles for the
    emulator's 3 multiprocessors K is split over blocks (workspace and the reduce kernel)."""
    g = torch.Generator().manual_seed(bits * 100 + group_size + 5)
    qw, w64 = quantized(bits, group_size, "asymmetric", 19, 3072, g)
    kept, args = quant_args(qw)
    for m, dtype in ((17, torch.float16), (100, torch.float16)) + (((33, torch.bfloat16),) if bits < 8 else ()):
        check_quant_gemm(quant_gemm_pipe_lib.emu_quant_gemm_pipe, args, w64, m, dtype, g)
    del kept


def test_quant_pipelined_gemm_fractional_zeros(quant_gemm_pipe_lib):
    """Imported weights whose zero points are not integers (or too large for the 16-bit
    constants): the correction by the sums of x, in warps whose features mix integer and
    fractional zeros."""
    g = torch.Generator().manual_seed(43)
    for bits, dtype in ((4, torch.float16), (4, torch.bfloat16), (2, torch.float16), (8, torch.float16)):
        qw, w64 = fractional_zero_weight(bits, dtype, 37, g)
        kept, args = quant_args(qw)
        check_quant_gemm(quant_gemm_pipe_lib.emu_quant_gemm_pipe, args, w64, 20, dtype, g)
        del kept


def test_quant_pipelined_gemm_refuses_what_it_cannot_read(quant_gemm_pipe_lib):
    """Codebooks, 3-bit weights, 8-bit weights with bfloat16 x, float32 x and plane lengths that
    are no multiple of 16 (2-bit groups of 32) keep the shared-memory GEMM."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 256, generator=g)
    y = torch.empty(20, 5)
    cases = [(4, 64, ops.nf_codebook(4), torch.float16), (3, 64, None, torch.float16),
             (8, 64, None, torch.bfloat16), (4, 64, None, torch.float32), (2, 32, None, torch.float16)]
    for bits, gs, codebook, dtype in cases:
        qw = ops.quantize_weight(torch.randn(5, 256, generator=g), bits, gs, True, codebook)
        kept, args = quant_args(qw)
        err = quant_gemm_pipe_lib.emu_quant_gemm_pipe(*args, x.to(dtype).data_ptr(), DTYPE_CODES[dtype], 20,
                                                      None, y.to(dtype).data_ptr())
        assert err == b"not applicable", (bits, gs, dtype)
        del kept


# ---- logit distillation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_lib():
    lib = build.build("distill/kd_cuda.cu", "kd_harness.cpp", "kd")
    P, I64, F32 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_float
    lib.emu_kd_forward.argtypes = [P, P, ctypes.c_int, I64, ctypes.c_int, F32, F32, P, P]
    lib.emu_kd_forward.restype = ctypes.c_char_p
    lib.emu_kd_backward.argtypes = [P, P, ctypes.c_int, I64, ctypes.c_int, F32, F32, P, P, P]
    lib.emu_kd_backward.restype = ctypes.c_char_p
    lib.emu_topk_kl.argtypes = [P, P, ctypes.c_int, I64, F32, P, P]
    lib.emu_topk_kl.restype = ctypes.c_char_p
    lib.emu_pld.argtypes = [P, P, P, ctypes.c_int, I64, F32, P, P, P, P, P, P]
    lib.emu_pld.restype = ctypes.c_char_p
    return lib


KD_KINDS = ["forward_kl", "reverse_kl", "jsd"]


KD_SHAPES = [(1, 1, 3, 0), (3, 7, 3, 0), (5, 33, 3, 0), (4, 1031, 3, 0), (2, 4099, 3, 0),
             (4, 1031, 0, 0), (3, 4100, 0, 0), (4, 1031, 1, 1), (5, 3, 0, 0)]


@pytest.mark.parametrize("shape", KD_SHAPES,
                         ids=lambda s: f"{s[0]}x{s[1]}" + {(3, 0): "", (0, 0): "-unpadded"}.get(s[2:], "-both-padded"))
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_forward_and_backward(kd_lib, kind, dtype, shape):
    """Against the float64 reference. Students padded by 3 NaN columns put the student, teacher
    and gradient rows at different alignments (one element at a time but in row 0); unpadded
    ones keep them aligned alike, with a head before the first 16-byte boundary at 1031 classes
    (16-byte packs) and rows shorter than a pack at 3; student and teacher both padded by 1
    are aligned alike but not like the gradient (packs in the forward, elements in the
    backward: a 16-byte store there traps in the emulator)."""
    from fastloss.reference import distill as kd_ref
    n, c, pad, pad_t = shape
    gen = torch.Generator().manual_seed(n * 31 + c)
    s = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t = (torch.randn(n, c, generator=gen) * 3 + 0.3 * s.float()).to(dtype)
    T, beta = 2.0, 0.3
    # the columns past each row are NaN: reading them poisons the row
    padded = torch.cat([s, torch.full((n, pad), float("nan"), dtype=dtype)], 1)
    sg = torch.as_strided(guarded(padded, float("nan"))[0], (n, c), (c + pad, 1))
    padded_t = torch.cat([t, torch.full((n, pad_t), float("nan"), dtype=dtype)], 1)
    tg = torch.as_strided(guarded(padded_t, float("nan"))[0], (n, c), (c + pad_t, 1))
    shape_args = int64s(n, c, c + pad, c + pad_t)
    loss, lbuf = guarded(torch.full((n,), float("nan")), SENTINEL)
    stats, sbuf = guarded(torch.full((n, 3), float("nan")), SENTINEL)
    loss.fill_(float("nan"))
    stats.fill_(float("nan"))
    code = KD_KINDS.index(kind)
    err = kd_lib.emu_kd_forward(sg.data_ptr(), tg.data_ptr(), DTYPE_CODES[dtype], shape_args, code,
                                T, beta, loss.data_ptr(), stats.data_ptr())
    assert err is None, err.decode()
    check_guards(lbuf, "loss")
    check_guards(sbuf, "stats")
    s64 = s.double().requires_grad_(True)
    rows = kd_ref.kd_loss(s64, t.double(), T, kind, beta, "none")
    up = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    rows.backward(up)
    close(loss, rows.detach(), dtype, f"{kind} loss")
    grad, gbuf = guarded(torch.full((n, c), float("nan"), dtype=dtype), SENTINEL)
    grad.fill_(float("nan"))
    up32 = up.float()
    err = kd_lib.emu_kd_backward(sg.data_ptr(), tg.data_ptr(), DTYPE_CODES[dtype], shape_args, code,
                                 T, beta, up32.data_ptr(), stats.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    check_guards(gbuf, "grad")
    close(grad, s64.grad, dtype, f"{kind} grad")


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_masked_classes(kd_lib, kind):
    """Classes masked with -inf (both rows, the teacher's only, the student's only, where the
    loss stays finite): the CUDA kernels give the CPU kernels' finite losses and gradients
    (unmask: 0 log 0 = 0 in the KLs' terms), not NaN; and top-k KL with k = C likewise."""
    n, c, T, beta = 3, 1031, 2.0, 0.3
    finite = {"forward_kl": ("both", "teacher"), "reverse_kl": ("both", "student"),
              "jsd": ("both", "teacher", "student")}[kind]
    for where in finite:
        gen = torch.Generator().manual_seed(len(where))
        s, t = torch.randn(n, c, generator=gen) * 3, torch.randn(n, c, generator=gen) * 3
        if where in ("both", "student"):
            s[:, [0, 500, 1030]] = float("-inf")
        if where in ("both", "teacher"):
            t[:, [0, 500, 1030]] = float("-inf")
        loss, lbuf = nan_outputs((n,))
        stats, sbuf = nan_outputs((n, 3))
        code = KD_KINDS.index(kind)
        err = kd_lib.emu_kd_forward(s.data_ptr(), t.data_ptr(), 0, int64s(n, c, c, c), code, T, beta,
                                    loss.data_ptr(), stats.data_ptr())
        assert err is None, err.decode()
        up = torch.rand(n, generator=gen) + 0.5
        grad, gbuf = nan_outputs((n, c))
        err = kd_lib.emu_kd_backward(s.data_ptr(), t.data_ptr(), 0, int64s(n, c, c, c), code, T, beta,
                                     up.data_ptr(), stats.data_ptr(), grad.data_ptr())
        assert err is None, err.decode()
        check_guards(lbuf, "loss")
        check_guards(gbuf, "grad")
        x = s.clone().requires_grad_(True)
        rows = ops.kd_loss(x, t, T, kind, beta, "none")
        rows.backward(up)
        assert torch.isfinite(rows).all() and torch.isfinite(x.grad).all(), (where, rows)
        torch.testing.assert_close(loss, rows.detach(), rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(grad, x.grad, rtol=2e-5, atol=1e-6)
        if kind == "forward_kl":
            loss, lbuf = nan_outputs((n,))
            grad, gbuf = nan_outputs((n, c))
            err = kd_lib.emu_topk_kl(s.data_ptr(), t.data_ptr(), 0, int64s(n, c, c, c, c, 0), T,
                                     loss.data_ptr(), grad.data_ptr())
            assert err is None, err.decode()
            e_loss, e_grad = torch.ops.fastloss.topk_kl_forward(s, t, c, T, False, True)
            assert torch.isfinite(e_loss).all(), (where, e_loss)
            torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-5)
            torch.testing.assert_close(grad, e_grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True], ids=["all", "renormalized"])
@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((3, 7), 7), ((4, 1031), 100), ((2, 4099), 1000),
                                     ((3, 300), 5)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_topk_kl(kd_lib, dtype, shape, k, renormalize):
    """Against the CPU kernel's op; the teacher rows hold ties at the k-th value (taken by lowest
    class index), rows of equal values, and a strided NaN-padded student."""
    n, c = shape
    gen = torch.Generator().manual_seed(n * 7 + c + k)
    s = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    if c == 300:  # the k-th value tied: a run of equal logits straddles the cut
        t[0, 10:40] = 50.0        # 30 ties, k = 5 of them taken
        t[1, :] = 1.0             # all tied
        t[1, 200:] = -0.0         # ... and signed zeros, equal to each other
        t[1, 250:] = 0.0
        t[2, ::7] = t[2].max()    # ties at the maximum
    # a NaN-padded student; at 1031 classes the teacher is padded alike (rows aligned like the
    # student's, not like the gradient's: the gradient pass must store one element at a time)
    pad_t = 5 if c == 1031 else 0
    padded = torch.cat([s, torch.full((n, 5), float("nan"), dtype=dtype)], 1)
    sg = torch.as_strided(guarded(padded, float("nan"))[0], (n, c), (c + 5, 1))
    padded_t = torch.cat([t, torch.full((n, pad_t), float("nan"), dtype=dtype)], 1)
    tg = torch.as_strided(guarded(padded_t, float("nan"))[0], (n, c), (c + pad_t, 1))
    loss, lbuf = nan_outputs((n,))
    grad, gbuf = nan_outputs((n, c), dtype)
    err = kd_lib.emu_topk_kl(sg.data_ptr(), tg.data_ptr(), DTYPE_CODES[dtype],
                             int64s(n, c, c + 5, c + pad_t, k, int(renormalize)), 1.5, loss.data_ptr(),
                             grad.data_ptr())
    assert err is None, err.decode()
    check_guards(lbuf, "loss")
    check_guards(gbuf, "grad")
    e_loss, e_grad = torch.ops.fastloss.topk_kl_forward(s, t, k, 1.5, renormalize, True)
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), e_grad.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("renormalize", [False, True], ids=["all", "renormalized"])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_topk_kl_sampled_threshold(kd_lib, dtype, renormalize):
    """Rows of 512+ classes with k <= C / 8 select among the keys above a threshold from strided
    samples (kd_cuda.cu), falling back to four passes over the row where that cannot work:
    row 0 ordinary, row 1 ties straddling the k-th value, row 2 the samples far above the rest
    (fewer than k keys pass), row 3 all equal (more keys pass than shared memory keeps), row 4
    NaN samples (a NaN threshold), row 5 +inf / NaN among the top keys."""
    n, c, k = 6, 12_000, 300
    gen = torch.Generator().manual_seed(17)
    s = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t[1, 1000:1600] = 9.0                     # 600 ties around the 300th value
    t[2, ::c // 256] += 100.0                 # every sampled class far above the others
    t[3] = 0.5
    t[4, ::c // 256] = float("nan")
    t[5, 7] = float("inf")
    t[5, 11] = float("nan")
    tg = guarded(t, float("nan"))[0]
    sg = guarded(s, float("nan"))[0]
    loss, lbuf = nan_outputs((n,))
    grad, gbuf = nan_outputs((n, c), dtype)
    err = kd_lib.emu_topk_kl(sg.data_ptr(), tg.data_ptr(), DTYPE_CODES[dtype],
                             int64s(n, c, c, c, k, int(renormalize)), 1.5, loss.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    check_guards(lbuf, "loss")
    check_guards(gbuf, "grad")
    e_loss, e_grad = torch.ops.fastloss.topk_kl_forward(s, t, k, 1.5, renormalize, True)
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad.float(), e_grad.float(), rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("grads", [True, False], ids=["grads", "loss-only"])
@pytest.mark.parametrize("shape", [(3, 1), (4, 7), (5, 33), (3, 1031), (2, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_pld(kd_lib, dtype, shape, grads):
    """Against the CPU kernel's op: ignored rows, the target anywhere in the teacher's order,
    tied teacher logits, strided NaN-padded students; the order is torch's stable sort and the
    rows in that order its values and the gathered student, as the op passes them (each
    between guards)."""
    n, c = shape
    gen = torch.Generator().manual_seed(n * 11 + c)
    s = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    if n > 2:
        y[1] = -100
        t[2, : c // 2] = 1.0  # ties
        t[0, ::2], t[0, 1::2] = -0.0, 0.0  # signed zeros tie (as torch's sort and comparisons see them)
    sorted_t, order = torch.sort(t, dim=1, descending=True, stable=True)
    padded = torch.cat([s, torch.full((n, 5), float("nan"), dtype=dtype)], 1)
    sg = torch.as_strided(guarded(padded, float("nan"))[0], (n, c), (c + 5, 1))
    tg = guarded(t, float("nan"))[0]
    # the rows in the teacher's order, as the op passes them (sort values, gathered student)
    ts_g = guarded(sorted_t.contiguous(), float("nan"))[0]
    ss_g = guarded(s.gather(1, order).contiguous(), float("nan"))[0]
    order = guarded(order.contiguous(), -1)[0]
    scratch = torch.full((n * c,), float("nan"))
    loss, lbuf = nan_outputs((n,))
    grad, gbuf = nan_outputs((n, c), dtype)
    err = kd_lib.emu_pld(sg.data_ptr(), tg.data_ptr(), y.data_ptr(), DTYPE_CODES[dtype],
                         int64s(n, c, c + 5, c, -100), 1.5, order.data_ptr(), ts_g.data_ptr(), ss_g.data_ptr(),
                         scratch.data_ptr() if grads else None, loss.data_ptr(),
                         grad.data_ptr() if grads else None)
    assert err is None, err.decode()
    check_guards(lbuf, "loss")
    check_guards(gbuf, "grad")
    e_loss, e_grad = torch.ops.fastloss.pld_forward(s, t, y, 1.5, -100, True)
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=2e-5)
    if grads:
        torch.testing.assert_close(grad.float(), e_grad.float(), rtol=TOL[dtype], atol=TOL[dtype])
    else:
        assert grad.isnan().all()


def test_kd_rows_with_every_class_masked(kd_lib):
    """A student or teacher row whose classes are all -inf: the CUDA kernels give it a NaN loss
    and gradient row, as the CPU kernels (the other rows finite and equal to theirs)."""
    n, c, T, beta = 4, 300, 2.0, 0.3
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(n, c, generator=gen) * 3, torch.randn(n, c, generator=gen) * 3
    s[1] = float("-inf")
    t[2] = float("-inf")
    nan_rows = torch.tensor([False, True, True, False])
    for code, kind in enumerate(KD_KINDS):
        loss, _ = nan_outputs((n,))
        stats, _ = nan_outputs((n, 3))
        err = kd_lib.emu_kd_forward(s.data_ptr(), t.data_ptr(), 0, int64s(n, c, c, c), code, T, beta,
                                    loss.data_ptr(), stats.data_ptr())
        assert err is None, err.decode()
        up = torch.ones(n)
        grad, _ = nan_outputs((n, c))
        err = kd_lib.emu_kd_backward(s.data_ptr(), t.data_ptr(), 0, int64s(n, c, c, c), code, T, beta,
                                     up.data_ptr(), stats.data_ptr(), grad.data_ptr())
        assert err is None, err.decode()
        assert loss.isnan().equal(nan_rows) and grad.isnan().all(1).equal(nan_rows), kind
        expect = ops.kd_loss(s, t, T, kind, beta, "none")
        torch.testing.assert_close(loss, expect, rtol=2e-5, atol=1e-5, equal_nan=True)
    loss, _ = nan_outputs((n,))
    grad, _ = nan_outputs((n, c))
    err = kd_lib.emu_topk_kl(s.data_ptr(), t.data_ptr(), 0, int64s(n, c, c, c, 20, 0), T,
                             loss.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    e_loss, e_grad = torch.ops.fastloss.topk_kl_forward(s, t, 20, T, False, True)
    assert loss.isnan().equal(nan_rows) and grad.isnan().all(1).equal(nan_rows)
    assert e_loss.isnan().equal(nan_rows) and e_grad.isnan().all(1).equal(nan_rows)
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-5, equal_nan=True)


def test_pld_masked_classes(kd_lib):
    """Classes masked with -inf in both rows, or the teacher's only: the CUDA kernel gives the
    CPU kernel's finite loss and gradient (unmask), not NaN."""
    n, c = 3, 300
    for where in ("both", "teacher"):
        gen = torch.Generator().manual_seed(len(where))
        s, t = torch.randn(n, c, generator=gen) * 3, torch.randn(n, c, generator=gen) * 3
        t[:, 100:180] = float("-inf")
        if where == "both":
            s[:, 100:180] = float("-inf")
        y = torch.tensor([0, 50, 299])
        sorted_t, order = torch.sort(t, dim=1, descending=True, stable=True)
        ts, ss = sorted_t.contiguous(), s.gather(1, order).contiguous()
        order = order.contiguous()
        scratch = torch.full((n * c,), float("nan"))
        loss, lbuf = nan_outputs((n,))
        grad, gbuf = nan_outputs((n, c))
        err = kd_lib.emu_pld(s.data_ptr(), t.data_ptr(), y.data_ptr(), 0, int64s(n, c, c, c, -100), 1.5,
                             order.data_ptr(), ts.data_ptr(), ss.data_ptr(), scratch.data_ptr(),
                             loss.data_ptr(), grad.data_ptr())
        assert err is None, err.decode()
        check_guards(lbuf, "loss")
        check_guards(gbuf, "grad")
        e_loss, e_grad = torch.ops.fastloss.pld_forward(s, t, y, 1.5, -100, True)
        assert torch.isfinite(e_loss).all() and torch.isfinite(e_grad).all(), where
        torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad, e_grad, rtol=2e-5, atol=2e-5)


# ---- entropic optimal transport (Sinkhorn) -----------------------------------------------------


@pytest.fixture(scope="module")
def sinkhorn_lib():
    lib = build.build("sinkhorn/sinkhorn_cuda.cu", "sinkhorn_harness.cpp", "sinkhorn")
    P, I64, D = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_double
    lib.emu_sinkhorn_workspace.argtypes = [ctypes.c_int, I64]
    lib.emu_sinkhorn_workspace.restype = ctypes.c_int64
    lib.emu_sinkhorn_solve.argtypes = [P, P, P, ctypes.c_int, I64, D, D, ctypes.POINTER(P), P, P]
    lib.emu_sinkhorn_solve.restype = ctypes.c_char_p
    lib.emu_sinkhorn_plan.argtypes = [P, P, P, ctypes.c_int, I64, D, P, P, P, P]
    lib.emu_sinkhorn_plan.restype = ctypes.c_char_p
    lib.emu_sns_workspace.argtypes = [ctypes.c_int, I64, ctypes.c_int64]
    lib.emu_sns_workspace.restype = ctypes.c_int64
    lib.emu_sns_solve.argtypes = [P, P, P, ctypes.c_int, I64, D, D, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.POINTER(P), P, P]
    lib.emu_sns_solve.restype = ctypes.c_char_p
    return lib


def ot_problem(bsz, n, m, dtype, seed, zero_mass=False):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(bsz, n, m, generator=gen, dtype=torch.float64)
    a = torch.rand(bsz, n, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(bsz, m, generator=gen, dtype=torch.float64) + 0.1
    if zero_mass:
        a[:, 1] = 0
        b[:, -1] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return cost.to(dtype), a.to(dtype), b.to(dtype)


def ot_outputs(bsz, n, m, dtype):
    """The solver's outputs (value, f, g, n_iter, error, transport), NaN-filled, their pointers
    and the host flags buffer."""
    outs = [torch.full((bsz,), float("nan"), dtype=dtype), torch.full((bsz, n), float("nan"), dtype=dtype),
            torch.full((bsz, m), float("nan"), dtype=dtype), torch.full((bsz,), -1, dtype=torch.int64),
            torch.full((bsz,), float("nan"), dtype=dtype), torch.full((bsz,), float("nan"), dtype=dtype)]
    return outs, (ctypes.c_void_p * 6)(*[t.data_ptr() for t in outs]), torch.zeros(bsz, dtype=torch.int32)


def assert_matches_cpu_solver(outs, expect, a, b, tol, max_iter, shift_tol, error_tol):
    """The emulated solve against torch.ops.fastloss.sinkhorn_solve's outputs `expect`: the
    iteration counts (exact in float64), value and transport cost; converged, the potentials up
    to a constant (those of zero-mass entries are arbitrary); stopped by max_iter (<= 10), the
    error of the returned potentials, as the CPU reports it (error_tol: rtol, atol)."""
    value, f, g, n_iter, error, transport = outs
    double = value.dtype == torch.float64
    assert (n_iter - expect[3]).abs().max() <= (0 if double else 2), (n_iter, expect[3])
    rtol = 1e-7 if double else 2e-4
    for name, got, exp in (("value", value, expect[0]), ("transport", transport, expect[5])):
        torch.testing.assert_close(got, exp, rtol=rtol, atol=rtol, msg=lambda msg: f"{name}: {msg}")
    if max_iter > 10:
        assert bool((error < tol).all()) and bool((expect[4] < tol).all()), (error, expect[4])
        for got, exp, live in ((f, expect[1], a > 0), (g, expect[2], b > 0)):
            shift = (got - exp)[live].reshape(-1)
            assert float(shift.max() - shift.min()) < shift_tol
    else:
        assert (n_iter == max_iter).all()
        torch.testing.assert_close(error, expect[4], rtol=error_tol[0], atol=error_tol[1])


@pytest.mark.parametrize("shape,eps,max_iter,zero_mass", [
    ((3, 37, 53), 0.2, 400, False), ((1, 300, 20), 0.3, 400, True),
    ((2, 5, 700), 0.1, 400, False), ((2, 20, 30), 0.05, 3, False)],
    ids=["batch", "row-chunks-zero-mass", "column-tiles", "max_iter"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sinkhorn_solve_and_plan(sinkhorn_lib, dtype, shape, eps, max_iter, zero_mass):
    bsz, n, m = shape[:3]
    cost, a, b = ot_problem(bsz, n, m, dtype, seed=n + m, zero_mass=zero_mass)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    expect = torch.ops.fastloss.sinkhorn_solve(cost, a, b, eps, max_iter, tol, 0, 0, 1)
    dims = int64s(bsz, n, m, max_iter)
    is_double = int(dtype == torch.float64)
    work = torch.full((sinkhorn_lib.emu_sinkhorn_workspace(is_double, dims),), 255, dtype=torch.uint8)
    outs, pointers, host_active = ot_outputs(bsz, n, m, dtype)
    err = sinkhorn_lib.emu_sinkhorn_solve(cost.data_ptr(), a.data_ptr(), b.data_ptr(), is_double, dims,
                                          eps, tol, pointers, work.data_ptr(), host_active.data_ptr())
    assert err is None, err.decode()
    # the CPU solver runs the same iteration (one row pass measures, then commits): the same count
    rtol = 1e-7 if dtype == torch.float64 else 2e-4
    assert_matches_cpu_solver(outs, expect, a, b, tol, max_iter, shift_tol=1e-6 if dtype == torch.float64 else 1e-3,
                              error_tol=(rtol, 1e-7))
    value, f, g, n_iter, error, transport = outs
    # the plan of the returned potentials, scaled per problem
    scale = torch.rand(bsz, dtype=torch.float64) + 0.5
    plan, pbuf = guarded(torch.full((bsz, n, m), float("nan"), dtype=dtype), SENTINEL)
    plan.fill_(float("nan"))
    err = sinkhorn_lib.emu_sinkhorn_plan(cost.data_ptr(), a.data_ptr(), b.data_ptr(), is_double, dims, eps,
                                         f.data_ptr(), g.data_ptr(), scale.data_ptr(), plan.data_ptr())
    assert err is None, err.decode()
    check_guards(pbuf, "plan")
    expect_plan = torch.ops.fastloss.sinkhorn_plan(cost, a, b, f, g, eps, scale)
    torch.testing.assert_close(plan, expect_plan, rtol=10 * rtol, atol=1e-12)


def test_sinkhorn_solve_iterates_once_at_least(sinkhorn_lib):
    """C / eps ~ 1e-7 (eps = 1e7, float64: float32 cannot resolve it): the starting potentials
    pass tol, and the CUDA solver, as the CPU's, still iterates once (it had returned their
    value 0 after 0 iterations)."""
    bsz, n, m, eps, max_iter, tol = 2, 4, 5, 1e7, 400, 1e-6
    cost, a, b = ot_problem(bsz, n, m, torch.float64, seed=5, zero_mass=False)
    expect = torch.ops.fastloss.sinkhorn_solve(cost, a, b, eps, max_iter, tol, 0, 0, 1)
    dims = int64s(bsz, n, m, max_iter)
    work = torch.full((sinkhorn_lib.emu_sinkhorn_workspace(1, dims),), 255, dtype=torch.uint8)
    outs, pointers, host_active = ot_outputs(bsz, n, m, torch.float64)
    err = sinkhorn_lib.emu_sinkhorn_solve(cost.data_ptr(), a.data_ptr(), b.data_ptr(), 1, dims,
                                          eps, tol, pointers, work.data_ptr(), host_active.data_ptr())
    assert err is None, err.decode()
    value, n_iter = outs[0], outs[3]
    assert bool((n_iter == 1).all()) and bool((expect[3] == 1).all()), (n_iter, expect[3])
    torch.testing.assert_close(value, expect[0], rtol=1e-9, atol=0)
    assert bool((value > 0.1).all())


def emulated_sns_solve(sinkhorn_lib, cost, a, b, eps, max_iter, tol, warmup, keep, cg):
    """The CUDA Newton solver (sinkhorn_newton_cuda.cuh) under the emulator: its outputs (value,
    f, g, n_iter, error, transport), its workspace between NaN guards and sentinels."""
    bsz, n, m = cost.shape
    dims = int64s(bsz, n, m, max_iter)
    is_double = int(cost.dtype == torch.float64)
    nbytes = sinkhorn_lib.emu_sns_workspace(is_double, dims, keep)
    work, wbuf = guarded(torch.full(((nbytes + 7) // 8,), float("nan"), dtype=torch.float64), SENTINEL)
    outs, pointers, host_active = ot_outputs(bsz, n, m, cost.dtype)
    err = sinkhorn_lib.emu_sns_solve(cost.data_ptr(), a.data_ptr(), b.data_ptr(), is_double, dims, eps,
                                     tol, keep, warmup, cg, pointers, work.data_ptr(), host_active.data_ptr())
    assert err is None, err.decode()
    check_guards(wbuf, "workspace")
    return outs


@pytest.mark.parametrize("shape,eps,max_iter,warmup,keep,zero_mass", [
    ((2, 37, 53), 0.02, 200, 3, 6, False), ((1, 70, 40), 0.01, 200, 2, 4, True),
    ((2, 9, 300), 0.05, 200, 1, 30, False), ((1, 24, 24), 0.01, 6, 2, 3, False),
    ((1, 30, 30), 0.5, 200, 5, 3, False), ((3, 40, 20), 0.02, 200, 2, 3, "easy"),
    ((1, 20, 20), 0.01, 2, 2, 3, False)],
    ids=["batch", "zero-mass", "wide", "max_iter", "converged-in-warm-up",
         "one-converged-in-warm-up", "warm-up-is-max_iter"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sns_solve(sinkhorn_lib, dtype, shape, eps, max_iter, warmup, keep, zero_mass):
    """The CUDA Newton steps (sinkhorn_newton_cuda.cuh) against the C++ CPU solver running the
    same algorithm: the same iteration counts (float64), value, transport cost, potentials
    (up to a constant) and final error. "easy": the batch's middle problem has a constant cost
    (solved by the warm-up's first iteration) while the others take Newton steps."""
    bsz, n, m = shape
    cost, a, b = ot_problem(bsz, n, m, dtype, seed=3 * n + m, zero_mass=zero_mass is True)
    if zero_mass == "easy":
        cost[1] = 0.5
    # (float64 to 1e-7: near 1e-9 the two solvers' last steps differ in rounding, e.g. 12 CPU
    # and 10 CUDA iterations on the first case, after agreeing to 4 digits on every error above)
    tol = 1e-7 if dtype == torch.float64 else 2e-5
    cg = 200
    expect = torch.ops.fastloss.sinkhorn_solve(cost, a, b, eps, max_iter, tol, warmup, keep, cg)
    outs = emulated_sns_solve(sinkhorn_lib, cost, a, b, eps, max_iter, tol, warmup, keep, cg)
    assert_matches_cpu_solver(outs, expect, a, b, tol, max_iter, shift_tol=1e-6 if dtype == torch.float64 else 2e-3,
                              error_tol=(1e-3 if dtype == torch.float64 else 5e-2, 1e-9))


def test_sns_solve_doubles_the_kept_entries_when_stalled(sinkhorn_lib):
    """One kept entry per row of 6 x 9 plans at eps = 0.002 is too few for the Hessian (the
    fixed count had not converged in 5000 iterations on the CPU): both solvers double each
    problem's entries after ten Newton steps that did not halve its error, so the CUDA steps
    match the CPU's iteration for iteration (float64; in float32 this eps is at the plan's
    rounding floor, where the two solvers' roundings take different paths: 74 and 39
    iterations for one problem, both converged)."""
    bsz, n, m, eps, max_iter, tol, keep, warmup, cg = 2, 6, 9, 0.002, 400, 1e-7, 1, 10, 200
    cost, a, b = ot_problem(bsz, n, m, torch.float64, seed=3 * n + m)
    expect = torch.ops.fastloss.sinkhorn_solve(cost, a, b, eps, max_iter, tol, warmup, keep, cg)
    assert bool((expect[3] < 100).all()), expect[3]
    outs = emulated_sns_solve(sinkhorn_lib, cost, a, b, eps, max_iter, tol, warmup, keep, cg)
    assert_matches_cpu_solver(outs, expect, a, b, tol, max_iter, shift_tol=1e-6, error_tol=(1e-3, 1e-9))


def test_sns_solve_stops_where_the_error_stalls(sinkhorn_lib):
    """In float32 at C / eps of several hundred the plan's rounding holds the error near 1e-6:
    both solvers stop a problem whose error is no lower after ten Newton steps with its densest
    Hessian (rather than run to max_iter), unconverged, within 30 steps of each other (their
    roundings differ) and with the same value. A stop rule of the CPU only fails this."""
    bsz, n, m, eps, max_iter, tol, keep, warmup, cg = 2, 40, 50, 0.002, 1000, 1e-9, 4, 10, 200
    cost, a, b = ot_problem(bsz, n, m, torch.float32, seed=7)
    expect = torch.ops.fastloss.sinkhorn_solve(cost, a, b, eps, max_iter, tol, warmup, keep, cg)
    assert bool((expect[3] < 300).all()) and bool((expect[4] > tol).all()), (expect[3], expect[4])
    outs = emulated_sns_solve(sinkhorn_lib, cost, a, b, eps, max_iter, tol, warmup, keep, cg)
    value, n_iter, error = outs[0], outs[3], outs[4]
    assert bool((n_iter < 300).all()) and bool((error > tol).all()), (n_iter, error)
    assert (n_iter - expect[3]).abs().max() <= 30, (n_iter, expect[3])
    torch.testing.assert_close(value, expect[0], rtol=1e-5, atol=1e-6)


# ---- Dice and AnyLoss ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric_lib():
    lib = build.build("metric_losses/metric_losses_cuda.cu", "metric_harness.cpp", "metric")
    P, I64, F32 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_float
    lib.emu_dice_sigmoid.argtypes = [P, ctypes.c_int, P, ctypes.c_int64, ctypes.c_int64, P, P, P, P]
    lib.emu_dice_softmax.argtypes = [P, ctypes.c_int, P, I64, P, P, P, P]
    lib.emu_confusion_scratch.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.emu_confusion_scratch.restype = ctypes.c_int64
    lib.emu_confusion.argtypes = [P, ctypes.c_int, P, ctypes.c_int64, ctypes.c_int64, F32, ctypes.c_int,
                                  P, P, P, P]
    for f in (lib.emu_dice_sigmoid, lib.emu_dice_softmax, lib.emu_confusion):
        f.restype = ctypes.c_char_p
    return lib


def nan_outputs(shape, dtype=torch.float32):
    out, buf = guarded(torch.full(shape, float("nan"), dtype=dtype), SENTINEL)
    out.fill_(float("nan"))
    return out, buf


DICE_PARAMS = [(1.0, 1.0, 0.0), (0.5, 0.3, 0.1), (2.0, 1.0, 0.0), (0.0, 0.5, 1.0)]


@pytest.mark.parametrize("params", DICE_PARAMS, ids=str)
@pytest.mark.parametrize("shape", [(300, 1), (7, 5), (5, 70)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_dice_sigmoid(metric_lib, dtype, shape, params):
    """Against the CPU kernels' op (itself tested against the float64 reference)."""
    n, k = shape
    gen = torch.Generator().manual_seed(n * k)
    x = (torch.randn(n, k, generator=gen) * 4).to(dtype)
    y = (torch.rand(n, k, generator=gen) > 0.6).float()
    up = torch.rand(n, generator=gen) + 0.5
    rows, rbuf = nan_outputs((n,))
    grad, gbuf = nan_outputs((n, k), dtype)
    xg, yg = guarded(x, float("nan"))[0], guarded(y, float("nan"))[0]
    p32 = torch.tensor(params)  # (kept alive: the kernel reads it after data_ptr())
    err = metric_lib.emu_dice_sigmoid(xg.data_ptr(), DTYPE_CODES[dtype], yg.data_ptr(), n, k,
                                      p32.data_ptr(), rows.data_ptr(), up.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    check_guards(rbuf, "rows")
    check_guards(gbuf, "grad")
    expect = torch.ops.fastloss.dice_sigmoid_forward(x, y, *params)
    expect_grad = torch.ops.fastloss.dice_sigmoid_backward(up, x, y, *params)
    torch.testing.assert_close(rows, expect, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), expect_grad.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_dice_bad_targets_give_nan_rows(metric_lib):
    """On CUDA the op does not check target values (it would wait for the device): a sigmoid
    target outside [0, 1] or a class outside [0, C) makes that row's loss NaN, the others are
    untouched."""
    n, k, c = 5, 6, 7
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, k, generator=gen)
    y = (torch.rand(n, k, generator=gen) > 0.5).float()
    y[1, 2], y[3, 0] = 1.5, -0.25
    up, p32 = torch.ones(n), torch.tensor(DICE_PARAMS[0])
    rows, grad = torch.full((n,), float("nan")), torch.empty(n, k)
    err = metric_lib.emu_dice_sigmoid(x.data_ptr(), 0, y.data_ptr(), n, k, p32.data_ptr(),
                                      rows.data_ptr(), up.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    good = torch.tensor([0, 2, 4])
    assert rows[[1, 3]].isnan().all()
    bad = (y < 0) | (y > 1)
    assert grad[bad].isnan().all() and grad[~bad].isfinite().all()
    torch.testing.assert_close(rows[good], torch.ops.fastloss.dice_sigmoid_forward(x[good], y[good], *DICE_PARAMS[0]))
    xs = torch.randn(n, c, generator=gen)
    t = torch.tensor([0, 7, 3, -1, -100])
    rows, grad = torch.full((n,), float("nan")), torch.empty(n, c)
    err = metric_lib.emu_dice_softmax(xs.data_ptr(), 0, t.data_ptr(), int64s(n, c, c, -100),
                                      p32.data_ptr(), rows.data_ptr(), up.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    assert rows[[1, 3]].isnan().all() and rows[4] == 0
    ok = torch.tensor([0, 2])
    torch.testing.assert_close(rows[ok], torch.ops.fastloss.dice_softmax_forward(xs[ok], t[ok], *DICE_PARAMS[0], -100))


def dice_softmax_against_cpu(metric_lib, xs, x, t, params, up, stride):
    """The emulated softmax-Dice kernels on xs (x's values, rows `stride` apart), their outputs
    between guards, and the CPU kernels' on x: (rows, grad, expected rows, expected grad)."""
    n, c = x.shape
    rows, rbuf = nan_outputs((n,))
    grad, gbuf = nan_outputs((n, c), x.dtype)
    p32 = torch.tensor(params)
    err = metric_lib.emu_dice_softmax(xs.data_ptr(), DTYPE_CODES[x.dtype], t.data_ptr(),
                                      int64s(n, c, stride, -100), p32.data_ptr(),
                                      rows.data_ptr(), up.data_ptr(), grad.data_ptr())
    assert err is None, err.decode()
    check_guards(rbuf, "rows")
    check_guards(gbuf, "grad")
    return (rows, grad, torch.ops.fastloss.dice_softmax_forward(x, t, *params, -100),
            torch.ops.fastloss.dice_softmax_backward(up, x, t, *params, -100))


@pytest.mark.parametrize("params", DICE_PARAMS, ids=str)
@pytest.mark.parametrize("shape", [(6, 1), (9, 7), (4, 1000), (3, 2500)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_dice_softmax(metric_lib, dtype, shape, params):
    """Rows of every kind: ordinary, saturated (one logit far above the rest, its class the
    target or not), ties at the max, ignore_index; strided rows with NaN padding."""
    n, c = shape
    gen = torch.Generator().manual_seed(n + c)
    x = torch.randn(n, c, generator=gen) * 2
    t = torch.randint(0, c, (n,), generator=gen)
    if n >= 4 and c > 1:
        x[0, 3 % c] += 40          # saturated, top != target (unless equal by chance)
        t[0] = (3 % c + 1) % c
        x[1, 0] += 40              # saturated, top == target
        t[1] = 0
        x[2, :] = 1.5              # all tied: the first is the max
        t[3] = -100                # ignored
    x = x.to(dtype)
    padded = torch.cat([x, torch.full((n, 2), float("nan"), dtype=dtype)], 1)
    xs = torch.as_strided(guarded(padded, float("nan"))[0], (n, c), (c + 2, 1))
    up = torch.rand(n, generator=gen) + 0.5
    rows, grad, expect, expect_grad = dice_softmax_against_cpu(metric_lib, xs, x, t, params, up, c + 2)
    torch.testing.assert_close(rows, expect, rtol=2e-5, atol=2e-5 * max(1.0, c / 100))
    scale = float(expect_grad.float().abs().max()) + 1e-6
    torch.testing.assert_close(grad.float(), expect_grad.float(), rtol=TOL[dtype] * 5, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("alpha", [0.1, 0.01])
def test_dice_softmax_far_saturated(metric_lib, alpha):
    """Top classes 88-200 logits ahead (their 1 - p subnormal or below float32's range, their
    (1 - p)^alpha not small), the top the target or not, and a row whose other classes are all
    -inf: the CUDA kernel's log q_top (from the others' own max and sum) gives the CPU kernel's
    rows and gradients; a NaN logit behind a far-ahead top still makes its row NaN; a row of
    all -inf is finite as on the CPU (the CUDA row state had made it NaN)."""
    n, c = 7, 700
    gen = torch.Generator().manual_seed(int(alpha * 100))
    x = torch.randn(n, c, generator=gen)
    x[0, 3] += 88
    x[1, 650] += 95
    x[2, 0] += 120
    x[3, 300] += 200
    x[4, :] = float("-inf")
    x[4, 7] = 2.0
    x[5, 9] += 150
    x[5, 600] = float("nan")
    x[6, :] = float("-inf")
    t = torch.tensor([3, 1, 5, 300, 7, 9, 2])
    params = (alpha, 1.0, 0.0)
    up = torch.rand(n, generator=gen) + 0.5
    rows, grad, expect, expect_grad = dice_softmax_against_cpu(metric_lib, x, x, t, params, up, c)
    finite = [0, 1, 2, 3, 4, 6]
    assert torch.isfinite(expect[finite]).all() and torch.isfinite(expect_grad[finite]).all()
    assert expect[5].isnan() and rows[5].isnan() and grad[5].isnan().all() and expect_grad[5].isnan().all()
    torch.testing.assert_close(rows[finite], expect[finite], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[finite], expect_grad[finite], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(1000, 1), (37, 5), (3, 70), (0, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_confusion_sums(metric_lib, dtype, shape, from_logits):
    n, k = shape
    gen = torch.Generator().manual_seed(n + k)
    s = torch.randn(n, k, generator=gen) if from_logits else torch.rand(n, k, generator=gen)
    s = s.to(dtype)
    y = (torch.rand(n, k, generator=gen) > 0.5).float()
    gs = torch.randn(4, k, generator=gen)
    sums, sbuf = nan_outputs((4, k))
    grad, gbuf = nan_outputs((n, k), dtype)
    scratch = torch.full((metric_lib.emu_confusion_scratch(n, k),), float("nan"))
    sg, yg = guarded(s, float("nan"))[0], guarded(y, float("nan"))[0]
    err = metric_lib.emu_confusion(sg.data_ptr(), DTYPE_CODES[dtype], yg.data_ptr(), n, k, 9.0,
                                   int(from_logits), sums.data_ptr(), scratch.data_ptr(), gs.data_ptr(),
                                   grad.data_ptr())
    assert err is None, err.decode()
    check_guards(sbuf, "sums")
    check_guards(gbuf, "grad")
    expect = torch.ops.fastloss.confusion_sums(s, y, 9.0, from_logits)
    torch.testing.assert_close(sums, expect, rtol=1e-5, atol=1e-4)
    expect_grad = torch.ops.fastloss.confusion_sums_backward(gs, s, y, 9.0, from_logits)
    torch.testing.assert_close(grad.float(), expect_grad.float(), rtol=TOL[dtype], atol=TOL[dtype])


# ---- Mann-Whitney (AUC) loss ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def auc_lib():
    lib = build.build("pair_losses/auc_cuda.cu", "auc_harness.cpp", "auc")
    P, I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.emu_auc_scratch.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, I64]
    lib.emu_auc_scratch.restype = None
    lib.emu_auc.argtypes = [P, P, ctypes.c_int, I64, P, P, P, P, P]
    lib.emu_auc.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("grads", [True, False], ids=["grads", "loss-only"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 300), (2, 600, 7), (1, 257, 513), (1, 2, 5000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_auc(auc_lib, dtype, shape, grads):
    bsz, p, n = shape
    gen = torch.Generator().manual_seed(p + n)
    pos = (torch.randn(bsz, p, generator=gen) * 2 + 0.5).to(dtype)
    neg = (torch.randn(bsz, n, generator=gen) * 2).to(dtype)
    pos_pad = torch.cat([pos, torch.full((bsz, 3), float("nan"), dtype=dtype)], 1)  # strided rows
    pg = torch.as_strided(guarded(pos_pad, float("nan"))[0], (bsz, p), (p + 3, 1))
    ng = guarded(neg, float("nan"))[0]
    loss, lbuf = nan_outputs((bsz,))
    gpos, gpbuf = nan_outputs((bsz, p))
    gneg, gnbuf = nan_outputs((bsz, n))
    sizes = int64s(0, 0)
    auc_lib.emu_auc_scratch(bsz, p, n, sizes)
    loss_scratch = torch.full((sizes[0],), float("nan"), dtype=torch.float64)
    grad_scratch = torch.full((sizes[1],), float("nan"))
    err = auc_lib.emu_auc(pg.data_ptr(), ng.data_ptr(), DTYPE_CODES[dtype], int64s(bsz, p, n, p + 3, n),
                          loss.data_ptr(), gpos.data_ptr() if grads else None,
                          gneg.data_ptr() if grads else None, loss_scratch.data_ptr(), grad_scratch.data_ptr())
    assert err is None, err.decode()
    for buf, what in ((lbuf, "loss"), (gpbuf, "grad_pos"), (gnbuf, "grad_neg")):
        check_guards(buf, what)
    p64, n64 = pos.double().requires_grad_(True), neg.double().requires_grad_(True)
    rows = torch.nn.functional.softplus(n64[:, None, :] - p64[:, :, None]).mean((1, 2))
    rows.sum().backward()
    torch.testing.assert_close(loss.double(), rows.detach(), rtol=1e-5, atol=1e-6)
    if grads:
        torch.testing.assert_close(gpos.double(), p64.grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(gneg.double(), n64.grad, rtol=1e-4, atol=1e-8)
    else:
        assert gpos.isnan().all() and gneg.isnan().all()


# ---- the row losses (foundation) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def losses_lib():
    lib = build.build("losses/losses_cuda.cu", "losses_harness.cpp", "losses")
    P, I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.emu_losses.argtypes = [P, ctypes.c_int, P, P, P, I64, P, P, P, P, P, P, ctypes.c_int]
    lib.emu_losses.restype = ctypes.c_char_p
    lib.emu_scale_rows_unless_one.argtypes = [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, P, ctypes.c_int]
    lib.emu_scale_rows_unless_one.restype = ctypes.c_char_p
    lib.emu_set_shared_optin.argtypes = [ctypes.c_int64]
    lib.emu_set_shared_optin.restype = ctypes.c_int64
    lib.emu_reduce_rows.argtypes = [P, P, P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, P, P]
    lib.emu_reduce_rows.restype = ctypes.c_char_p
    lib.emu_mean_factor_rows.argtypes = [P, P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, P]
    lib.emu_mean_factor_rows.restype = ctypes.c_char_p
    lib.emu_upstream_rows.argtypes = [P, ctypes.c_int, P, ctypes.c_double, ctypes.c_int64, P]
    lib.emu_upstream_rows.restype = ctypes.c_char_p
    return lib


# the one-pass kernel's row staging (forward_backward_kernel keeps a row's first packs in the
# device's opt-in shared memory less a 4096-byte margin): the whole row (227 KB, an H100's),
# its first 48 packs only (the rest read again from global memory), or none (the kernel
# without staging)
STAGE_OPTIN = {"whole": 227 * 1024, "part": 4096 + 48 * 16, "none": 1024}


# name -> (kind code, keyword arguments of the CPU op after ignore_index, float params, adaptive)
LOSS_CASES = {
    "ce": (0, (0.0, 0.0, 0.0), dict()),
    "ce_smooth_z_softcap": (0, (0.2, 1e-2, 4.0), dict(label_smoothing=0.2, lse_square_scale=1e-2, softcap=4.0)),
    "comp_sum": (1, (0.5,), dict(tau=0.5)),
    "ldr": (2, (1.0, 1.0, False, 2.0), dict(lam=1.0, margin=1.0)),
    "aldr": (2, (0.5, 0.3, True, 3.0), dict(lam=0.5, margin=0.3, adaptive=True, alpha=3.0)),
    "spherical_z": (3, (0.7, 1.5, 1e-6), dict(a=0.7, b=1.5, eps=1e-6)),
    "stablemax": (4, (), dict()),
}
LOSS_OPS = ["cross_entropy", "comp_sum", "ldr", "spherical_z", "stablemax"]


def _loss_floats(kind, kw):
    """The harness's float parameters: label_smoothing, lse_square_scale, softcap, tau, lam,
    margin, alpha, a, b, eps."""
    f = torch.zeros(10)
    if kind == 0:
        f[0], f[1], f[2] = kw.get("label_smoothing", 0.0), kw.get("lse_square_scale", 0.0), kw.get("softcap", 0.0)
    f[3] = kw.get("tau", 1.0)
    f[4], f[5], f[6] = kw.get("lam", 1.0), kw.get("margin", 0.0), kw.get("alpha", 2.0)
    f[7], f[8], f[9] = kw.get("a", 1.0), kw.get("b", 0.0), kw.get("eps", 0.0)
    return f


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights"])
@pytest.mark.parametrize("shape", [(5, 7), (9, 1000), (3, 1031), (2, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_row_losses(losses_lib, case, dtype, shape, weighted, fused=0, stage="whole"):
    """The row-loss kernels (warp per row up to 1024 classes, a block above; 16-byte packs with
    a misaligned head: rows of odd stride) against the CPU kernels' ops. fused: 1 the one-pass
    kernel, 2 the same writing the gradient over the logits; stage: how much of a row it keeps
    on chip (STAGE_OPTIN)."""
    kind, op_args, kw = LOSS_CASES[case]
    n, c = shape
    gen = torch.Generator().manual_seed(n * c + kind)
    x = (torch.randn(n, c, generator=gen) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    t[1] = -100  # ignored
    w = torch.rand(c, generator=gen) + 0.5 if weighted else None
    padded = torch.cat([x, torch.full((n, 3), float("nan"), dtype=dtype)], 1)  # row stride c + 3
    view, buf = guarded(padded, SENTINEL if fused == 2 else float("nan"))
    xs = torch.as_strided(view, (n, c), (c + 3, 1))
    f = _loss_floats(kind, kw)
    wsum = torch.tensor([float(w.sum())]) if w is not None else None
    loss, lbuf = nan_outputs((n,))
    s0, _ = nan_outputs((n,))
    s1, _ = nan_outputs((n,))
    up = torch.rand(n, generator=gen) + 0.5
    grad, gbuf = (xs, buf) if fused == 2 else nan_outputs((n, c), dtype)
    before = losses_lib.emu_set_shared_optin(STAGE_OPTIN[stage])
    try:
        err = losses_lib.emu_losses(xs.data_ptr(), DTYPE_CODES[dtype], t.data_ptr(),
                                    None if w is None else w.data_ptr(), None if wsum is None else wsum.data_ptr(),
                                    int64s(n, c, c + 3, -100, kind, int(kw.get("adaptive", False))), f.data_ptr(),
                                    loss.data_ptr(), s0.data_ptr(), s1.data_ptr(), up.data_ptr(), grad.data_ptr(),
                                    int(fused))
    finally:
        losses_lib.emu_set_shared_optin(before)
    assert err is None, err.decode()
    check_guards(lbuf, "loss")
    check_guards(gbuf, "grad")
    if fused == 2:
        assert view[:, c:].isnan().all(), "the kernel wrote into the gap between rows"
    op = LOSS_OPS[kind]
    fwd = getattr(torch.ops.fastloss, f"{op}_forward")(x, t, w, -100, *op_args)
    bwd = getattr(torch.ops.fastloss, f"{op}_backward")(up, x, t, w, fwd[1], fwd[2], -100, *op_args)
    tol = 2e-5 if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(loss, fwd[0], rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), bwd.float(), rtol=tol, atol=tol)


# (shape, how much of each row goes on chip): 7 rows of 2050 classes with only 48 packs staged
# (192 float32 / 384 16-bit classes, the rest read again), 3 of 1031 wholly, 3 of 1031 without;
# 2 rows of 12500 wholly and in part: float32 rows of more than 3072 packs reach the loop that
# keeps 4 packs per thread in flight (4 x 1024 threads), where staged and read-again packs mix
_ONE_PASS = [((5, 7), "whole"), ((3, 1031), "whole"), ((7, 2050), "part"), ((3, 1031), "none"),
             ((2, 12500), "whole"), ((2, 12500), "part")]


@pytest.mark.parametrize("shape,stage", _ONE_PASS, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_row_losses_forward_backward_in_one_pass(losses_lib, case, dtype, shape, stage):
    """grad_in_forward's kernel (forward_backward_kernel: each row's statistics, then its
    gradient, the row's first packs kept in shared memory in between; a warp per row up to 1024
    classes, else 1024-thread blocks, at most one per multiprocessor: 7 rows over 3 here)
    against the CPU ops, class weights on."""
    test_row_losses(losses_lib, case, dtype, shape, True, fused=1, stage=stage)


@pytest.mark.parametrize("shape,stage", _ONE_PASS, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_row_losses_forward_backward_in_place(losses_lib, case, dtype, shape, stage):
    """grad_in_forward with inplace_backward: the one-pass kernel writes each row's gradient
    over the row itself (every thread reads the target logit before any writes it; the row
    stride c + 3 leaves a column gap that must keep its NaN), against the CPU ops."""
    test_row_losses(losses_lib, case, dtype, shape, True, fused=2, stage=stage)


@pytest.mark.parametrize("n", [1, 7, 300, 2500])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights"])
def test_reduce_rows_and_upstream(losses_lib, n, weighted):
    """The one-launch reductions around the row kernels (losses_op.cpp's reduce_rows,
    row_upstream and grad_in_forward's factor on CUDA tensors) against float64: the sum, the
    mean over the kept rows' weights (ignored rows skipped, none kept: NaN), 1 / those weights
    for every row, and each row's factor of an incoming gradient."""
    gen = torch.Generator().manual_seed(n + 7 * weighted)
    c = 11
    rows = torch.randn(n, generator=gen) * 5
    t = torch.randint(0, c, (n,), generator=gen)
    t[::3] = -100
    w = torch.rand(c, generator=gen) + 0.5 if weighted else None
    kept = t != -100
    rows[~kept] = 0.0  # (as the row kernels leave ignored rows)
    want_den = (w[t[kept]].double().sum() if weighted else kept.double().sum())
    for mean, want in ((False, rows.double().sum()), (True, rows.double().sum() / want_den)):
        loss, lbuf = nan_outputs((1,))
        den, dbuf = nan_outputs((1,))
        err = losses_lib.emu_reduce_rows(rows.data_ptr(), t.data_ptr(), None if w is None else w.data_ptr(), n, c,
                                         -100, int(mean), loss.data_ptr(), den.data_ptr())
        assert err is None, err.decode()
        check_guards(lbuf, "loss")
        check_guards(dbuf, "denom")
        torch.testing.assert_close(loss.double()[0], want, rtol=1e-6, atol=1e-6, equal_nan=True)
        if mean:
            torch.testing.assert_close(den.double()[0], want_den, rtol=1e-6, atol=0)
    factor, fbuf = nan_outputs((n,))  # grad_in_forward's factor of the mean, made before its kernel
    err = losses_lib.emu_mean_factor_rows(t.data_ptr(), None if w is None else w.data_ptr(), n, c, -100,
                                          factor.data_ptr())
    assert err is None, err.decode()
    check_guards(fbuf, "factor")
    torch.testing.assert_close(factor.double(), (1.0 / want_den).expand(n), rtol=1e-6, atol=0)
    t_none = torch.full((n,), -100)  # no kept row (the kernels give ignored rows 0): 0 / 0
    zeros = torch.zeros(n)
    loss, _ = nan_outputs((1,))
    den, _ = nan_outputs((1,))
    assert losses_lib.emu_reduce_rows(zeros.data_ptr(), t_none.data_ptr(), None, n, c, -100, 1, loss.data_ptr(),
                                      den.data_ptr()) is None
    assert loss.isnan().all() and den[0] == 0
    for dtype in DTYPE_CODES:
        g = (torch.rand(1, generator=gen) + 0.5).to(dtype)
        for denom, divisor in ((torch.tensor([3.5]), 1.0), (None, float(n)), (None, 1.0)):
            out, obuf = nan_outputs((n,))
            err = losses_lib.emu_upstream_rows(g.data_ptr(), DTYPE_CODES[dtype],
                                               None if denom is None else denom.data_ptr(), divisor, n,
                                               out.data_ptr())
            assert err is None, err.decode()
            check_guards(obuf, "out")
            want = g.double() / (denom.double() if denom is not None else divisor)
            torch.testing.assert_close(out.double(), want.expand(n), rtol=1e-6, atol=0)


# a NaN with a payload that a load, float32 multiply and store would not keep (quieted or made
# canonical): rows that keep these bits were neither read nor written
_RAW_NAN = {torch.float32: (torch.int32, 0x7F800001), torch.float16: (torch.int16, 0x7C01),
            torch.bfloat16: (torch.int16, 0x7F81)}


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=str)
def test_scale_rows_unless_one(losses_lib, dtype):
    """grad_in_forward's backward scaling on the device: rows whose factor is exactly 1 are not
    touched (they keep a NaN payload bit for bit), the others are scaled in place; one factor
    for every row, or one per row."""
    gen = torch.Generator().manual_seed(7)
    n, c = 9, 1031
    ints, raw = _RAW_NAN[dtype]
    for per_row in (True, False):
        x = (torch.randn(n, c, generator=gen) * 3).to(dtype)
        factor = torch.rand(n if per_row else 1, generator=gen) + 0.5
        if per_row:
            factor[[0, 4, 8]] = 1.0
            x.view(ints)[[0, 4, 8]] = raw
        expect = (x.float() * (factor[:, None] if per_row else factor)).to(dtype)
        err = losses_lib.emu_scale_rows_unless_one(x.data_ptr(), DTYPE_CODES[dtype], n, c, factor.data_ptr(),
                                                   int(per_row))
        assert err is None, err.decode()
        scaled = [r for r in range(n) if not per_row or factor[r] != 1.0]
        torch.testing.assert_close(x[scaled], expect[scaled], rtol=0, atol=0)
        if per_row:
            assert (x.view(ints)[[0, 4, 8]] == raw).all()
    x = torch.zeros(3, 5, dtype=dtype)
    x.view(ints).fill_(raw)
    one = torch.ones(1)
    assert losses_lib.emu_scale_rows_unless_one(x.data_ptr(), DTYPE_CODES[dtype], 3, 5, one.data_ptr(), 0) is None
    assert (x.view(ints) == raw).all()


# ---- similarity blocks (Multi-Similarity, TCM, contrastive) ---------------------------------------


@pytest.fixture(scope="module")
def sim_lib():
    lib = build.build("pair_losses/similarity_rows_cuda.cu", "similarity_harness.cpp", "similarity")
    P, I64, F32 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_float
    lib.emu_ms_rows.argtypes = [P, P, I64, P, P, P, ctypes.c_int]
    lib.emu_tcm_rows.argtypes = [P, P, I64, F32, F32, P]
    lib.emu_tcm_rows_grad.argtypes = [P, P, I64, F32, F32, P]
    lib.emu_clip_parts.argtypes = [I64]
    lib.emu_clip_parts.restype = ctypes.c_int64
    lib.emu_clip_rows.argtypes = [P, I64, F32, P, P, P, P, P]
    lib.emu_clip_rows_grad.argtypes = [P, I64, F32, P, P, P]
    for f in (lib.emu_ms_rows, lib.emu_tcm_rows, lib.emu_tcm_rows_grad, lib.emu_clip_rows,
              lib.emu_clip_rows_grad):
        f.restype = ctypes.c_char_p
    return lib


SIM_SHAPES = [(5, 37, 3), (3, 300, 41), (70, 130, 50), (1, 1, 0)]  # rows, n, row0


def sim_block(rows, n, row0, seed, classes=4):
    gen = torch.Generator().manual_seed(seed * 17 + rows * 5 + n)
    s = torch.rand(rows, n, generator=gen) * 2 - 1
    labels = torch.randint(0, classes, (n,), generator=gen)
    keys = torch.ops.fastloss.pair_label_keys(labels)
    return s, guarded(keys, float("nan"))[0]


def in_place(s):
    """s between sentinels, for a kernel that rewrites it; -> (the block, its guarded buffer)"""
    return guarded(s.clone(), SENTINEL)


@pytest.mark.parametrize("params", [(2.0, 50.0, 0.5, 0.1), (1.0, 10.0, 0.2, float("nan"))], ids=str)
@pytest.mark.parametrize("shape", SIM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ms_rows_cuda(sim_lib, shape, params):
    rows, n, row0 = shape
    s, keys = sim_block(rows, n, row0, seed=1)
    if rows > 2:
        s[2, n // 2] = float("nan")  # that anchor's loss and gradient row: NaN, as on the CPU
    eps = None if params[3] != params[3] else params[3]
    p32 = torch.tensor(params, dtype=torch.float32)  # alive through the calls
    for write in (False, True):
        blk, sbuf = in_place(s)
        lse_pos, pbuf = nan_outputs((rows,))
        lse_neg, nbuf = nan_outputs((rows,))
        err = sim_lib.emu_ms_rows(blk.data_ptr(), keys.data_ptr(), int64s(rows, n, row0),
                                  p32.data_ptr(), lse_pos.data_ptr(),
                                  lse_neg.data_ptr(), int(write))
        assert err is None, err.decode()
        for buf, what in ((sbuf, "s"), (pbuf, "lse_pos"), (nbuf, "lse_neg")):
            check_guards(buf, what)
        cpu = s.clone()
        want = torch.ops.fastloss.ms_rows_(cpu, keys, row0, *params[:3], eps, write)
        torch.testing.assert_close(torch.stack([lse_pos, lse_neg]), want, rtol=1e-5, atol=1e-6, equal_nan=True)
        if write:
            torch.testing.assert_close(blk, cpu, rtol=1e-5, atol=1e-7, equal_nan=True)
        else:
            assert torch.equal(blk, s) or torch.allclose(blk, s, equal_nan=True)  # read only


@pytest.mark.parametrize("margins", [(0.9, 0.5), (0.3, -0.1)], ids=str)
@pytest.mark.parametrize("shape", SIM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tcm_rows_cuda(sim_lib, shape, margins):
    rows, n, row0 = shape
    s, keys = sim_block(rows, n, row0, seed=2)
    stats, sbuf = nan_outputs((rows, 4), torch.float64)
    blk = s.clone()
    err = sim_lib.emu_tcm_rows(blk.data_ptr(), keys.data_ptr(), int64s(rows, n, row0), *margins, stats.data_ptr())
    assert err is None, err.decode()
    check_guards(sbuf, "row_stats")
    totals, row_nnz, _ = torch.ops.fastloss.tcm_rows(s.clone(), keys, row0, *margins, False)
    torch.testing.assert_close(stats.sum(0), totals, rtol=1e-6, atol=1e-5)
    assert (stats[:, 1] + stats[:, 3]).long().tolist() == row_nnz.tolist()
    coef = torch.tensor([0.25, 1.5], dtype=torch.float64)
    grad, gbuf = in_place(s)
    err = sim_lib.emu_tcm_rows_grad(grad.data_ptr(), keys.data_ptr(), int64s(rows, n, row0), *margins,
                                    coef.data_ptr())
    assert err is None, err.decode()
    check_guards(gbuf, "s")
    want = s.clone()
    torch.ops.fastloss.tcm_rows_grad_(want, keys, row0, *margins, coef)
    assert torch.equal(grad, want)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SIM_SHAPES + [(300, 300, 0)], ids=lambda s: "x".join(map(str, s)))
def test_clip_rows_cuda(sim_lib, shape, symmetric):
    rows, n, row0 = shape
    s, _ = sim_block(rows, n, row0, seed=3)
    s = s * 3
    scale = 14.0
    parts = sim_lib.emu_clip_parts(int64s(rows, n, row0))
    assert parts == -(-rows // 64)
    col_max, mbuf = nan_outputs((parts, n))
    col_sum, sbuf = nan_outputs((parts, n))
    lse_row, rbuf = nan_outputs((rows,))
    diag, dbuf = nan_outputs((rows,))
    lse_col, cbuf = nan_outputs((n,))
    blk = s.clone()
    err = sim_lib.emu_clip_rows(blk.data_ptr(), int64s(rows, n, row0), scale, lse_row.data_ptr(), diag.data_ptr(),
                                col_max.data_ptr(), col_sum.data_ptr(), lse_col.data_ptr() if symmetric else None)
    assert err is None, err.decode()
    for buf, what in ((rbuf, "lse_row"), (dbuf, "diag"), (cbuf, "lse_col"), (mbuf, "col_max"), (sbuf, "col_sum")):
        check_guards(buf, what)
    want = torch.ops.fastloss.clip_rows(s, row0, scale, symmetric)
    torch.testing.assert_close(lse_row, want[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(diag, want[1])
    if symmetric:
        torch.testing.assert_close(lse_col, want[2], rtol=1e-6, atol=1e-5)
    else:
        assert lse_col.isnan().all()
    g = torch.rand(n, generator=torch.Generator().manual_seed(4)) + 0.5
    col = want[2] if symmetric else None
    grad, gbuf = in_place(s)
    err = sim_lib.emu_clip_rows_grad(grad.data_ptr(), int64s(rows, n, row0), scale, want[0].data_ptr(),
                                     col.data_ptr() if symmetric else None, g.data_ptr())
    assert err is None, err.decode()
    check_guards(gbuf, "s")
    expect = s.clone()
    torch.ops.fastloss.clip_rows_grad_(expect, row0, scale, want[0], col, g)
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-5)


# ---- few-shot losses: chosen-pair distances, ICNN's score --------------------------------------


@pytest.fixture(scope="module")
def nb_lib():
    lib = build.build("pair_losses/neighbours_cuda.cu", "neighbours_harness.cpp", "neighbours")
    P, I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.emu_neighbour_dist.argtypes = [P, P, P, I64, ctypes.c_float, P]
    lib.emu_neighbour_grad_x.argtypes = [P, P, P, I64, P, P]
    lib.emu_neighbour_grad_t.argtypes = [P, P, P, P, I64, P, P]
    lib.emu_knn_rows.argtypes = [P, I64, P, P, ctypes.c_int, ctypes.c_int64, P]
    lib.emu_knn_rows.restype = ctypes.c_char_p
    lib.emu_icnn_scratch.argtypes = [ctypes.c_int64]
    lib.emu_icnn_scratch.restype = ctypes.c_int64
    lib.emu_icnn_score.argtypes = [P, P, I64, ctypes.c_int, P, P, P]
    for f in (lib.emu_neighbour_dist, lib.emu_neighbour_grad_x, lib.emu_neighbour_grad_t, lib.emu_icnn_score):
        f.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("case", ["plain", "ties", "nan", "self", "k64", "wide"])
def test_knn_rows_kernel(nb_lib, case):
    """The k nearest columns of a dot-product block (a radix selection per row) against the CPU
    op: ascending, ties to the lower column, NaN / inf distances last by column, the row's own
    column skipped with exclude_self; 200 columns (one column byte) and 70000 (three)."""
    g = torch.Generator().manual_seed(len(case))
    rows, n, d = (5, 70000, 4) if case == "wide" else (7, 200, 6)
    k = {"k64": 64, "ties": 9}.get(case, 5)
    x = torch.randn(rows, d, generator=g)
    t = torch.randn(n, d, generator=g)
    row0 = 0
    if case == "ties":  # whole groups of equal distances
        t = torch.randint(-2, 3, (n, d), generator=g).float()
        x = torch.randint(-2, 3, (rows, d), generator=g).float()
    if case == "self":  # the rows are columns row0 .. row0 + rows - 1 of the block
        row0 = 11
        x = t[row0:row0 + rows].clone()
    s = (x @ t.T).contiguous()
    row_sq, col_sq = x.square().sum(1), t.square().sum(1)
    if case == "nan":
        s[0, 3:190] = float("nan")   # row 0: 13 numbers left... and row 1 fewer numbers than k
        s[1, 2:] = float("nan")
        s[2, 5] = float("inf")
    exclude = case == "self"
    want = torch.ops.fastloss.knn_rows(s, row_sq, col_sq, row0, exclude, k)
    idx, ibuf = guarded(torch.full((rows, k), -1, dtype=torch.long), -7)
    err = nb_lib.emu_knn_rows(s.data_ptr(), int64s(rows, n, row0), row_sq.data_ptr(), col_sq.data_ptr(),
                              int(exclude), k, idx.data_ptr())
    assert err is None, err.decode()
    assert (ibuf[:GUARD] == -7).all() and (ibuf[-GUARD:] == -7).all(), "knn idx: wrote outside its output"
    assert torch.equal(idx, want), (idx, want)


@pytest.mark.parametrize("shape", [(37, 23, 19, 5), (9, 40, 70, 3), (4, 3, 1, 2)], ids=str)
def test_neighbour_dist_kernels(nb_lib, shape):
    """Distances of chosen pairs and both gradients against float64 (targets chosen by several
    rows, d above and below a warp); an index outside the targets gives NaN, not a wild read."""
    n, m, d, n_nb = shape
    g = torch.Generator().manual_seed(n * m + d)
    x, _ = guarded(torch.randn(n, d, generator=g), float("nan"))
    t, _ = guarded(torch.randn(m, d, generator=g), float("nan"))
    idx = torch.randint(0, m, (n, n_nb), generator=g)
    w = torch.randn(n, n_nb, generator=g)
    shape_arg = int64s(n, m, d, n_nb)
    x64, t64, w64 = x.double(), t.double(), w.double()
    diff = x64[:, None, :] - t64[idx]                                            # [n, n_nb, d]
    dist, dbuf = guarded(torch.full((n, n_nb), float("nan")), SENTINEL)
    assert nb_lib.emu_neighbour_dist(x.data_ptr(), t.data_ptr(), idx.data_ptr(), shape_arg, 1e-6,
                                     dist.data_ptr()) is None
    check_guards(dbuf, "dist")
    torch.testing.assert_close(dist.double(), (diff.square().sum(2) + 1e-6).sqrt(), rtol=1e-5, atol=1e-6)
    gx, gxbuf = guarded(torch.full((n, d), float("nan")), SENTINEL)
    assert nb_lib.emu_neighbour_grad_x(x.data_ptr(), t.data_ptr(), idx.data_ptr(), shape_arg, w.data_ptr(),
                                       gx.data_ptr()) is None
    check_guards(gxbuf, "grad_x")
    torch.testing.assert_close(gx.double(), (w64[:, :, None] * diff).sum(1), rtol=1e-5, atol=1e-5)
    flat = idx.flatten()
    pairs = torch.argsort(flat, stable=True)           # as pair_losses_op.cpp lists them
    t_ptr = torch.searchsorted(flat[pairs], torch.arange(m + 1))
    gt, gtbuf = guarded(torch.full((m, d), float("nan")), SENTINEL)
    assert nb_lib.emu_neighbour_grad_t(x.data_ptr(), t.data_ptr(), t_ptr.data_ptr(), pairs.data_ptr(), shape_arg,
                                       w.data_ptr(), gt.data_ptr()) is None
    check_guards(gtbuf, "grad_t")
    want = torch.zeros(m, d, dtype=torch.float64).index_add_(0, flat, -(w64[:, :, None] * diff).reshape(-1, d))
    torch.testing.assert_close(gt.double(), want, rtol=1e-5, atol=1e-5)
    bad = idx.clone()
    bad[0, 0], bad[-1, -1] = -1, m
    assert nb_lib.emu_neighbour_dist(x.data_ptr(), t.data_ptr(), bad.data_ptr(), shape_arg, 1e-6,
                                     dist.data_ptr()) is None
    assert dist[0, 0].isnan() and dist[-1, -1].isnan()
    assert nb_lib.emu_neighbour_grad_x(x.data_ptr(), t.data_ptr(), bad.data_ptr(), shape_arg, w.data_ptr(),
                                       gx.data_ptr()) is None
    assert gx[0].isnan().all() and gx[-1].isnan().all()


@pytest.mark.parametrize("case", ["mixed", "ties", "one_class", "no_same", "clipped"])
def test_icnn_score_kernel(nb_lib, case):
    """ICNN's score and d loss / d distances against the torch formula of few_shot.py in float64
    with autograd (ties of the batch max, of a row's max ratio and of the nearest other-class
    distance share their gradient, as torch's amax / amin)."""
    from fastloss.ops.few_shot import icnn_score_torch

    g = torch.Generator().manual_seed(len(case))
    n_rows, n, k = (41, 6, 4) if case != "clipped" else (7, 5, 5)
    d = torch.rand(n_rows, n, generator=g).add_(0.05).sort(1).values
    same = torch.rand(n_rows, n, generator=g) < 0.5
    if case == "ties":  # equal distances within rows, and the batch max of dc repeated
        d = (d * 2).round().div(2).add(0.25).sort(1).values
        same[:, 0] = False
    if case == "one_class":
        same[:] = True
    if case == "no_same":
        same[:] = False
    same[3, :] = True  # a row without other-class neighbours (delta infinite)
    clipped = case == "clipped"
    d64 = d.double().requires_grad_(True)
    want = icnn_score_torch(d64, same, k, clipped)
    want.backward()
    dg, _ = guarded(d, float("nan"))
    sg = same.clone()
    grad, gbuf = guarded(torch.full((n_rows, n), float("nan")), SENTINEL)
    loss = torch.full((1,), float("nan"))
    scratch = torch.full((nb_lib.emu_icnn_scratch(n_rows),), float("nan"), dtype=torch.float64)
    err = nb_lib.emu_icnn_score(dg.data_ptr(), sg.data_ptr(), int64s(n_rows, n, k), int(clipped),
                                grad.data_ptr(), loss.data_ptr(), scratch.data_ptr())
    assert err is None, err.decode()
    check_guards(gbuf, "grad")
    torch.testing.assert_close(loss[0].double(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), d64.grad, rtol=1e-5, atol=1e-7)


# ---- linear + cross-entropy: the vocabulary-tile statistics on tensor cores ----------------------


@pytest.fixture(scope="module")
def lce_lib():
    lib = build.build("linear_losses/linear_ce_cuda.cu", "linear_ce_harness.cpp", "linear_ce")
    P, I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.emu_linear_ce_stats.argtypes = [P, P, P, ctypes.c_int, I64, P, P, ctypes.c_float, ctypes.c_int, P]
    lib.emu_linear_ce_stats.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("case", ["plain", "bias_softcap", "weights_offset", "splits", "nan"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_ce_stats(lce_lib, case, dtype):
    """linear_ce_tile_stats' fused kernel (logit tiles on tensor cores, online log-sum-exp,
    splits merged in order) against float64 with each logit rounded to the dtype (as the tile
    path's GEMM writes it, which the backward forms again): N = 70 and V = 150 leave partial
    64 x 64 tiles, D = 40 a partial K step; targets in other shards and ignored rows give 0;
    'splits': V = 1100 over the emulator's 3 multiprocessors takes 2 splits of the vocabulary;
    'nan': a NaN hidden row gives NaN statistics, as torch's logsumexp."""
    g = torch.Generator().manual_seed(len(case) + (7 if dtype == torch.float16 else 0))
    n, d, v = 70, 40, 1100 if case == "splits" else 150
    offset = 300 if case == "weights_offset" else 0
    h = (torch.randn(n, d, generator=g)).to(dtype)
    if case == "nan":
        h[4, 7] = float("nan")
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g)).to(dtype) if case == "bias_softcap" else None
    cw = torch.rand(v, generator=g) + 0.5 if case == "weights_offset" else None
    softcap = 2.5 if case == "bias_softcap" else 0.0
    t = torch.randint(offset, offset + v, (n,), generator=g)
    t[3], t[5] = -100, offset + v + 7  # ignored, and a class of another shard
    hg, _ = guarded(h, float("nan"))
    wg, _ = guarded(w, float("nan"))
    bg = guarded(b, float("nan"))[0] if b is not None else None
    out, obuf = guarded(torch.full((n, 3), float("nan")), SENTINEL)
    err = lce_lib.emu_linear_ce_stats(hg.data_ptr(), wg.data_ptr(), None if bg is None else bg.data_ptr(),
                                      DTYPE_CODES[dtype], int64s(n, d, v, offset), t.data_ptr(),
                                      None if cw is None else cw.data_ptr(), softcap, 1, out.data_ptr())
    assert err is None, err.decode()
    check_guards(obuf, "stats")
    z = (h.double() @ w.double().T + (b.double() if b is not None else 0.0)).to(dtype).double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    local = t - offset
    mine = (local >= 0) & (local < v)
    zy = torch.where(mine, z.gather(1, local.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    wz = z @ (cw.double() if cw is not None else torch.ones(v, dtype=torch.float64))
    want = torch.stack([torch.logsumexp(z, 1), zy, wz], 1)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4 * float(want.nan_to_num().abs().max()),
                               equal_nan=True)


# ---- linear + cross-entropy, low-memory path: one kernel pass over each cuBLAS tile -------------


@pytest.fixture(scope="module")
def lce_tiles_lib():
    lib = build.build("linear_losses/linear_ce_tiles_cuda.cu", "linear_ce_tiles_harness.cpp", "linear_ce_tiles")
    P, I64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.emu_linear_ce_tile_stats.argtypes = [P, ctypes.c_int, I64, P, P, ctypes.c_float, ctypes.c_int,
                                             ctypes.c_int, P]
    lib.emu_linear_ce_tile_stats.restype = ctypes.c_char_p
    lib.emu_linear_ce_tile_grad.argtypes = [P, ctypes.c_int, I64, P, P, ctypes.c_float, P, P, ctypes.c_int]
    lib.emu_linear_ce_tile_grad.restype = ctypes.c_char_p
    return lib


def _lce_tile(case, dtype, seed):
    """A tile of raw logits [rows, n] (row stride ld) in dtype, its rows' targets (in the tile,
    in another tile, ignored) and its class weights; 'strided' rows are 5 elements apart more
    than their length, 'nonfinite' rows hold two +inf, all -inf, a NaN."""
    g = torch.Generator().manual_seed(seed + len(case) + DTYPE_CODES[dtype])
    rows, n, first = 37, 203, 50
    ld = n + 5 if case == "strided" else n
    z = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    if case == "nonfinite":  # (row 1 starts 12 bytes (float32) / 6 bytes (16-bit) past a 16-byte
        # boundary: columns 5 and 6 share one lane's 16-byte pack in every dtype, 90 is another's)
        z[1, 5] = z[1, 6] = z[1, 90] = float("inf")
        z[2] = float("-inf")
        z[3, 17] = float("nan")
    t = torch.randint(first, first + n, (rows,), generator=g)
    t[5], t[6], t[7] = -100, first - 3, first + n  # ignored, and classes of other tiles
    cw = torch.rand(n, generator=g) + 0.5 if case in ("weights_softcap", "strided") else None
    softcap = 4.0 if case == "weights_softcap" else 0.0
    store = torch.full((rows, ld), float("nan"), dtype=dtype)
    store[:, :n] = z
    return z, store, t, cw, softcap, (rows, n, ld, first)


def _capped(z64, softcap):
    return softcap * torch.tanh(z64 / softcap) if softcap else z64


@pytest.mark.parametrize("first", [True, False], ids=["first", "merged"])
@pytest.mark.parametrize("case", ["plain", "weights_softcap", "strided", "nonfinite", "no_sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_linear_ce_tile_stats(lce_tiles_lib, dtype, case, first):
    """linear_ce_tile_stats_cuda against float64 on the tile's values: the log-sum-exp of the
    capped logits written (first) or merged with an earlier tile's by logaddexp, the target's
    logit added when the target is in the tile (ignored rows and other tiles' targets add 0), the
    class-weighted sum added; misaligned rows (n = 203 of every dtype), a row stride beyond n,
    and non-finite rows as torch.logsumexp treats them (+inf twice: +inf; all -inf: -inf; NaN)."""
    z, store, t, cw, softcap, shape = _lce_tile(case, dtype, 0)
    rows, n, ld, first_class = shape
    g = torch.Generator().manual_seed(11)
    before = torch.randn(rows, 3, generator=g)
    zg, zbuf = guarded(store.reshape(-1), float("nan"))
    out, obuf = guarded(before.clone() if not first else torch.full((rows, 3), 0.0).index_fill(1, torch.tensor([0]), float("nan")), SENTINEL)
    start = out.clone()
    err = lce_tiles_lib.emu_linear_ce_tile_stats(zg.data_ptr(), DTYPE_CODES[dtype], int64s(*shape), t.data_ptr(),
                                                 None if cw is None else cw.data_ptr(), softcap, int(first),
                                                 int(case != "no_sum"), out.data_ptr())
    assert err is None, err.decode()
    check_guards(obuf, "stats")
    assert torch.equal(zbuf.view(-1)[GUARD:GUARD + rows * ld].view(rows, ld)[:, :n].double().nan_to_num(1.5),
                       z.double().nan_to_num(1.5)), "the statistics kernel wrote its input"
    zc = _capped(z.double(), softcap)
    lse = torch.logsumexp(zc, 1)
    if not first:
        lse = torch.logaddexp(start[:, 0].double(), lse)
    local = t - first_class
    mine = (local >= 0) & (local < n)
    zy = start[:, 1].double() + torch.where(mine, zc.gather(1, local.clamp(0, n - 1)[:, None])[:, 0], 0.0)
    wz = start[:, 2].double() + zc @ (cw.double() if cw is not None else torch.ones(n, dtype=torch.float64))
    if case == "no_sum":  # (weighted_sum off: column 2 left as it was)
        wz = start[:, 2].double()
    want = torch.stack([lse, zy, wz], 1)
    scale = float(want.nan_to_num(0.0, 0.0, 0.0).abs().max())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


@pytest.mark.parametrize("smoothing", [False, True], ids=["plain", "smoothing"])
@pytest.mark.parametrize("case", ["plain", "weights_softcap", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_linear_ce_tile_grad(lce_tiles_lib, dtype, case, smoothing):
    """linear_ce_tile_grad_cuda against float64: d loss / d z = (a p_k - hit [k = y] - smooth w_k)
    * d cap / d z with p_k = exp(capped z_k - lse), written over the tile in its dtype (one
    rounding); the gap between rows (a row stride beyond n) and the guards stay untouched."""
    z, store, t, cw, softcap, shape = _lce_tile(case, dtype, 1)
    rows, n, ld, first_class = shape
    g = torch.Generator().manual_seed(12)
    zc = _capped(z.double(), softcap)
    lse = (torch.logsumexp(zc, 1) + torch.rand(rows, generator=g, dtype=torch.float64)).float()
    coef = torch.stack([torch.rand(rows, generator=g) + 0.5, torch.rand(rows, generator=g),
                        torch.rand(rows, generator=g) * 0.1], 1)
    zg, zbuf = guarded(store.reshape(-1), SENTINEL)
    err = lce_tiles_lib.emu_linear_ce_tile_grad(zg.data_ptr(), DTYPE_CODES[dtype], int64s(*shape), t.data_ptr(),
                                                None if cw is None else cw.data_ptr(), softcap, lse.data_ptr(),
                                                coef.data_ptr(), int(smoothing))
    assert err is None, err.decode()
    check_guards(zbuf, "grad")
    got = zg.view(rows, ld)
    assert got[:, n:].isnan().all(), "the gradient kernel wrote between rows"
    local = t - first_class
    mine = (local >= 0) & (local < n)
    a, hit, smooth = (coef[:, i].double()[:, None] for i in range(3))
    want = a * torch.exp(zc - lse.double()[:, None])
    want -= torch.zeros_like(want).scatter_(1, local.clamp(0, n - 1)[:, None], hit * mine.double()[:, None])
    if smoothing:
        want -= smooth * (cw.double() if cw is not None else 1.0)
    if softcap:
        want *= 1 - torch.tanh(z.double() / softcap) ** 2
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got[:, :n].double(), want, rtol=tol, atol=tol * float(want.abs().max()))


# ---- the emulator's own checks (tests/cuda_emu/selftest_cuda.cu: kernels that break a rule) ------


SELFTEST = {"lane_race": 0, "split_sites": 1, "mma_vs_shuffle": 2, "full_mask": 3, "lanes_mask": 4,
            "mask_mismatch": 5, "half_warp": 6, "split_barrier": 7, "uninit_shared": 8, "bounded": 9, "ballot": 10}


@pytest.fixture(scope="module")
def selftest_lib():
    lib = build.build(str(build.HERE / "selftest_cuda.cu"), "selftest_harness.cpp", "selftest")
    lib.emu_selftest.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.emu_selftest.restype = ctypes.c_char_p
    lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
    return lib


def run_selftest(lib, name, blocks, threads, mode=0, flag=0, dtype=torch.int32):
    out = torch.full((blocks * threads,), -7, dtype=dtype)
    lib.emu_set_schedule(mode, 7)
    try:
        err = lib.emu_selftest(SELFTEST[name], blocks, threads, out.data_ptr(), flag)
    finally:
        lib.emu_set_schedule(0, 1)
    return (None if err is None else err.decode()), out


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["in-order", "reversed", "shuffled"])
@pytest.mark.parametrize("name,threads,message", [
    ("split_sites", 32, "lanes meet at different collectives"),     # full-mask shuffles of two call sites
    ("mma_vs_shuffle", 32, "lanes meet at different collectives"),  # mma.sync paired with a shuffle
    ("full_mask", 48, "names lanes that do not exist"),             # 0xffffffff in a 16-lane warp
    # lanes with different masks (lanes 16-31 first: they meet alone and 0-15 wait for them)
    ("mask_mismatch", 32, r"mask 0xffff0000|lane 1\d has finished"),
    ("split_barrier", 32, "divergent __syncthreads"),               # two different __syncthreads
    ("bounded", 128, r"exceeds the kernel's __launch_bounds__\(64\)"),
])
def test_emulator_reports_broken_rules(selftest_lib, name, threads, message, mode):
    err, _ = run_selftest(selftest_lib, name, 1, threads, mode)
    assert err is not None and re.search(message, err), err


def test_emulator_accepts_masks_of_the_lanes_there(selftest_lib):
    """A mask naming the lanes of a partial warp (a shuffle, a vote), and a half warp that
    shuffles alone."""
    for mode in (0, 1, 2):
        err, out = run_selftest(selftest_lib, "lanes_mask", 1, 48, mode)
        assert err is None, err
        assert torch.equal(out, torch.arange(48, dtype=torch.int32) ^ 1)
        err, out = run_selftest(selftest_lib, "half_warp", 1, 32, mode)
        assert err is None, err
        lane = torch.arange(32, dtype=torch.int32)
        assert torch.equal(out, torch.where(lane < 16, lane ^ 1, -lane))
        err, out = run_selftest(selftest_lib, "ballot", 1, 48, mode)
        assert err is None, err
        votes = [sum(1 << t % 32 for t in range(w, min(w + 32, 48)) if t % 3 == 0) for w in (0, 32)]
        assert out.tolist() == [votes[0]] * 32 + [votes[1]] * 16


def test_emulator_exposes_a_race_inside_a_warp(selftest_lib):
    """Lane 0 writes shared memory after a shuffle and every lane reads it: without a __syncwarp
    the result depends on the order of the lanes after the shuffle; with it, it does not."""
    results = [run_selftest(selftest_lib, "lane_race", 1, 32, mode)[1] for mode in (0, 1, 2)]
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])
    for mode in (0, 1, 2):
        err, out = run_selftest(selftest_lib, "lane_race", 1, 32, mode, flag=1)
        assert err is None and (out == 43).all(), (err, out)


def test_emulator_poisons_shared_memory(selftest_lib):
    """Shared memory read before the block writes it is NaN, in the second block too (the first
    wrote it at its end), not 0 or the previous block's values."""
    err, out = run_selftest(selftest_lib, "uninit_shared", 2, 64, dtype=torch.float32)
    assert err is None, err
    assert out.isnan().all(), out


# ---- other thread orders -------------------------------------------------------------------------


@pytest.mark.parametrize("mode,seed", [(1, 0), (2, 7), (2, 2026)], ids=["reversed", "shuffled-7", "shuffled-2026"])
def test_results_do_not_depend_on_the_thread_order(mode, seed, tcn_lib, quant_lib, kd_lib, sinkhorn_lib,
                                                   metric_lib, auc_lib, losses_lib, sim_lib, quant_mma_lib,
                                                   nb_lib, quant_gemv_mma_lib, lce_lib, quant_gemm_pipe_lib):
    """Cases of every family (those with barriers, shuffles, shared scratch reused across
    iterations) again with the threads of each phase run in reverse or shuffled order: a read of
    another thread's write with no barrier between them (a race on a GPU) changes the result
    under some order."""
    libs = (tcn_lib, quant_lib, kd_lib, sinkhorn_lib, metric_lib, auc_lib, losses_lib, sim_lib, quant_mma_lib,
            nb_lib, quant_gemv_mma_lib, lce_lib, quant_gemm_pipe_lib)
    for lib in libs:
        lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        lib.emu_set_schedule(mode, seed)
    try:
        for cl in (False, True):
            test_forward_and_weight_grad(tcn_lib, torch.float32, 4, 9, 13, cl)
        test_quant_gemv_and_dequant(quant_lib, 4, 32, "channel_codebook")
        test_kd_forward_and_backward(kd_lib, "jsd", torch.float32, (2, 4099, 3, 0))
        test_kd_forward_and_backward(kd_lib, "forward_kl", torch.bfloat16, (4, 1031, 0, 0))
        test_topk_kl(kd_lib, torch.float32, (3, 300), 5, False)
        test_topk_kl_sampled_threshold(kd_lib, torch.bfloat16, True)
        test_pld(kd_lib, torch.float32, (3, 1031), True)
        test_sinkhorn_solve_and_plan(sinkhorn_lib, torch.float64, (2, 5, 700), 0.1, 400, False)
        test_sns_solve(sinkhorn_lib, torch.float64, (2, 37, 53), 0.02, 200, 3, 6, False)
        test_dice_softmax(metric_lib, torch.float32, (4, 1000), (0.5, 0.3, 0.1))
        test_dice_sigmoid(metric_lib, torch.float32, (5, 70), (0.5, 0.3, 0.1))
        test_confusion_sums(metric_lib, torch.float32, (37, 5), True)
        test_auc(auc_lib, torch.float32, (1, 257, 513), True)
        test_row_losses(losses_lib, "ce_smooth_z_softcap", torch.float32, (3, 1031), True)
        test_ms_rows_cuda(sim_lib, (3, 300, 41), (2.0, 50.0, 0.5, 0.1))
        test_tcm_rows_cuda(sim_lib, (3, 300, 41), (0.3, -0.1))
        test_clip_rows_cuda(sim_lib, (70, 130, 50), True)
        test_quant_tensor_core_gemm(quant_mma_lib, 3, 32, "asymmetric")
        test_quant_tensor_core_gemv(quant_gemv_mma_lib, 4, 128, "asymmetric")
        test_quant_tensor_core_gemv_fractional_zeros(quant_gemv_mma_lib)
        test_quant_pipelined_gemm(quant_gemm_pipe_lib, 4, 128, "asymmetric")
        test_quant_pipelined_gemm_long_rows(quant_gemm_pipe_lib, 2, 64)
        test_icnn_score_kernel(nb_lib, "ties")
        test_knn_rows_kernel(nb_lib, "ties")
        test_linear_ce_stats(lce_lib, "splits", torch.float16)
        test_linear_ce_stats(lce_lib, "bias_softcap", torch.bfloat16)
    finally:
        for lib in libs:
            lib.emu_set_schedule(0, 1)


@pytest.mark.parametrize("cap", [1, 2])
def test_blocks_that_walk_several_rows(cap, kd_lib, sinkhorn_lib, metric_lib, auc_lib, losses_lib, nb_lib,
                                       lce_lib, lce_tiles_lib, quant_mma_lib):
    """The kernels whose grids stride over rows past 2^20 blocks (blocks_for) with grids of 1 or
    2 blocks, so that every block walks several rows and reuses its shared memory from one row to
    the next (no test reaches 2^20 rows otherwise)."""
    libs = (kd_lib, sinkhorn_lib, metric_lib, auc_lib, losses_lib, nb_lib, lce_lib, lce_tiles_lib, quant_mma_lib)
    for lib in libs:
        lib.emu_set_grid_cap.argtypes = [ctypes.c_longlong]
        lib.emu_set_grid_cap(cap)
    try:
        test_kd_forward_and_backward(kd_lib, "jsd", torch.float32, (5, 33, 3, 0))
        test_kd_forward_and_backward(kd_lib, "forward_kl", torch.bfloat16, (4, 1031, 0, 0))
        test_topk_kl(kd_lib, torch.float32, (3, 300), 5, False)
        test_topk_kl(kd_lib, torch.bfloat16, (4, 1031), 100, True)
        test_topk_kl_sampled_threshold(kd_lib, torch.float32, False)
        test_pld(kd_lib, torch.float32, (5, 33), True)
        test_sinkhorn_solve_and_plan(sinkhorn_lib, torch.float64, (2, 5, 700), 0.1, 400, False)
        test_dice_softmax(metric_lib, torch.float32, (4, 1000), (0.5, 0.3, 0.1))
        test_dice_sigmoid(metric_lib, torch.float32, (5, 70), (0.5, 0.3, 0.1))
        test_confusion_sums(metric_lib, torch.float32, (37, 5), True)
        test_auc(auc_lib, torch.float32, (3, 5, 300), True)
        test_row_losses(losses_lib, "ce_smooth_z_softcap", torch.float32, (9, 1000), True)
        test_row_losses_forward_backward_in_one_pass(losses_lib, "ce_smooth_z_softcap", torch.bfloat16, (7, 2050), "part")
        test_scale_rows_unless_one(losses_lib, torch.bfloat16)
        test_icnn_score_kernel(nb_lib, "ties")
        test_knn_rows_kernel(nb_lib, "ties")
        test_quant_tensor_core_gemm(quant_mma_lib, 4, 128, "symmetric")
        for case in ("plain", "splits"):
            test_linear_ce_stats(lce_lib, case, torch.float16)
        test_linear_ce_tile_stats(lce_tiles_lib, torch.bfloat16, "strided", False)
        test_linear_ce_tile_grad(lce_tiles_lib, torch.float16, "weights_softcap", True)
    finally:
        for lib in libs:
            lib.emu_set_grid_cap(0)
