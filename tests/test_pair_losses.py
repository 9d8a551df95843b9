"""The Mann-Whitney (AUC) loss against its float64 reference (itself checked against
F.binary_cross_entropy_with_logits over the pair matrix): loss and both gradients, every kernel
path (CPU ISAs, CUDA where there is a GPU) and dtype, one query and many, sizes around the vector widths and the 256-positive
work blocks, extreme scores; opcheck, compile, no_grad, bad input, and that the pair matrix is
never built (peak memory)."""


import pytest
import torch
import torch.nn.functional as F

from fastloss import ops
from fastloss.reference import pair_losses as ref
from peak_memory import assert_never_builds, peak_extra_bytes, requires_proc
from checks import assert_compiled_matches, assert_matches_reference, expect_errors

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(shape_pos, shape_neg, dtype, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed + sum(shape_pos) * 7 + sum(shape_neg))
    pos = (torch.randn(*shape_pos, generator=g) * scale + 0.5).to(dtype)
    neg = (torch.randn(*shape_neg, generator=g) * scale).to(dtype)
    return pos, neg


def check(pos, neg, reduction, what):
    assert_matches_reference(lambda p, n: ops.mw_auc_loss(p, n, reduction),
                             lambda p, n: ref.mw_auc_loss(p, n, reduction), [pos, neg], TOL[pos.dtype], what,
                             names=["grad_pos", "grad_neg"], seed=3, floor=1e-3, signed_upstream=True)


