"""Low-bit dequant GEMM: for every format (2/3/4/8 bits; group, per-channel, per-tensor;
symmetric, asymmetric, codebook per tensor and per channel), dequant_gemm(x, quantize_weight(w))
equals x @ W^T with W unpacked by the independent float64 reference; dequantize_weight equals
that reference; rounding is to the nearest level; every CPU path, activation dtype, batch (both
kernel paths) and awkward shape; gradients; opcheck; compile; imported integer weights;
QuantLinear on a small model; bad input."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import ops
from fastloss.reference import quant as ref
from checks import assert_compiled_matches, expect_errors
from conftest import requires_cuda

GROUPS = (32, 64, 128, 256, -1, 0)
KINDS = ("symmetric", "asymmetric", "codebook", "channel_codebook")
FORMATS = [(bits, gs, kind) for bits in (2, 3, 4, 8) for gs in GROUPS for kind in KINDS]


def k_for(group_size, bits):
    # per channel / per tensor: K not a multiple of 16, so planes end in narrow and scalar tails
    return {32: 288, 64: 192, 128: 384, 256: 512}.get(group_size, 266 if bits in (4, 8) else 264)


def codebook_for(kind, bits, n, g):
    if kind == "codebook":   # the library's grids
        return ops.nf_codebook(bits) if bits < 8 else ops.power_codebook(bits, 1.7)
    if kind == "channel_codebook":   # learned values: random, unsorted, one codebook per row
        return torch.randn(n, 1 << bits, generator=g)
    return None


@pytest.mark.parametrize("bits,group_size,kind", FORMATS, ids=lambda v: str(v))
def test_format_and_gemm(bits, group_size, kind, quant_cpu_isa):
    g = torch.Generator().manual_seed(bits * 1000 + group_size * 4 + KINDS.index(kind))
    k, n = k_for(group_size, bits), 37
    w = torch.randn(n, k, generator=g) * 0.1
    codebook = codebook_for(kind, bits, n, g)
    qw = ops.quantize_weight(w, bits, group_size, kind != "asymmetric", codebook)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    torch.testing.assert_close(ops.dequantize_weight(qw).double(), w64, rtol=0, atol=1e-7)
    step = qw.scales.double().repeat_interleave(qw.group, 1)
    if codebook is None:
        assert ((w64 - w.double()).abs() <= 0.5 * step + 1e-6).all(), "round to nearest"
    else:   # the chosen entry is the nearest one of the row's codebook
        cb = qw.codebook.double().expand(n, -1)
        t = w.double() / step
        best = (t.unsqueeze(-1) - cb.unsqueeze(1)).abs().amin(-1)
        assert ((w64 / step - t).abs() <= best + 1e-5).all(), "nearest codebook entry"
    for m in (1, 2, 5, 16, 17, 40):   # register path, buffer path, tile + GEMM path
        x = torch.randn(m, k, generator=g)
        torch.testing.assert_close(ops.dequant_gemm(x, qw).double(), x.double() @ w64.T,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size", (32, -1, 0))
def test_asymmetric_groups_of_one_sign(bits, group_size):
    """Asymmetric groups that do not hold 0 (all positive, all negative, constant) round to the
    nearest code of the range widened to 0, never worse than the symmetric format (the zero
    point had been clamped into the codes, moving a whole group: 0.7 -> 1.0)."""
    g = torch.Generator().manual_seed(bits * 10 + group_size)
    k = 256
    w = torch.rand(6, k, generator=g) * 0.1
    w[0] += 0.5
    w[1] -= 0.9
    w[2] = 0.7
    w[3] = -0.3
    w[4] = w[4] * 3 - 2.0
    for_tensor = group_size == 0
    if for_tensor:
        w = w[:2].abs() + 0.25  # (per tensor: one range for every row; make it one sign)
    errors = {}
    for symmetric in (True, False):
        qw = ops.quantize_weight(w, bits, group_size, symmetric)
        w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
        step = qw.scales.double().repeat_interleave(qw.group, 1)
        assert ((w64 - w.double()).abs() <= 0.5 * step + 1e-6).all(), f"symmetric={symmetric}"
        if not symmetric:
            assert ((qw.zeros >= 0) & (qw.zeros <= (1 << bits) - 1)).all()
        errors[symmetric] = (w64 - w.double()).abs().amax(1)
    assert (errors[False] <= errors[True] + 1e-6).all(), errors


@pytest.mark.parametrize("isa", [i for i in ("generic", "avx2", "avx512") if i in fastloss.cpu_isas()])
@pytest.mark.parametrize("n", [195, 198, 201], ids=lambda n: f"n{n}")
def test_gemv_rows_same_on_any_thread_split(isa, n):
    # From 3 batch rows the GEMV takes four weight rows at a time (chunks of up to 512 inputs,
    # the sums carried across them) and a block's last 1-3 rows with the same sums: a row's
    # result must not depend on which thread takes its block (1 thread vs 3; blocks of 64 rows,
    # the last of 3, 6 or 9); an infinite x never gives a finite row.
    g = torch.Generator().manual_seed(n)
    cases = [(1280, dict(bits=4, group_size=64, symmetric=False)),      # chunks of 8, 8 and 4 groups
             (1280, dict(bits=4, group_size=128, codebook=ops.nf_codebook(4))),
             (1282, dict(bits=4, group_size=-1, symmetric=True))]       # 2 inputs past the last vector
    previous = torch.get_num_threads()
    fastloss.set_cpu_isa(isa)
    try:
        for k, fmt in cases:
            qw = ops.quantize_weight(torch.randn(n, k, generator=g), **fmt)
            x = torch.randn(5, k, generator=g)
            x_inf = x.clone()
            x_inf[1, 7] = float("inf")
            ys = []
            for threads in (1, 3):
                torch.set_num_threads(threads)
                ys.append(ops.dequant_gemm(x, qw))
                assert not ops.dequant_gemm(x_inf, qw)[1].isfinite().any()
            assert torch.equal(ys[0], ys[1])
            w64 = ops.dequantize_weight(qw).double()
            err = (ys[0].double() - x.double() @ w64.T).abs()
            assert (err <= 1e-5 * (x.double().abs() @ w64.abs().T)).all(), (k, fmt)  # float32 sums
    finally:
        fastloss.set_cpu_isa("auto")
        torch.set_num_threads(previous)


requires_amx = pytest.mark.skipif("amx" not in fastloss.cpu_isas(),
                                  reason="no AMX-BF16 on this CPU (or not allowed by the OS)")


@requires_amx
@pytest.mark.parametrize("bits,group_size,symmetric", [(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1, 0)
                                                       for s in (True, False)], ids=lambda v: str(v))
def test_amx_tile_products_are_float32_exact(bits, group_size, symmetric):
    # The AMX path multiplies bfloat16 terms of x (x = hi + mid + lo) with the exact integer
    # weight values: its error must be a float32 GEMM's, over inputs spread across 2^-40..2^40.
    # Shapes: batch tails of one / two 16-row tiles (8 and 16 rows take the AMX-INT8 GEMV where
    # it applies), weight rows past one 128-row block and not a multiple of 16, groups up to K
    # (one chunk: K = 640).
    g = torch.Generator().manual_seed(bits * 100 + group_size + symmetric)
    k, n = 640, 150
    w = torch.randn(n, k, generator=g) * 0.1
    qw = ops.quantize_weight(w, bits, group_size, symmetric)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    bias = torch.randn(n, generator=g)
    terms = summed_terms(qw, bits)
    try:
        for m in (8, 16, 17, 33, 40):
            x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-40, 40, (m, k), generator=g).float())
            want = x.double() @ w64.T + bias.double()
            bound = 4e-6 * (x.double().abs() @ terms.T + bias.double().abs())
            for isa in ("amx", "avx512"):   # the AVX-512 kernels meet the same bound
                fastloss.set_cpu_isa(isa)
                err = (ops.dequant_gemm(x, qw, bias).double() - want).abs()
                assert (err <= bound).all(), (isa, m, (err / bound).max())
    finally:
        fastloss.set_cpu_isa("auto")


def summed_terms(qw, bits):
    """|s v| + |s z| per weight: the magnitudes the kernels add up (s (sum v x - z sum x))."""
    v_s = ref.unpack_weight(qw.qweight, qw.scales, None, bits, qw.group, qw.codebook).abs()
    return v_s + (0 if qw.zeros is None else
                  (qw.zeros * qw.scales).double().abs().repeat_interleave(qw.group, 1))


@requires_amx
@pytest.mark.parametrize("k,n,group_size,bits,zeros", [
    (2560, 300, 128, 4, True),    # chunks of 1024, 1024, 512 inputs, blocks of 128 rows (the last 44)
    (2880, 256, 96, 3, True),     # groups that do not divide the longest chunk: chunks of 960
    (960, 130, 160, 2, True),
    (2048, 150, 256, 2, True),    # 2- / 4-bit groups of whole 32-byte pieces: codes straight to tiles
    (2560, 140, 128, 2, True),    # the same at 32-byte groups, over three chunks
    (1024, 129, -1, 8, True),     # per channel: one group, one chunk
    (1536, 200, 128, 4, False),   # imported weights without zero points
], ids=str)
def test_amx_chunks_blocks_and_batch_tiles(k, n, group_size, bits, zeros):
    # indexing across chunks, row blocks and batch tiles (one, two, a pair and a single): any
    # misplaced tile is an O(1) error against this bound
    g = torch.Generator().manual_seed(k + n + bits)
    if zeros:
        qw = ops.quantize_weight(torch.randn(n, k, generator=g), bits, group_size, False)
    else:
        group = k if group_size == -1 else group_size
        q = torch.randint(0, 1 << bits, (n, k), generator=g)
        qw = ops.QuantizedWeight.from_int(q, torch.rand(n, k // group, generator=g) + 0.1, None,
                                          bits, group_size)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    terms = summed_terms(qw, bits)
    fastloss.set_cpu_isa("amx")
    try:
        for m in (8, 24, 45):  # (8: the AMX-INT8 GEMV where it applies; 45: a last tile of 13 rows)
            x = torch.randn(m, k, generator=g)
            err = (ops.dequant_gemm(x, qw).double() - x.double() @ w64.T).abs()
            assert (err <= 1e-5 * (x.double().abs() @ terms.T)).all(), m
    finally:
        fastloss.set_cpu_isa("auto")


@requires_amx
def test_amx_accumulator_spans():
    # a thread's float32 sums are bounded (4 MiB: at 2050 batch rows, 3 blocks of 128 rows), so
    # its rows go a span at a time: 900 rows are spans of 384, 384 and 132 on one thread, of
    # 384 + 128 and 384 + 4 on two
    g = torch.Generator().manual_seed(7)
    qw = ops.quantize_weight(torch.randn(900, 256, generator=g), 4, 64, False)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 4, qw.group, qw.codebook)
    bias = torch.randn(900, generator=g)
    x = torch.randn(2050, 256, generator=g)
    previous = torch.get_num_threads()
    fastloss.set_cpu_isa("amx")
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            err = (ops.dequant_gemm(x, qw, bias).double() - x.double() @ w64.T - bias.double()).abs()
            assert (err <= 1e-5 * (x.double().abs() @ summed_terms(qw, 4).T + bias.double().abs())).all(), threads
    finally:
        fastloss.set_cpu_isa("auto")
        torch.set_num_threads(previous)


@requires_amx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_amx_16bit_activations_take_fewer_terms_exactly(dtype):
    # from 17 rows (AMX-BF16) a bfloat16 x is one bfloat16 term, a float16 x two: the float32
    # result, rounded once to x's dtype (one term for float16 would be off by up to 2^-8 of each
    # product); up to 16 (AMX-INT8, where the CPU has it) 16-bit x goes to fixed point like
    # float32 x
    g = torch.Generator().manual_seed(7)
    k, n = 1024, 200
    qw = ops.quantize_weight(torch.randn(n, k, generator=g), 4, 128, True)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 4, qw.group, qw.codebook)
    terms = summed_terms(qw, 4)
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    fastloss.set_cpu_isa("amx")
    try:
        for m in (1, 3, 12, 17, 40):
            x = torch.randn(m, k, generator=g).to(dtype)
            y = ops.dequant_gemm(x, qw)
            assert y.dtype == dtype
            want = x.double() @ w64.T
            err = (y.double() - want).abs()
            assert (err <= ulp * want.abs() + 1e-6 * (x.double().abs() @ terms.T)).all(), m
    finally:
        fastloss.set_cpu_isa("auto")


@requires_amx
def test_amx_non_finite_inputs():
    # an infinite x stays in its hi term (mid = lo = 0), a NaN becomes the quiet NaN: without
    # zero points the rows are what the float32 matmul gives (+-inf, NaN); with them, as on the
    # batch 1-2 GEMV, s z sum(x) turns infinities into NaN, but no such row comes out finite
    k, n, m = 256, 20, 40
    x = torch.randn(m, k)
    x[1, 5], x[2, 7], x[3, 0], x[30, 9] = float("inf"), float("-inf"), float("nan"), float("inf")
    x[4, 3] = torch.tensor(0x7f800001, dtype=torch.int32).view(torch.float32)  # NaN, payload in the low bits
    bad = [1, 2, 3, 4, 30]
    finite = [i for i in range(m) if i not in bad]
    q = torch.randint(1, 16, (n, k))   # no zero codes: inf * 0 would be NaN
    plain = ops.QuantizedWeight.from_int(q, torch.rand(n, 2) + 0.1, None, 4, 128)
    zeroed = ops.quantize_weight(torch.randn(n, k), 4, 128, True)
    fastloss.set_cpu_isa("amx")
    try:
        y_plain, y_zeroed = ops.dequant_gemm(x, plain), ops.dequant_gemm(x, zeroed)
    finally:
        fastloss.set_cpu_isa("auto")
    want = x @ ops.dequantize_weight(plain).T
    torch.testing.assert_close(y_plain, want, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert not y_zeroed[bad].isfinite().any()
    torch.testing.assert_close(y_zeroed[finite], x[finite] @ ops.dequantize_weight(zeroed).T,
                               rtol=1e-4, atol=1e-4)


requires_amx_int8 = pytest.mark.skipif("amx" not in fastloss.cpu_isas() or not fastloss._C.cpu_supports_amx_int8(),
                                       reason="no AMX-INT8 on this CPU (or not allowed by the OS)")


@requires_amx_int8
def test_amx_gemv_applies_where_documented():
    # S groups side by side in 16, 32 or 64 tile columns (4 digits x M batch rows each); whole
    # 64-byte chunks per S groups; 16 inputs of a group per x vector; uniform 2/3/4/8 bits
    slots = fastloss._C._quant_amx_gemv_slots
    fastloss.set_cpu_isa("amx")
    try:
        assert [slots(4, 4096, 128, m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [4, 2, 1, 1, 1, 1, 1, 1, 0]
        assert slots(8, 4096, 128, 1) == 4 and slots(2, 4096, 128, 1) == 4 and slots(2, 4096, 128, 2) == 2
        # 32-byte groups: two per slab (half a chunk each): two column tiles from 3 rows, four
        # from 5; from 9 (and for 16-byte groups from 5) input chunks of 64 inputs, any S, where
        # groups hold 64 or more
        assert [slots(2, 4096, 128, m) for m in (2, 3, 5, 8, 9, 16)] == [2, 2, 2, 2, 1, 1]
        assert [slots(4, 4096, 64, m) for m in (1, 5, 9, 16)] == [4, 2, 1, 1]
        assert [slots(2, 4096, 64, m) for m in (1, 4, 5, 16)] == [4, 4, 1, 1]
        assert slots(4, 576, 64, 1) == 3 and slots(2, 1088, 64, 1) == 1   # 9 and 17 groups
        assert slots(4, 4096, 32, 4) == 4 and slots(4, 4096, 32, 5) == 0   # 16-byte groups of 32
        assert slots(4, 1024, 1024, 1) == 1            # per channel / per tensor: one group
        # 3-bit: chunks of 64 inputs (any S), groups of 64, 128, 256 or a multiple of 512 (the
        # section sizes the code assembly reads)
        assert [slots(3, 4096, 128, m) for m in (1, 2, 4, 5, 16)] == [4, 2, 1, 1, 1]
        assert slots(3, 4096, 64, 1) == 4 and slots(3, 4096, 4096, 16) == 1 and slots(3, 640, 128, 1) == 1
        assert slots(3, 960, 96, 1) == 0 and slots(3, 1536, 384, 1) == 0 and slots(3, 768, 192, 1) == 0
        assert slots(3, 768, 768, 1) == 0 and slots(3, 1536, 512, 1) == 3   # (per channel at K = 768; 3 groups of 512)
        # x's tiles within 2 MiB (L2): K / 64 KiB per column tile
        assert slots(4, 28672, 128, 16) == 1 and slots(4, 65536, 128, 8) == 1 and slots(4, 65536, 128, 16) == 0
        assert slots(4, 4096, 128, 1, True) == 0       # codebooks: not integers
        assert slots(2, 4096, 32, 1) == 0              # 8-byte groups
        assert slots(4, 608, 32, 1) == 0               # 304-byte rows
        assert slots(4, 0, 128, 1) == 0                # K = 0: no groups
        assert slots(8, 65536, 65536, 1) == 1 and slots(8, 131072, 131072, 1) == 0  # int32 sums
        assert slots(4, 640, 128, 1) == 1              # 5 groups: one at a time
        fastloss.set_cpu_isa("avx512")
        assert slots(4, 4096, 128, 1) == 0
    finally:
        fastloss.set_cpu_isa("auto")


@requires_amx_int8
@pytest.mark.parametrize("bits,group_size,symmetric",
                         [(b, g, s) for b in (2, 4, 8) for g in (64, 128, 256, -1, 0) for s in (True, False)] +
                         [(3, g, s) for g in (64, 128, 256, -1, 0) for s in (True, False)], ids=lambda v: str(v))
def test_amx_gemv_meets_the_float32_bound(bits, group_size, symmetric):
    # The AMX-INT8 GEMV rounds x to fixed point per group (30 bits below its largest |x|) and
    # sums exact integers: over inputs spread across 2^-40..2^40 its error must stay within a
    # float32 GEMM's bound. Batches 1-4 (S = 4, 2, 1, 1 groups per tile), 5-8 (two column tiles)
    # and 9-16 (four, 16-row blocks); weight rows past one 32-row block, the last block's second
    # row tile partly past N (150 = 4 x 32 + 22). 3-bit: each code's bits from both sections of
    # groups of 64, 128, 256 and 1024 (per channel, per tensor).
    g = torch.Generator().manual_seed(bits * 100 + group_size + symmetric)
    k, n = 1024, 150
    qw = ops.quantize_weight(torch.randn(n, k, generator=g) * 0.1, bits, group_size, symmetric)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    bias = torch.randn(n, generator=g)
    terms = summed_terms(qw, bits)
    fastloss.set_cpu_isa("amx")
    try:
        for m in (1, 2, 3, 4, 5, 8, 11, 16):
            assert fastloss._C._quant_amx_gemv_slots(bits, k, qw.group, m) > 0
            x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-40, 40, (m, k), generator=g).float())
            want = x.double() @ w64.T + bias.double()
            err = (ops.dequant_gemm(x, qw, bias).double() - want).abs()
            assert (err <= 4e-6 * (x.double().abs() @ terms.T + bias.double().abs())).all(), (m, err.max())
    finally:
        fastloss.set_cpu_isa("auto")


@requires_amx_int8
@pytest.mark.parametrize("n", [10, 20, 1000], ids=str)
@pytest.mark.parametrize("m", [1, 6, 13], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads{t}")
def test_amx_gemv_blocks_and_threads(n, m, threads):
    # one row tile, two partial ones, and blocks split between threads (n0 a multiple of 32);
    # ordinary inputs: the error of a float32 GEMV
    g = torch.Generator().manual_seed(n + m + threads)
    k = 2048
    qw = ops.quantize_weight(torch.randn(n, k, generator=g), 4, 128, False)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 4, qw.group, qw.codebook)
    x = torch.randn(m, k, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    fastloss.set_cpu_isa("amx")
    try:
        y = ops.dequant_gemm(x, qw)
    finally:
        fastloss.set_cpu_isa("auto")
        torch.set_num_threads(previous)
    err = (y.double() - x.double() @ w64.T).abs()
    assert (err <= 1e-5 * (x.double().abs() @ summed_terms(qw, 4).T)).all()


@requires_amx_int8
@pytest.mark.parametrize("bits,k,group_size,zeros", [
    (3, 1536, 64, True),     # third bits 8 bytes a group
    (3, 2560, 512, False),   # sections of 128 and 64 bytes, 5 groups: one per slab; random codes, no zero points
    (3, 8192, 128, False),   # rows of 3 KiB: the prefetch within the row
    (3, 2048, 256, False),   # 2 slabs at one row (the odd-parity accumulators)
    (2, 1536, 64, True),     # 16-byte groups: input chunks from 5 rows
    (2, 4096, 128, False),   # 32-byte groups: input chunks from 9 rows
    (4, 2048, 64, True),     # 32-byte 4-bit groups: input chunks from 9 rows
    (4, 576, 64, False),     # 9 groups: no even S, input chunks at one row (S = 3: odd slabs)
    (2, 1088, 64, False),    # 17 groups: input chunks at every batch, rows of 272 bytes
], ids=str)
def test_amx_gemv_input_chunks_and_threads(bits, k, group_size, zeros):
    # codes of 64 consecutive inputs assembled from their group's bytes (3-bit: from both
    # sections), one, two and four column tiles, blocks of rows split between threads (the last
    # partial): a misplaced bit or lane is an O(1) error against the float32 bound
    g = torch.Generator().manual_seed(k + group_size + bits)
    n = 200
    if zeros:
        qw = ops.quantize_weight(torch.randn(n, k, generator=g), bits, group_size, False)
    else:
        q = torch.randint(0, 1 << bits, (n, k), generator=g)
        qw = ops.QuantizedWeight.from_int(q, torch.rand(n, k // group_size, generator=g) + 0.1, None, bits, group_size)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    terms = summed_terms(qw, bits)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    fastloss.set_cpu_isa("amx")
    try:
        for m in (1, 3, 7, 9, 16):
            assert fastloss._C._quant_amx_gemv_slots(bits, k, group_size, m) > 0
            x = torch.randn(m, k, generator=g)
            err = (ops.dequant_gemm(x, qw).double() - x.double() @ w64.T).abs()
            assert (err <= 1e-5 * (x.double().abs() @ terms.T)).all(), m
    finally:
        fastloss.set_cpu_isa("auto")
        torch.set_num_threads(previous)


@requires_amx_int8
@pytest.mark.parametrize("m,bits", [(1, 4), (6, 4), (12, 4), (1, 3), (4, 3)], ids=lambda v: str(v))
def test_amx_gemv_rounds_x_in_fixed_point_per_group(m, bits):
    # The documented error model, and a witness that the AMX-INT8 path ran: an input below
    # 2^-31 of its group's largest |x| rounds to zero. One group's largest x meets a zero code
    # and the rest are 2^-40: the exact result 127 * 2^-40 comes out as 0 (the AVX-512 GEMV,
    # float32 FMAs, gives it); the other rows of x are ordinary and match on both paths.
    k, n = 512, 3   # (3-bit at group 128: slabs of 4 groups)
    q = torch.ones(n, k, dtype=torch.long)
    q[:, 0] = 0
    plain = ops.QuantizedWeight.from_int(q, torch.ones(n, k // 128), None, bits, 128)
    x = torch.randn(m, k)
    x[0, :128] = 2.0 ** -40
    x[0, 0] = 1.0
    x[0, 128:] = 0.0
    want = x.double() @ ops.dequantize_weight(plain).double().T
    fastloss.set_cpu_isa("amx")
    try:
        y_amx = ops.dequant_gemm(x, plain)
        fastloss.set_cpu_isa("avx512")
        y_fma = ops.dequant_gemm(x, plain)
    finally:
        fastloss.set_cpu_isa("auto")
    assert (y_amx[0] == 0).all() and torch.allclose(y_fma[0].double(), want[0], rtol=1e-6)
    torch.testing.assert_close(y_amx[1:].double(), want[1:], rtol=1e-5, atol=1e-5)


@requires_amx_int8
@pytest.mark.parametrize("scale", [2.0 ** -100, 2.0 ** 110], ids=["tiny", "huge"])
def test_amx_gemv_extreme_inputs_take_the_float_gemv(scale):
    # groups whose largest |x| leaves [2^-91, 2^100): the column factors 2^(E - 30 + 8 d) would
    # leave float32's normal range, so the AVX-512 GEMV runs (float32 FMAs: relative accuracy)
    g = torch.Generator().manual_seed(5)
    k, n = 512, 64
    qw = ops.quantize_weight(torch.randn(n, k, generator=g) * 1e-3, 4, 128, False)
    x = torch.randn(2, k, generator=g) * scale
    want = x.double() @ ops.dequantize_weight(qw).double().T
    fastloss.set_cpu_isa("amx")
    try:
        y = ops.dequant_gemm(x, qw)
    finally:
        fastloss.set_cpu_isa("auto")
    assert y.isfinite().all()
    assert ((y.double() - want).abs() <= 1e-5 * (x.double().abs() @ summed_terms(qw, 4).T)).all()


@requires_amx_int8
def test_amx_gemv_non_finite_inputs_take_the_float_gemv():
    # fixed point has no infinity or NaN: such an x takes the AVX-512 GEMV (or from 8 rows the
    # AMX-BF16 GEMM), whose rows are the float32 matmul's (+-inf, NaN); a finite batch row
    # beside them is unaffected
    k, n = 256, 40
    q = torch.randint(1, 16, (n, k))   # no zero codes: inf * 0 would be NaN
    plain = ops.QuantizedWeight.from_int(q, torch.rand(n, 2) + 0.1, None, 4, 128)
    for m in (2, 12):
        x = torch.randn(m, k)
        x[0, 5] = float("inf")
        fastloss.set_cpu_isa("amx")
        try:
            y = ops.dequant_gemm(x, plain)
            y_nan = ops.dequant_gemm(torch.full((1, k), float("nan")), plain)
        finally:
            fastloss.set_cpu_isa("auto")
        want = x @ ops.dequantize_weight(plain).T
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        assert y[0].isposinf().all() and y_nan.isnan().all()


CUDA_FORMATS = [(bits, gs, kind) for bits in (2, 3, 4, 8) for gs in (32, 128, -1) for kind in KINDS]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("bits,group_size,kind", CUDA_FORMATS, ids=lambda v: str(v))
def test_cuda_format_and_gemm(bits, group_size, kind):
    """The CUDA kernels against the float64 reference: the GEMVs (batch <= 16: on tensor cores
    for uniform 2 / 4 / 8-bit weights and 16-bit x at m = 1, 5, 12 where the plane length is a
    multiple of 16; else warp per row with 32-bit loads, and byte loads where the plane length
    is not a multiple of 4 (K = 264 at 2 bits: P = 66)), the tensor-core GEMMs above it (half
    activations), the dequantize + cuBLAS path for the rest, gradients."""
    g = torch.Generator().manual_seed(bits * 1000 + group_size * 4 + KINDS.index(kind))
    k, n = k_for(group_size, bits), 37
    w = torch.randn(n, k, generator=g) * 0.1
    qw = ops.quantize_weight(w, bits, group_size, kind != "asymmetric", codebook_for(kind, bits, n, g))
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    qc = qw.to("cuda")
    torch.testing.assert_close(ops.dequantize_weight(qc).cpu().double(), w64, rtol=0, atol=1e-7)
    for m in (1, 3, 16, 17, 40):
        x = torch.randn(m, k, generator=g)
        b = torch.randn(n, generator=g)
        y = ops.dequant_gemm(x.cuda(), qc, b.cuda())
        torch.testing.assert_close(y.cpu().double(), x.double() @ w64.T + b.double(), rtol=1e-5, atol=1e-4)
    # m = 1, 5, 12: the GEMVs (one or two fragments of 8 batch rows on tensor cores; at 12 the
    # formats without the tensor-core GEMV take the tensor-core GEMM where it applies: more
    # than kQuantWarpGemvMaxRows = 8 rows); 40 and 130: the pipelined tensor-core GEMM for the
    # tensor-core GEMV's formats (weights unrounded); for the other formats at 40 the
    # shared-memory one where the plane length allows it (weights rounded to x's dtype), else
    # (and at 130: from kQuantCublasMinRowsSmem = 64 rows) dequantize + cuBLAS
    for (dtype, tol), m in itertools.product(((torch.float16, 3e-3), (torch.bfloat16, 2e-2)), (1, 5, 12, 40, 130)):
        x = torch.randn(m, k, generator=g).to(dtype).cuda().requires_grad_(True)
        y = ops.dequant_gemm(x, qc)
        assert y.dtype == dtype and y.is_cuda
        up = torch.randn(y.shape, generator=g).to(dtype)
        y.backward(up.cuda())
        y64 = x.detach().cpu().double() @ w64.T
        torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=tol, atol=tol * y64.abs().max().item())
        gx = up.double() @ w64
        torch.testing.assert_close(x.grad.cpu().double(), gx, rtol=tol, atol=tol * gx.abs().max().item())
    expect_errors([(lambda: ops.dequant_gemm(torch.randn(2, k), qc), "x is on cpu but qweight is on cuda")])


@pytest.mark.cuda
@requires_cuda
def test_cuda_warp_gemv_forced(monkeypatch):
    """FASTLOSS_QUANT_GEMV=warp (bench_quant.py's comparison) runs the warp-per-row GEMV where
    the tensor-core one applies; both give x @ W^T."""
    g = torch.Generator().manual_seed(12)
    n, k = 300, 1024
    qw = ops.quantize_weight(torch.randn(n, k, generator=g) * 0.1, 4, 128, False)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 4, qw.group, qw.codebook)
    qc = qw.to("cuda")
    for m in (1, 5, 16):
        x = torch.randn(m, k, generator=g).half()
        y64 = x.double() @ w64.T
        tensor_core = ops.dequant_gemm(x.cuda(), qc).cpu().double()
        monkeypatch.setenv("FASTLOSS_QUANT_GEMV", "warp")
        warp = ops.dequant_gemm(x.cuda(), qc).cpu().double()
        monkeypatch.delenv("FASTLOSS_QUANT_GEMV")
        for y in (tensor_core, warp):
            torch.testing.assert_close(y, y64, rtol=3e-3, atol=3e-3 * y64.abs().max().item())


@pytest.mark.cuda
@requires_cuda
def test_cuda_smem_gemm_forced(monkeypatch):
    """FASTLOSS_QUANT_GEMM=smem (bench_quant.py's comparison) runs the shared-memory tensor-core
    GEMM where the pipelined one applies; both give x @ W^T (the shared-memory one with the
    weights rounded to x's dtype), at batches of one partial, two and five blocks of 64 rows."""
    g = torch.Generator().manual_seed(13)
    n, k = 300, 1024
    qw = ops.quantize_weight(torch.randn(n, k, generator=g) * 0.1, 4, 128, False)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 4, qw.group, qw.codebook)
    qc = qw.to("cuda")
    for m, dtype, tol in ((17, torch.float16, 3e-3), (128, torch.bfloat16, 2e-2), (300, torch.float16, 3e-3)):
        x = torch.randn(m, k, generator=g).to(dtype)
        y64 = x.double() @ w64.T
        pipelined = ops.dequant_gemm(x.cuda(), qc).cpu().double()
        monkeypatch.setenv("FASTLOSS_QUANT_GEMM", "smem")
        smem = ops.dequant_gemm(x.cuda(), qc).cpu().double()
        monkeypatch.delenv("FASTLOSS_QUANT_GEMM")
        for y in (pipelined, smem):
            torch.testing.assert_close(y, y64, rtol=tol, atol=tol * y64.abs().max().item())


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("tile_rows", (None, "64"))
def test_cuda_large_batches_and_backward_in_16_bit_tiles(monkeypatch, tile_rows):
    """From 512 rows (and in the backward of 16-bit gradients) the weight goes to cuBLAS in 16-bit
    tiles: one tile, or (FASTLOSS_QUANT_TILE16_ROWS=64) five of 64 output features and a short
    one; forward with bias and backward against float64, every kind of weight."""
    if tile_rows:
        monkeypatch.setenv("FASTLOSS_QUANT_TILE16_ROWS", tile_rows)
    g = torch.Generator().manual_seed(14)
    n, k = 300, 512
    for bits, kind in ((4, "asymmetric"), (3, "symmetric"), (4, "codebook"), (8, "symmetric")):
        w = torch.randn(n, k, generator=g) * 0.1
        qw = ops.quantize_weight(w, bits, 128, kind != "asymmetric", codebook_for(kind, bits, n, g))
        w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
        qc = qw.to("cuda")
        for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
            x = torch.randn(600, k, generator=g).to(dtype).cuda().requires_grad_(True)
            b = torch.randn(n, generator=g)
            y = ops.dequant_gemm(x, qc, b.cuda())
            assert y.dtype == dtype
            up = torch.randn(y.shape, generator=g).to(dtype)
            y.backward(up.cuda())
            y64 = x.detach().cpu().double() @ w64.T + b.double()
            torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=tol, atol=tol * y64.abs().max().item())
            gx = up.double() @ w64
            torch.testing.assert_close(x.grad.cpu().double(), gx, rtol=tol, atol=tol * gx.abs().max().item())


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_cuda_gemv_with_fractional_zeros(bits):
    """Imported weights whose zero points are not integers (or lie past what the tensor-core
    GEMV's and the pipelined GEMM's 16-bit constants hold) give x @ W^T at batch 1, 11 and 40
    with 16-bit x."""
    g = torch.Generator().manual_seed(bits + 50)
    n, k, group = 300, 512, 128
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    zeros = torch.rand(n, k // group, generator=g) * (1 << bits)
    zeros[::3] = zeros[::3].round()
    zeros[7, 2] = 3000.0
    qw = ops.QuantizedWeight.from_int(q, scales, zeros, bits, group)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group, qw.codebook)
    qc = qw.to("cuda")
    dtypes = ((torch.float16, 3e-3), (torch.bfloat16, 2e-2)) if bits < 8 else ((torch.float16, 3e-3),)
    for (dtype, tol), m in itertools.product(dtypes, (1, 11, 40)):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = ops.dequant_gemm(x.cuda(), qc).cpu().double()
        y64 = x.double() @ w64.T
        torch.testing.assert_close(y, y64, rtol=tol, atol=tol * y64.abs().max().item())


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_packing_round_trips_through_the_reference(bits):
    g = torch.Generator().manual_seed(bits)
    for group in (8, 32, 64, 256):
        q = torch.randint(0, 1 << bits, (5, 512), generator=g)
        qw = ops.QuantizedWeight.from_int(q, torch.ones(5, 512 // group), None, bits, group)
        assert qw.qweight.shape == (5, 512 * bits // 8)
        assert torch.equal(ref.unpack_codes(qw.qweight, bits, group), q)


def test_codebook_grids():
    # NF4 as published with QLoRA (Dettmers et al. 2023, appendix E)
    nf4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    torch.testing.assert_close(ops.nf_codebook(4), torch.tensor(nf4), rtol=0, atol=1e-6)
    for bits in (2, 3, 8):
        cb = ops.nf_codebook(bits)
        assert cb.shape == (1 << bits,) and cb[0] == -1 and cb[-1] == 1 and (cb == 0).sum() == 1
        assert (cb.diff() > 0).all()
    p = ops.power_codebook(3, 2.0).double()
    t = torch.linspace(-1, 1, 8, dtype=torch.float64)
    torch.testing.assert_close(p, t.sign() * t * t, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_activations_bias_and_gradients(dtype):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(24, 128, generator=g) * 0.1, torch.randn(24, generator=g)
    qw = ops.quantize_weight(w, 3, 64, codebook=ops.power_codebook(3, 1.5))
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 3, qw.group, qw.codebook)
    for m in (3, 30):
        x = torch.randn(2, m, 128, generator=g).to(dtype).requires_grad_(True)
        bias = b.to(dtype).requires_grad_(True)
        y = ops.dequant_gemm(x, qw, bias)
        assert y.dtype == dtype and y.shape == (2, m, 24)
        x64, b64 = x.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
        y64 = x64 @ w64.T + b64
        up = torch.randn(y.shape, generator=g)
        y.backward(up.to(dtype))
        y64.backward(up.to(dtype).double())
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * x64.grad.abs().max().item())
        torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=tol, atol=tol * b64.grad.abs().max().item())


def test_bias_of_another_dtype_is_refused():
    """As F.linear: a bias whose dtype is not x's raises, naming both (it had been added in
    float32 silently); under autocast both are cast first, as F.linear's are."""
    g = torch.Generator().manual_seed(7)
    qw = ops.quantize_weight(torch.randn(16, 64, generator=g), 4, 32)
    x = torch.randn(3, 64, generator=g)
    for bias_dtype, name in ((torch.float64, "Double"), (torch.bfloat16, "BFloat16"), (torch.float16, "Half")):
        bias = torch.randn(16, generator=g).to(bias_dtype)
        with pytest.raises(RuntimeError, match=f"bias is {name} but x is Float"):
            ops.dequant_gemm(x, qw, bias)
        with pytest.raises(RuntimeError, match="bias is"):
            ops.dequant_gemm(x.bfloat16() if bias_dtype != torch.bfloat16 else x.half(), qw, bias)
    bias = torch.randn(16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.dequant_gemm(x, qw, bias.double().float())  # float32 x and bias: both cast
    assert y.dtype == torch.bfloat16
    expected = ops.dequant_gemm(x.bfloat16(), qw, bias.bfloat16())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_opcheck_compile_and_imported_weights():
    g = torch.Generator().manual_seed(6)
    q = torch.randint(0, 16, (10, 64), generator=g)
    scales, zeros = torch.rand(10, 2, generator=g) + 0.1, torch.randint(0, 16, (10, 2), generator=g).float()
    qw = ops.QuantizedWeight.from_int(q, scales, zeros, 4, 32)
    expected_w = (q.double() - zeros.double().repeat_interleave(32, 1)) * scales.double().repeat_interleave(32, 1)
    torch.testing.assert_close(ops.dequantize_weight(qw).double(), expected_w, rtol=0, atol=1e-6)
    cb = torch.randn(10, 8, generator=g)
    q3 = torch.randint(0, 8, (10, 64), generator=g)
    qc = ops.QuantizedWeight.from_int(q3, scales, None, 3, 32, codebook=cb)
    expected_c = cb.double().gather(1, q3) * scales.double().repeat_interleave(32, 1)
    torch.testing.assert_close(ops.dequantize_weight(qc).double(), expected_c, rtol=0, atol=1e-6)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    b = torch.randn(10, generator=g, requires_grad=True)
    for w in (qw, qc):
        torch.library.opcheck(torch.ops.fastloss.dequant_gemm.default, (x, *w.op_args, b))
        for gdt in (torch.float32, torch.bfloat16):  # (the result in grad_y's dtype)
            torch.library.opcheck(torch.ops.fastloss.dequant_gemm_grad_input.default,
                                  (torch.randn(3, 10).to(gdt), *w.op_args))
        torch.library.opcheck(torch.ops.fastloss.dequantize_weight.default, w.op_args)
        f = lambda t: ops.dequant_gemm(t, w, b).square().sum()  # noqa: E731
        assert_compiled_matches(f, [x])


def test_quant_linear_on_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    x = torch.randn(20, 64)
    reference = model(x).detach()
    float_state = model.state_dict()
    for codebook, bound in ((None, 0.1), (ops.nf_codebook, 0.1)):
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
        model.load_state_dict(float_state)
        fastloss.nn.quantize_linear_layers_(model, bits=8, group_size=32, bits_per_layer={"2": 4},
                                            codebook=codebook)
        assert isinstance(model[0], fastloss.nn.QuantLinear) and model[0].bits == 8 and model[2].bits == 4
        assert (model[2].codebook is None) == (codebook is None)
        out = model(x)
        rel = (out - reference).norm() / reference.norm()
        assert rel < bound, rel   # 4-bit round-to-nearest of a random layer: about 7% here
        state = model.state_dict()
        again = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
        fastloss.nn.quantize_linear_layers_(again, bits=8, group_size=32, bits_per_layer={"2": 4},
                                            codebook=codebook)
        again.load_state_dict(state)
        torch.testing.assert_close(again(x), out)
        out.sum().backward()
        assert model[0].bias.grad is not None


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_zero_groups_contribute_exactly_zero(bits, quant_cpu_isa):
    # A group of zeros gets scale 0. With scale 1 and the symmetric zero point 2^(bits-1), the
    # kernels that apply zero points as s (q.x - z sum(x)) (batch 1-2 off AMX, the AMX-BF16 GEMM)
    # left float32 rounding noise of x's size where the row's small weights gave ~1e-4 of it; a
    # codebook without an exact zero (a power grid of an even count) made the zeros nonzero.
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 384, generator=g) * 1e-4
    w[:, 128:256] = 0
    w[5] = 0
    w[7, 256:] = 1e-45   # (so small that the uniform formats' scales underflow: zero groups too)
    for kind in ("symmetric", "asymmetric", "codebook"):
        cb = ops.power_codebook(bits, 1.5) if kind == "codebook" else None
        qw = ops.quantize_weight(w, bits, 128, kind != "asymmetric", cb)
        assert (qw.scales[:, 1] == 0).all() and (qw.scales[5] == 0).all()
        assert qw.scales[7, 2] < 1e-30   # (0, or its own tiny scale: never 1)
        deq = ops.dequantize_weight(qw)
        assert (deq[:, 128:256] == 0).all() and (deq[5] == 0).all()
        for m in (1, 2, 5, 20):
            x = torch.randn(m, 384, generator=g)
            y = ops.dequant_gemm(x, qw)
            assert (y[:, 5] == 0).all(), (kind, m)
            exact = x.double() @ deq.double().T
            err = ((y.double() - exact).abs().max() / exact.abs().max()).item()
            assert err < 1e-5, (kind, m, err)


def test_quant_linear_dtype_casts_keep_the_format():
    # model.half() / .to(torch.bfloat16) after quantizing: the bias follows, the packed format's
    # float32 scales / zeros / codebook and uint8 codes do not (the kernels refused them as half)
    torch.manual_seed(1)
    for codebook in (None, ops.nf_codebook(4)):
        layer = fastloss.nn.QuantLinear.from_linear(torch.nn.Linear(256, 48), 4, 128, codebook=codebook)
        x = torch.randn(5, 256)
        for dtype in (torch.float16, torch.bfloat16):
            cast = copy.deepcopy(layer).to(dtype)
            assert cast.bias.dtype == dtype and cast.qweight.dtype == torch.uint8
            assert all(t.dtype == torch.float32 for t in (cast.scales, cast.zeros, cast.codebook) if t is not None)
            torch.testing.assert_close(cast.scales, layer.scales, rtol=0, atol=0)
            y = cast(x.to(dtype))
            assert y.dtype == dtype
            torch.testing.assert_close(y.float(), layer(x.to(dtype).float()), rtol=2e-2, atol=2e-2)
        half = copy.deepcopy(layer).half()
        assert half.bias.dtype == torch.float16 and half.scales.dtype == torch.float32


def test_quantize_linear_layers_is_all_or_nothing_and_keeps_shared_layers_shared():
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 30), torch.nn.ReLU(), torch.nn.Linear(30, 8), shared, shared)
    before = [type(m) for m in model]
    # layer "2" has 30 inputs: per channel, 30 is no 2-bit group (a multiple of 4); the error names it
    with pytest.raises(ValueError, match=r"layer '2' \(30 inputs, 2 bits\): 2-bit groups must have a length divisible by 4"):
        fastloss.nn.quantize_linear_layers_(model, bits=2, group_size=32)
    assert [type(m) for m in model] == before   # nothing replaced
    fastloss.nn.quantize_linear_layers_(model, bits=2, group_size=32, bits_per_layer={"2": 8, "3": 4})
    assert model[3] is model[4] and isinstance(model[3], fastloss.nn.QuantLinear) and model[3].bits == 4
    assert model[0].bits == 2 and model[2].bits == 8 and model[2].group == 30