def test_reference_is_bce_over_the_pairs():
    pos, neg = make((4, 9), (4, 13), torch.float64, seed=1)
    diff = pos[:, :, None] - neg[:, None, :]
    expected = F.binary_cross_entropy_with_logits(diff, torch.ones_like(diff), reduction="none").mean((1, 2))
    torch.testing.assert_close(ref.mw_auc_loss(pos, neg, "none"), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sizes", [(1, 1), (1, 7), (7, 1), (3, 17), (255, 33), (256, 16), (257, 5), (600, 40)],
                         ids=lambda s: f"P{s[0]}N{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(dtype, sizes, reduction, device):
    p, n = sizes
    check(*[t.to(device) for t in make((p,), (n,), dtype)], reduction, f"one query {sizes} {dtype}")
    check(*[t.to(device) for t in make((3, p), (3, n), dtype, seed=2)], reduction, f"3 queries {sizes} {dtype}")


def test_strided_and_extreme_scores():
    pos, neg = make((4, 50), (4, 31), torch.float32, seed=4)
    check(pos.t().contiguous().t(), neg[:, ::1], "mean", "column-major pos")
    check(torch.cat([pos, pos], 1)[:, ::2], neg, "mean", "strided columns")
    big = torch.tensor([[1e4, -1e4, 0.0, 30.0]]), torch.tensor([[-1e4, 1e4, 0.5]])
    out = ops.mw_auc_loss(*big, "none")
    assert torch.isfinite(out).all()
    check(*big, "mean", "extreme scores")


def test_no_grad_and_opcheck_and_compile():
    pos, neg = make((3, 40), (3, 20), torch.float32, seed=5)
    with torch.no_grad():
        a = ops.mw_auc_loss(pos.requires_grad_(True), neg)
    torch.testing.assert_close(a.double(), ref.mw_auc_loss(pos.detach().double(), neg.double()),
                               rtol=1e-5, atol=1e-6)
    for compute_grad in (True, False):
        torch.library.opcheck(torch.ops.fastloss.mw_auc_forward.default,
                              (pos.detach().clone().requires_grad_(compute_grad), neg, compute_grad))
    for reduction in range(3):  # the eager path's op: forward, reduction, C++ autograd
        torch.library.opcheck(torch.ops.fastloss.mw_auc_loss.default,
                              (pos.detach().clone().requires_grad_(True), neg.detach().clone().requires_grad_(True),
                               reduction))
    f = lambda p, n: ops.mw_auc_loss(p, n) * 2 + ops.mw_auc_loss(n, p, "sum")  # noqa: E731
    assert_compiled_matches(f, [pos, neg])


def test_bad_input_errors_name_the_argument():
    pos, neg = make((3, 4), (3, 5), torch.float32)
    cases = [
        (lambda: ops.mw_auc_loss(pos, neg[:2]), "must be [P] and [N], or [B, P] and [B, N]"),
        (lambda: ops.mw_auc_loss(pos, neg.double()), "scores_neg must be float32"),
        (lambda: ops.mw_auc_loss(pos.int(), neg), "scores_pos must be float32"),
        (lambda: ops.mw_auc_loss(pos, neg.half()), "scores_pos is Float but scores_neg is Half"),
        (lambda: ops.mw_auc_loss(pos[:, :0], neg), "at least one positive and one negative"),
        (lambda: ops.mw_auc_loss(pos, neg, "avg"), "reduction must be"),
        (lambda: ops.mw_auc_loss(pos.tolist(), neg), "scores_pos must be a Tensor"),
    ]
    expect_errors(cases)


_PEAK_CALL = {
    "fused": 'fastloss.ops.mw_auc_loss(p, n).backward()',
    "eager": 'ref.mw_auc_loss(p, n, compute_dtype=None).backward()',
}
_PEAK_SETUP = """
import fastloss
from fastloss.reference import pair_losses as ref
p = torch.randn(1, 4096).requires_grad_(True)
n = torch.randn(1, 4096).requires_grad_(True)
fastloss.ops.mw_auc_loss(p[:, :8], n[:, :8]).backward()   # warm up
ref.mw_auc_loss(p[:, :8], n[:, :8], compute_dtype=None).backward()
"""


@requires_proc
def test_pair_matrix_is_never_built():
    # the 64 MiB of float32 pairs of a 4096 x 4096 query; the fused op keeps O(P + N)
    assert_never_builds(_PEAK_SETUP, _PEAK_CALL, 4096 * 4096 * 4, 8 << 20, "pair matrix")


def _auc_float64(pos, neg, rows=512):
    """mw_auc_loss's per-query losses and gradients in float64 from the formulas, a block of
    positives at a time (the pair matrix of these sizes would be gigabytes)."""
    pos, neg = pos.double(), neg.double()
    loss = torch.zeros(pos.shape[0], dtype=torch.float64)
    gp, gn = torch.zeros_like(pos), torch.zeros_like(neg)
    scale = 1.0 / (pos.shape[1] * neg.shape[1])
    for i0 in range(0, pos.shape[1], rows):
        z = neg[:, None, :] - pos[:, i0:i0 + rows, None]  # softplus(n_j - p_i) per pair
        loss += torch.nn.functional.softplus(z).sum((1, 2)) * scale
        sig = torch.sigmoid(z)
        gp[:, i0:i0 + rows] = -sig.sum(2) * scale
        gn += sig.sum(1) * scale
    return loss, gp, gn


def test_long_negative_lists_go_in_chunks():
    """N = 40000: at 2 threads the CPU op's scratch (1 MiB) holds 6 items' negative-score rows at
    a time, so the 12 items of these two queries go in 2 chunks, summed in order into grad_neg."""
    g = torch.Generator().manual_seed(11)
    pos, neg = torch.randn(2, 6 * 256 - 5, generator=g), torch.randn(2, 40000, generator=g) * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loss, gp, gn = torch.ops.fastloss.mw_auc_forward(pos, neg, True)
    finally:
        torch.set_num_threads(threads)
    want = _auc_float64(pos, neg)
    for got, exp in zip((loss, gp, gn), want):
        torch.testing.assert_close(got.double(), exp, rtol=2e-5, atol=1e-12)


@requires_proc
def test_cpu_scratch_is_bounded():
    # one query of 4096 positives (16 items of 256) and 65536 negatives, one thread (as
    # peak_extra_bytes runs): all the items' rows at once were 4 MiB; the op keeps 1 MiB of
    # them (and the 0.6 MiB of gradients); T threads keep max(1 MiB, 8 T N bytes)
    setup = """
import fastloss
p = torch.randn(1, 4096).requires_grad_(True)
n = torch.randn(1, 65536).requires_grad_(True)
fastloss.ops.mw_auc_loss(p[:, :8], n[:, :8]).backward()   # warm up
"""
    extra = peak_extra_bytes(setup, "fastloss.ops.mw_auc_loss(p, n).backward()")
    assert extra < 3 << 20, f"peak extra memory {extra} B"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_path_equals_cpu():
    # a query of 4096 x 4096 pairs (64 MiB as a float32 matrix): the kernel keeps O(P + N)
    pos, neg = make((4096,), (4096,), torch.float32, seed=9)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    p = pos.cuda().requires_grad_(True)
    ops.mw_auc_loss(p, neg.cuda()).backward()
    assert torch.cuda.max_memory_allocated() - base < 4 << 20, "the pair matrix was built"
    pos, neg = make((3, 40), (3, 25), torch.float32, seed=8)
    results = []
    for dev in ("cpu", "cuda"):
        p, n = pos.detach().to(dev).requires_grad_(True), neg.detach().to(dev).requires_grad_(True)
        out = ops.mw_auc_loss(p, n)
        out.backward()
        results.append((out.cpu(), p.grad.cpu(), n.grad.cpu()))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)