def test_skip_keeps_layers_in_float_for_the_fused_loss():
    """skip: named layers stay nn.Linear (an LM head the fused loss reads: from_linear of a
    QuantLinear raises, naming the way out); a shared layer skipped under one of its names
    stays float under all; unknown names raise, as bits_per_layer's do."""
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), shared, shared, torch.nn.Linear(64, 50))
    fastloss.nn.quantize_linear_layers_(model, bits=4, group_size=32, skip=["3", "2"])
    assert isinstance(model[0], fastloss.nn.QuantLinear)
    assert type(model[1]) is torch.nn.Linear and model[1] is model[2] and type(model[3]) is torch.nn.Linear
    head = fastloss.nn.LinearCrossEntropy.from_linear(model[3])
    h, t = torch.randn(5, 64), torch.randint(0, 50, (5,))
    torch.testing.assert_close(head(h, t), F.cross_entropy(model[3](h), t), rtol=1e-5, atol=1e-6)
    quantized = fastloss.nn.quantize_linear_layers_(torch.nn.Sequential(torch.nn.Linear(64, 50)), bits=4,
                                                    group_size=32)
    with pytest.raises(TypeError, match="linear must hold a float weight.*got QuantLinear.*skip list"):
        fastloss.nn.LinearCrossEntropy.from_linear(quantized[0])
    with pytest.raises(ValueError, match=r"skip names no nn.Linear of the model: \['lm_head'\]"):
        fastloss.nn.quantize_linear_layers_(torch.nn.Sequential(torch.nn.Linear(64, 50)), skip=["lm_head"])
    with pytest.raises(TypeError, match="qw must be a QuantizedWeight.*QuantLinear.from_linear"):
        fastloss.nn.QuantLinear(64, 50)
    packed = torch.nn.Linear(4, 3)  # (a bitsandbytes-style packed uint8 weight)
    packed.weight = torch.nn.Parameter(torch.zeros(6, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="linear must hold a float weight"):
        fastloss.nn.LinearCrossEntropy.from_linear(packed)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 50))
    with pytest.raises(TypeError, match="skip takes qualified layer names"):
        fastloss.nn.quantize_linear_layers_(plain, group_size=32, skip=[plain[0]])
    with pytest.raises(ValueError, match=r"\['0'\] both skipped and given bits"):
        fastloss.nn.quantize_linear_layers_(plain, group_size=32, skip="0", bits_per_layer={"0": 8})
    fastloss.nn.quantize_linear_layers_(plain, group_size=32, skip=None)  # (as bits_per_layer=None)
    assert isinstance(plain[0], fastloss.nn.QuantLinear)


def test_bad_input_errors_name_the_argument():
    w = torch.randn(8, 64)
    qw = ops.quantize_weight(w, 4, 32)
    op = torch.ops.fastloss.dequant_gemm
    x = torch.randn(2, 64)
    w_nan = w.clone()
    w_nan[3, 5] = float("nan")
    cases = [
        (lambda: ops.quantize_weight(w, 5, 32), "bits must be 2, 3, 4 or 8"),
        (lambda: ops.quantize_weight(w, 4, 48), "group_size (48) must divide the input features K = 64"),
        (lambda: ops.quantize_weight(w[:, :63], 4, -1), "4-bit groups must have a length divisible by 2"),
        (lambda: ops.quantize_weight(w[:, :60], 3, -1), "3-bit groups must have a length divisible by 8, got 60"),
        (lambda: ops.quantize_weight(w, 4, 32, codebook=torch.randn(8)), "codebook must be a float tensor of 2^bits = 16"),
        (lambda: ops.quantize_weight(w, 2, 32, codebook=torch.randn(3, 4)), "per output channel [8, 4]"),
        (lambda: ops.quantize_weight(w, 2, 32, codebook=torch.tensor([0., 1., float("nan"), 2.])), "finite"),
        (lambda: ops.quantize_weight(w, 4, 32, False, ops.nf_codebook(4)), "a codebook format has no zero points"),
        (lambda: ops.quantize_weight(w, 2, 32, codebook=torch.zeros(4)), "every codebook row needs a nonzero value"),
        (lambda: ops.quantize_weight(w_nan, 4, 32), "w must hold finite values"),
        (lambda: ops.quantize_weight(w[:0], 4, 32), "w must have at least one row and one column, got (0, 64)"),
        (lambda: ops.quantize_weight(w[:, :0], 4, 32), "w must have at least one row and one column, got (8, 0)"),
        (lambda: ops.power_codebook(4, 0.0), "exponent must be > 0"),
        (lambda: ops.dequant_gemm(torch.randn(2, 63), qw), "x must be [..., 64]"),
        (lambda: ops.dequant_gemm(x.double(), qw), "x must be a float32"),
        (lambda: ops.dequant_gemm(x, w), "qw must be a QuantizedWeight"),
        (lambda: ops.dequant_gemm(x, qw, torch.randn(7)), "bias must be [N] = [8]"),
        (lambda: op(x, qw.qweight, qw.scales[:, :1], qw.zeros, None, 4, 32, None),
         "scales must be float32 [8, 2]"),
        (lambda: op(x, qw.qweight, qw.scales, qw.zeros[:, :1], None, 4, 32, None), "zeros must be float32 [8, 2]"),
        (lambda: op(x, qw.qweight.float(), qw.scales, qw.zeros, None, 4, 32, None),
         "qweight must be a 2-D uint8 tensor"),
        (lambda: op(x, qw.qweight, qw.scales, None, torch.randn(8, 8), 4, 32, None), "codebook must be float32 [8, 16]"),
        (lambda: op(x, qw.qweight, qw.scales, None, torch.randn(3, 16), 4, 32, None),
         "codebook must be [1, 2^bits] (per tensor) or [N, 2^bits]"),
        (lambda: op(x, qw.qweight, qw.scales, None, None, 5, 32, None), "bits must be 2, 3, 4 or 8, got 5"),
        (lambda: op(torch.randn(2, 32), qw.qweight[:, :13].contiguous(), qw.scales[:, :1], None, None, 3, 32, None),
         "qweight must be a 2-D uint8 tensor [N, K * bits / 8]"),
        (lambda: op(torch.randn(2, 64), qw.qweight, qw.scales, None, None, 2, 32, None),   # 4-bit read as 2-bit
         "scales must be float32 [8, 4], got Float [8, 2]"),
        (lambda: ops.QuantizedWeight.from_int(torch.full((8, 64), 16), torch.ones(8, 2), torch.zeros(8, 2), 4, 32),
         "q must hold integers in [0, 16)"),
        (lambda: ops.QuantizedWeight.from_int(torch.zeros(0, 64, dtype=torch.long), torch.ones(0, 2), None, 4, 32),
         "q must be a non-empty [N, K] tensor of codes, got (0, 64)"),
        (lambda: fastloss.nn.quantize_linear_layers_(torch.nn.Sequential(torch.nn.Linear(4, 4)), bits_per_layer={"x": 8}),
         "bits_per_layer names no nn.Linear of the model: ['x']"),
        (lambda: fastloss.nn.quantize_linear_layers_(torch.nn.Linear(4, 4)), "model is itself an nn.Linear"),
        (lambda: ops.QuantizedWeight.from_int(torch.zeros(8, 64, dtype=torch.long), None, None, 4, 32),
         "scales must be a float tensor [8, 2], got NoneType"),
        (lambda: ops.QuantizedWeight.from_int(torch.zeros(8, 64, dtype=torch.long), torch.ones(8, 2),
                                              torch.zeros(8, 2), 4, 32, ops.nf_codebook(4)),
         "a codebook format has no zero points"),
        (lambda: ops.QuantizedWeight.from_int(torch.zeros(8, 64, dtype=torch.long), torch.ones(8, 2),
                                              torch.full((8, 2), float("inf")), 4, 32), "zeros must hold finite values"),
        (lambda: ops.quantize_weight(w, 4.0, 32), "bits must be 2, 3, 4 or 8, got 4.0"),
        (lambda: ops.quantize_weight(w, 4, 32.0), "group_size must be an int"),
        (lambda: qw.to(torch.float16), "QuantizedWeight.to takes a device"),
    ]
    expect_errors(cases)
    # meta tensors skip the value checks (shape inference): the packed layout's shapes
    for sym, cb in ((True, None), (False, None), (True, ops.nf_codebook(4))):
        meta = ops.quantize_weight(w.to("meta"), 4, 32, sym, cb)
        assert meta.qweight.shape == (8, 32) and meta.scales.shape == (8, 2) and meta.qweight.is_meta
