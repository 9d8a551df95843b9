"""The fused linear losses against the float64 references (logits formed in float64, then the
reference loss), against the unfused fastloss ops, and against F.cross_entropy: loss and the
gradients of hidden, weight and bias; every loss, dtype and reduction, awkward N/D/V, block
sizes, ignored rows; opcheck, compile, autocast, the module, bad input, and peak memory."""

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import ops
from fastloss import reference as ref

from conftest import requires_cuda
from peak_memory import peak_extra_bytes, requires_proc
from checks import expect_errors

# name -> (fused function, unfused fastloss function, reference loss, kwargs, class weights)
CASES = {
    "ce": (ops.linear_cross_entropy, ops.cross_entropy, ref.cross_entropy, {}, False),
    "ce_everything": (ops.linear_cross_entropy, ops.cross_entropy, ref.cross_entropy,
                      {"label_smoothing": 0.2, "lse_square_scale": 1e-3, "softcap": 3.0}, True),
    "comp_tau0.5": (ops.linear_comp_sum_loss, ops.comp_sum_loss, ref.comp_sum_loss,
                    {"tau": 0.5}, True),
    "comp_tau1.5": (ops.linear_comp_sum_loss, ops.comp_sum_loss, ref.comp_sum_loss,
                    {"tau": 1.5}, False),
    "ldr": (ops.linear_ldr_loss, ops.ldr_loss, ref.ldr_loss, {"lam": 0.5, "margin": 0.5}, False),
    "aldr": (ops.linear_ldr_loss, ops.ldr_loss, ref.ldr_loss,
             {"lam": 1.0, "margin": 1.0, "adaptive": True}, True),
    "zloss": (ops.linear_spherical_z_loss, ops.spherical_z_loss, ref.spherical_z_loss,
              {"a": 0.7, "b": 1.5}, False),
    "stablemax": (ops.linear_stablemax_cross_entropy, ops.stablemax_cross_entropy,
                  ref.stablemax_cross_entropy, {}, True),
}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, D, V): one of everything, tiny, odd, a vocabulary past the GPU's 1024-class threshold
SHAPES = [(1, 1, 1), (7, 5, 3), (33, 17, 130), (50, 24, 1031)]
# relative tolerance: float32 math, but the logits of a block are rounded to the dtype first
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(n, d, v, dtype, device="cpu", weighted=False, bias=True, seed=0,
                ignore_index=-100):
    g = torch.Generator().manual_seed(seed * 7919 + n * 131 + d * 17 + v)
    hidden = torch.randn(n, d, generator=g) * 1.5
    weight = torch.randn(v, d, generator=g) / max(d, 1) ** 0.5
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        target[torch.rand(n, generator=g) < 0.25] = ignore_index
    cw = torch.rand(v, generator=g) + 0.5 if weighted else None
    to = lambda t, dt=dtype: None if t is None else t.to(device=device, dtype=dt)
    return to(hidden), to(weight), to(target, torch.int64), to(b), to(cw, torch.float32)


def close(actual, expected, dtype, what, scale=1.0, floor=1e-3):
    """Relative to the largest expected magnitude, or to `floor` when that is smaller."""
    tol = TOL[dtype] * scale
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    mag = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(mag, floor),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def run(fn, hidden, weight, target, bias, cw, reduction, up=None, **kw):
    """Loss and the gradients of (hidden, weight, bias) for upstream gradient `up`."""
    # detach, not clone: a strided input stays strided
    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], target, bias=leaves[2], reduction=reduction, class_weight=cw,
             **kw)
    out.backward(up.to(out.dtype) if up is not None else None)
    return out, [t.grad if t is not None else None for t in leaves]


def reference(ref_fn, hidden, weight, target, bias, cw, reduction, up, **kw):
    leaves = [t.detach().double().cpu().requires_grad_(True) if t is not None else None
              for t in (hidden, weight, bias)]
    out = ref.linear_loss(ref_fn, leaves[0], leaves[1], target.cpu(), leaves[2],
                          class_weight=None if cw is None else cw.double().cpu(),
                          reduction=reduction, **kw)
    out.backward(up.double().cpu() if up is not None else None)
    return out, [t.grad if t is not None else None for t in leaves]


def assert_same_runs(fn, inputs, expected_fn, expected_inputs, reduction):
    """fn(*inputs) gives expected_fn(*expected_inputs)'s loss and gradients; inputs are
    (hidden, weight, target, bias)."""
    out, grads = run(fn, *inputs, None, reduction)
    exp, exp_grads = run(expected_fn, *expected_inputs, None, reduction)
    torch.testing.assert_close(out, exp)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e)


def upstream(out_shape, reduction, device):
    if reduction != "none":
        return None
    g = torch.Generator().manual_seed(11)
    return torch.randn(out_shape, generator=g).to(device)


def check_case(name, shape, dtype, reduction, device="cpu", block_rows=None, bias=True, seed=0):
    fused, _, ref_fn, kw, weighted = CASES[name]
    h, w, t, b, cw = make_inputs(*shape, dtype, device, weighted, bias, seed)
    up = upstream(t.shape, reduction, device)
    out, grads = run(fused, h, w, t, b, cw, reduction, up, block_rows=block_rows, **kw)
    exp, exp_grads = reference(ref_fn, h, w, t, b, cw, reduction, up, **kw)
    assert out.dtype == dtype and out.shape == exp.shape
    close(out, exp, dtype, f"{name} loss")
    for what, g, e, like in zip(("hidden", "weight", "bias"), grads, exp_grads, (h, w, b)):
        if like is None:
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, what
        close(g, e, dtype, f"{name} grad_{what}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, shape, reduction):
    check_case(name, shape, dtype, reduction)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shape", SHAPES + [(37, 64, 50001)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_cuda(name, dtype, shape, reduction):
    check_case(name, shape, dtype, reduction, device="cuda")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ce", "ce_everything"])
@pytest.mark.parametrize("dev", DEVICES)
def test_low_memory_tiles_match_reference(name, dtype, shape, reduction, dev):
    """low_memory=True (tiles of the vocabulary; block_rows = classes per tile here)."""
    fused, _, ref_fn, kw, weighted = CASES[name]
    for tile in (None, 7):
        h, w, t, b, cw = make_inputs(*shape, dtype, dev, weighted, seed=24)
        up = upstream(t.shape, reduction, dev)
        out, grads = run(fused, h, w, t, b, cw, reduction, up, block_rows=tile, low_memory=True, **kw)
        exp, exp_grads = reference(ref_fn, h, w, t, b, cw, reduction, up, **kw)
        assert out.dtype == dtype and out.shape == exp.shape
        close(out, exp, dtype, f"{name} tile {tile} loss")
        for what, g, e, like in zip(("hidden", "weight", "bias"), grads, exp_grads, (h, w, b)):
            assert g.dtype == like.dtype and g.shape == like.shape, what
            # (the tiles form d/dz as a p - hit - smooth: with one class the three O(1) terms
            # cancel to ~1e-4, leaving float32 rounding of ~1e-8 against terms of size 1)
            close(g, e, dtype, f"{name} tile {tile} grad_{what}", floor=1e-2)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ce", "ce_everything"])
def test_low_memory_fused_stats_cuda(name, dtype, monkeypatch):
    """FASTLOSS_LINEAR_CE_STATS=fused: the forward's statistics from the tensor-core kernel
    (D a multiple of 8) instead of cuBLAS tiles + the tile kernel, the same gradients."""
    monkeypatch.setenv("FASTLOSS_LINEAR_CE_STATS", "fused")
    fused, _, ref_fn, kw, weighted = CASES[name]
    for shape in ((33, 16, 130), (50, 24, 1031)):
        h, w, t, b, cw = make_inputs(*shape, dtype, "cuda", weighted, seed=26)
        up = upstream(t.shape, "mean", "cuda")
        out, grads = run(fused, h, w, t, b, cw, "mean", up, low_memory=True, **kw)
        exp, exp_grads = reference(ref_fn, h, w, t, b, cw, "mean", up, **kw)
        close(out, exp, dtype, f"{name} fused stats loss")
        for what, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
            close(g, e, dtype, f"{name} fused stats grad_{what}", floor=1e-2)


@pytest.mark.parametrize("low_memory", [False, True])
def test_meta_tensors_and_no_features(low_memory):
    """Meta tensors give the loss's shape (autocast has no meta device: it had raised), and
    D = 0 (logits = the bias) equals F.cross_entropy, gradients included (the reshape of
    hidden could not infer its row count)."""
    meta = ops.linear_cross_entropy(torch.randn(4, 8, device="meta"), torch.randn(11, 8, device="meta"),
                                    torch.zeros(4, dtype=torch.long, device="meta"),
                                    reduction="none", low_memory=low_memory)
    assert meta.shape == (4,) and meta.device.type == "meta"
    g = torch.Generator().manual_seed(31)
    b = torch.randn(11, generator=g)
    t = torch.tensor([1, 2, -100, 10, 0])
    got = run(ops.linear_cross_entropy, torch.randn(5, 0), torch.randn(11, 0), t, b, None, "mean",
              low_memory=low_memory)
    exp = run(lambda h, w, t, bias, reduction, class_weight: F.cross_entropy(F.linear(h, w, bias), t,
                                                                             reduction=reduction),
              torch.randn(5, 0), torch.randn(11, 0), t, b, None, "mean")
    torch.testing.assert_close(got[0], exp[0])
    for a, e in zip(got[1], exp[1]):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)


def test_low_memory_compiles_and_checks_input():
    compiled = torch.compile(lambda h, w, t, bias, **kw: ops.linear_cross_entropy(
        h, w, t, bias, label_smoothing=0.1, low_memory=True, **kw), fullgraph=True)
    inputs = make_inputs(13, 10, 31, torch.float32, seed=25)[:4]
    assert_same_runs(compiled, inputs, lambda h, w, t, bias, **kw: ops.linear_cross_entropy(
        h, w, t, bias, label_smoothing=0.1, **kw), inputs, "mean")
    h, w, t, b = inputs
    f = lambda *a, **k: ops.linear_cross_entropy(*a, low_memory=True, **k)  # noqa: E731
    for call, message in [
            (lambda: f(h, w[:, :4], t), "weight must be [V, D] with V >= 1 and D = 10"),
            (lambda: f(h, w.double(), t), "must share a dtype"),
            (lambda: f(h, w, t, b[:3]), "bias must be [31]"),
            (lambda: f(h, w, t, class_weight=torch.ones(4)), "class_weight must be 1-D"),
            (lambda: f(h, w, t, class_weight=torch.ones(31, dtype=torch.long)), "floating, got torch.int64"),
            (lambda: f(h, w, t, block_rows=True), "block_rows must be a positive int"),
            (lambda: f(h, w, t.float()), "target must hold class indices"),
            (lambda: f(h, w, torch.full((13,), 31)), "target[0] = 31 is not a class index in [0, 31)")]:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


@pytest.mark.parametrize("block_rows", [1, 4, 13, 1000])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", ["ce_everything", "aldr"])
@pytest.mark.parametrize("dev", DEVICES)
def test_any_block_size(name, reduction, block_rows, dev):
    """Blocks of one row, blocks that do not divide N, one block for everything."""
    check_case(name, (29, 12, 257), torch.float32, reduction, dev, block_rows=block_rows, seed=3)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dev", DEVICES)
def test_equals_unfused(name, dtype, reduction, dev):
    """The same numbers as hidden @ weight.T + bias followed by the unfused fastloss op."""
    fused, unfused, _, kw, weighted = CASES[name]
    h, w, t, b, cw = make_inputs(40, 24, 301, dtype, dev, weighted, seed=5)
    up = upstream(t.shape, reduction, dev)
    out, grads = run(fused, h, w, t, b, cw, reduction, up, block_rows=16, **kw)
    unfused_linear = lambda h, w, t, bias, reduction, class_weight, **kw: unfused(
        F.linear(h, w, bias), t, weight=class_weight, reduction=reduction, **kw)
    exp, exp_grads = run(unfused_linear, h, w, t, b, cw, reduction, up, **kw)
    # the same float32 math; the logits are rounded identically unless the GEMM blocks differ
    scale = 0.1 if dtype == torch.float32 else 0.5
    close(out, exp, dtype, "loss", scale)
    for what, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
        close(g, e, dtype, f"grad_{what}", scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_weight_gradient_in_slices(dtype):
    """A wide D makes the reduced-precision grad_weight product go a slice of ~1000 classes
    at a time: every slice lands in the right rows."""
    check_case("ce_everything", (16, 4096, 2500), dtype, "mean", block_rows=6, seed=23)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_torch_cross_entropy(weighted, reduction):
    h, w, t, b, cw = make_inputs(45, 33, 517, torch.float64, weighted=weighted, seed=8)
    up = upstream(t.shape, reduction, "cpu")
    kw = dict(label_smoothing=0.1, ignore_index=-100)
    out, grads = run(ops.linear_cross_entropy, h.float(), w.float(), t, b.float(), cw, reduction,
                     up, **kw)
    torch_fn = lambda h, w, t, bias, reduction, class_weight, **kw: F.cross_entropy(
        F.linear(h, w, bias), t, weight=class_weight, reduction=reduction, **kw)
    exp, exp_grads = run(torch_fn, h, w, t, b, None if cw is None else cw.double(), reduction,
                         None if up is None else up.double(), **kw)
    close(out, exp, torch.float32, "loss")
    for what, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
        close(g, e, torch.float32, f"grad_{what}")


def test_leading_dimensions_and_no_bias():
    h, w, t, _, _ = make_inputs(24, 10, 37, torch.float32, bias=False, seed=9)
    h3, t3 = h.reshape(2, 3, 4, 10), t.reshape(2, 3, 4)
    out = ops.linear_cross_entropy(h3, w, t3, reduction="none")
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out.reshape(-1), ops.linear_cross_entropy(h, w, t, reduction="none"))


@pytest.mark.parametrize("dev", DEVICES)
def test_non_contiguous_inputs(dev):
    h, w, t, b, _ = make_inputs(21, 16, 90, torch.float32, dev, seed=10)
    h_t = h.t().contiguous().t()          # column-major hidden
    w_t = w.t().contiguous().t()          # column-major weight
    h_s = torch.empty(h.shape[0], 2 * h.shape[1], device=dev)[:, ::2]
    h_s.copy_(h)                          # strided columns
    assert not h_s.is_contiguous() and not w_t.is_contiguous()
    for hh, ww in ((h_t, w), (h, w_t), (h_s, w_t)):
        assert_same_runs(ops.linear_cross_entropy, (hh, ww, t, b),
                         ops.linear_cross_entropy, (h, w, t, b), "sum")


@pytest.mark.parametrize("dev", DEVICES)
def test_frozen_head_and_frozen_input(dev):
    """Only the gradients autograd asks for are formed, and they are the right ones."""
    h, w, t, b, _ = make_inputs(19, 8, 45, torch.float32, dev, seed=12)
    _, (gh, gw, gb) = run(ops.linear_cross_entropy, h, w, t, b, None, "mean")
    for wants in ((True, False, False), (False, True, False), (False, False, True),
                  (True, True, False)):
        leaves = [x.clone().requires_grad_(r) for x, r in zip((h, w, b), wants)]
        for reduction in ("mean", "none"):
            for x in leaves:
                x.grad = None
            out = ops.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction)
            (out if reduction == "mean" else out.sum() / (t != -100).sum()).backward()
            for x, r, e in zip(leaves, wants, (gh, gw, gb)):
                if r:
                    torch.testing.assert_close(x.grad, e)
                else:
                    assert x.grad is None


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch_and_all_ignored(reduction):
    for n, ignore in ((0, False), (5, True)):
        h, w, t, b, _ = make_inputs(n, 6, 11, torch.float32, seed=13)
        if ignore:
            t[:] = -100
        out, grads = run(ops.linear_cross_entropy, h, w, t, b, None, reduction,
                         torch.ones(n) if reduction == "none" else None)
        exp = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction)
        torch.testing.assert_close(out, exp, equal_nan=True)
        for g in grads:  # all zero, as torch's (also for the NaN mean over no rows)
            assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_no_grad_and_inference_mode(dev):
    h, w, t, b, _ = make_inputs(17, 9, 40, torch.float32, dev, seed=14)
    ws = [x.requires_grad_(True) for x in (h.clone(), w.clone(), b.clone())]
    expected = ops.linear_cross_entropy(*ws[:2], t, ws[2]).detach()
    with torch.no_grad():
        a = ops.linear_cross_entropy(*ws[:2], t, ws[2])
    with torch.inference_mode():
        c = ops.linear_cross_entropy(h, w, t, b)
    assert not a.requires_grad and not c.requires_grad
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(c, expected)


def test_backward_through_graph_twice():
    h, w, t, b, _ = make_inputs(11, 7, 23, torch.float32, seed=15)
    for reduction in ("mean", "none"):
        x = h.clone().requires_grad_(True)
        out = ops.linear_cross_entropy(x, w, t, b, reduction=reduction).sum()
        (g1,) = torch.autograd.grad(out, x, retain_graph=True)
        (g2,) = torch.autograd.grad(out, x)
        torch.testing.assert_close(g1, g2)


def test_scaled_upstream_gradient():
    """The gradients computed in the forward are scaled by d(total)/d(loss) in backward (in
    place, or while rounding grad_weight's float32 accumulator to bfloat16); for exactly 1
    they are handed over as they are (no copy)."""
    for dtype, tol in ((torch.float32, {}), (torch.bfloat16, dict(rtol=8e-3, atol=1e-5))):
        h, w, t, b, _ = make_inputs(14, 6, 29, dtype, seed=21)
        for reduction in ("mean", "sum"):
            _, unit = run(ops.linear_cross_entropy, h, w, t, b, None, reduction)
            _, tripled = run(lambda *a, **k: ops.linear_cross_entropy(*a, **k) * -3.0, h, w, t, b,
                             None, reduction)
            for u, g in zip(unit, tripled):
                assert g.dtype == dtype
                torch.testing.assert_close(g.float(), -3.0 * u.float(), **tol)


def test_retained_graph_gives_the_same_gradients_again():
    """The first backward hands its gradients over; a second one through a retained graph
    forms them again, whatever the caller did to the first ones."""
    h, w, t, b, _ = make_inputs(14, 6, 29, torch.float32, seed=22)
    for reduction in ("mean", "sum"):
        x = h.clone().requires_grad_(True)
        loss = ops.linear_cross_entropy(x, w, t, b, reduction=reduction)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        expected = g1.clone()
        g1.mul_(0.0)
        (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
        torch.testing.assert_close(g2, expected)
        loss.backward(retain_graph=True)
        x.grad.mul_(0.0)  # e.g. gradient clipping in place
        (g3,) = torch.autograd.grad(loss * 2, x)
        torch.testing.assert_close(g3, 2 * expected)


# ---- the torch integration --------------------------------------------------------------------

@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(dev):
    h, w, t, b, cw = make_inputs(9, 6, 21, torch.float32, dev, weighted=True, seed=16)
    samples = [(0, [0.1, 1e-3, 3.0]), (1, [0.7]), (2, [0.5, 1.0, 1.0, 2.0]), (3, [1.0, 2.0, 1e-6]),
               (4, [])]
    for i, (kind, scalars) in enumerate(samples):
        for bias in (b, None):
            # CUDA: one reduction per (kind, bias), in turn (the whole matrix runs on the CPU;
            # on the GPU machine, 12 pytest workers, it took over 90 s at f95b002)
            for reduction in (0, 1, 2) if dev == "cpu" else ((i + (bias is None)) % 3,):
                args = [x.clone().requires_grad_(True) for x in (h, w)]
                bb = None if bias is None else bias.clone().requires_grad_(True)
                torch.library.opcheck(torch.ops.fastloss.linear_loss.default,
                                      (*args, t, bb, cw, kind, scalars, -100, reduction, 4))
            fwd_args = (h, w, t, bias, cw, kind, scalars, -100, [True, True, True], 4)
            torch.library.opcheck(torch.ops.fastloss.linear_loss_forward.default, fwd_args)
            _, s0, s1, *_ = torch.ops.fastloss.linear_loss_forward(*fwd_args)
            g = torch.rand(9, device=dev)
            torch.library.opcheck(torch.ops.fastloss.linear_loss_backward.default,
                                  (g, h, w, t, bias, cw, s0, s1, kind, scalars, -100,
                                   [True, False, True], 4))


@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck_tile_ops(dev):
    h, w, t, b, cw = make_inputs(9, 6, 21, torch.float32, dev, weighted=True, seed=26)
    for bias, weights, softcap in ((b, cw, 0.0), (None, None, 3.0)):
        args = (h, w, bias, t, weights, 5, softcap, True, 4)
        torch.library.opcheck(torch.ops.fastloss.linear_ce_tile_stats.default, args)
        stats = torch.ops.fastloss.linear_ce_tile_stats(*args)
        coef = torch.rand(9, 3, device=dev)
        torch.library.opcheck(torch.ops.fastloss.linear_ce_tile_grads.default,
                              (h, w, bias, t, weights, 5, softcap, stats[:, 0], coef, True,
                               [True, True, True], 4))
    # a shard without classes: the log of an empty sum (-inf), so that merging shards by
    # logaddexp ignores it, and no target logit
    empty = torch.ops.fastloss.linear_ce_tile_stats(h, w[:0], None, t, None, 0, 0.0, True, 0)
    assert torch.equal(empty[:, 0], torch.full((9,), float("-inf"), device=dev))
    assert (empty[:, 1:] == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_tile_stats_with_masked_and_non_finite_logits(dev):
    """The statistics by tiles of 4 classes (and the default tile) against float64 logsumexp
    when a whole tile is masked (-inf bias: a padded vocabulary), and without bias for rows
    with +inf / -inf logits (an infinite feature) or NaN ones."""
    h, w, t, b, _ = make_inputs(7, 5, 18, torch.float32, dev, seed=27)
    masked = b.clone()
    masked[4:8] = float("-inf")  # the second tile: every row's logits -inf there
    t = torch.where((t >= 4) & (t < 8), 0, t)
    bad = h.clone()
    bad[5, 0] = float("inf")  # row 5: logits +inf or -inf by the sign of w[:, 0]
    bad[6, 1] = float("nan")  # row 6: NaN logits
    for hidden, bias in ((h, masked), (bad, None)):
        z = hidden.double() @ w.double().T + (0 if bias is None else bias.double())
        exp = torch.logsumexp(z, 1)
        for tile in (4, 0):
            stats = torch.ops.fastloss.linear_ce_tile_stats(hidden, w, bias, t, None, 0, 0.0, False, tile)
            torch.testing.assert_close(stats[:, 0].double(), exp, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert exp[5] == float("inf") and exp[6].isnan()  # the cases are the ones named


@pytest.mark.parametrize("tile", [(7, 4), (0, 5), (3, 1), (0, 0)], ids=lambda t: f"cols{t[0]}_rows{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev", DEVICES)
def test_tile_ops_by_blocks_of_rows(dev, dtype, tile):
    """The tile ops' statistics and gradients when the rows come in blocks (tile_rows; the
    default does so only where every row would pass the tile's budget: N > 1024 on the CPU),
    against float64 formulas: lse, z_y and the weighted logit sum of softcapped logits; d/dz =
    a softmax - hit [k = y] - smooth w_k times the cap's derivative, pushed through the
    linear layer."""
    cols, rows = tile
    h, w, t, b, cw = make_inputs(23, 6, 40, dtype, dev, weighted=True, seed=28)
    t = torch.where(t < 0, 3, t)  # (the tile ops take every row; the caller drops ignored ones)
    offset, cap = 2, 4.0
    g = torch.Generator().manual_seed(29)
    coef = (torch.rand(23, 3, generator=g) + 0.1).to(dev)
    x = h.double().cpu() @ w.double().cpu().T + b.double().cpu()
    z = cap * torch.tanh(x / cap)
    local = t.cpu() - offset  # (targets are global class indices; this weight holds [2, 42))
    inside = (local >= 0) & (local < 40)
    lse = torch.logsumexp(z, 1)
    z_y = torch.where(inside, z.gather(1, local.clamp(0, 39)[:, None])[:, 0], 0.0)
    wz = z @ cw.double().cpu()
    stats = torch.ops.fastloss.linear_ce_tile_stats(h, w, b, t, cw, offset, cap, True, cols, rows)
    for k, (what, exp) in enumerate((("lse", lse), ("z_y", z_y), ("weighted sum", wz))):
        close(stats[:, k], exp, dtype, what)
    c = coef.double().cpu()
    dz = c[:, :1] * torch.softmax(z, 1) - c[:, 2:] * cw.double().cpu()
    dz[inside, local[inside]] -= c[inside, 1]
    dx = dz * (1 - (z / cap) ** 2)
    expected = (dx @ w.double().cpu(), dx.T @ h.double().cpu(), dx.sum(0))
    grads = torch.ops.fastloss.linear_ce_tile_grads(h, w, b, t, cw, offset, cap, lse.float().to(dev),
                                                    coef, True, [True, True, True], cols, rows)
    for what, got, exp, like in zip(("hidden", "weight", "bias"), grads, expected, (h, w, b)):
        assert got.shape == exp.shape and got.dtype == (torch.float32 if what == "hidden" else like.dtype)
        close(got, exp, dtype, f"grad_{what}")


def _chunks(n, v, cols, rows, chunk):
    """The filtering chunks as (row slice, column slice): tiles of `rows` x `cols`, each cut
    into `chunk`-class pieces from the tile's first class."""
    for c0 in range(0, v, cols):
        for r0 in range(0, n, rows):
            for k0 in range(c0, min(v, c0 + cols), chunk):
                yield slice(r0, r0 + rows), slice(k0, min(v, c0 + cols, k0 + chunk))


def _filtered_reference(dx, is_target, a, eps, cols, rows, chunk):
    """Gradient filtering's rule restated in float64: a chunk's entries other than the targets'
    are dropped when each is at most eps |a| of its row; the targets' entries always stay."""
    kept = dx.clone()
    for rs, ks in _chunks(*dx.shape, cols, rows, chunk):
        block, tgt = kept[rs, ks], is_target[rs, ks]
        if bool((torch.where(tgt, 0.0, block).abs() <= eps * a[rs].abs()[:, None]).all()):
            block.copy_(torch.where(tgt, block, 0.0))
    return kept


@pytest.mark.parametrize("test_by", ["own", "reductions"])
@pytest.mark.parametrize("tile", [(200, 9), (7, 4), (0, 5), (0, 0)], ids=lambda t: f"cols{t[0]}_rows{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev", DEVICES)
def test_tile_grads_gradient_filtering(dev, dtype, tile, test_by, monkeypatch):
    """filter_eps > 0 (Cut Cross-Entropy's gradient filtering): against the rule restated in
    float64 (_filtered_reference; 300 classes: several chunks of 128 (CPU) or 256 (CUDA) per
    tile, a partial one last) for an eps between the chunks' own ratios (some left out, some
    kept: checked), a huge eps (only the targets' entries remain) and a tiny one (nothing left
    out, the targets still added apart), with every gradient and with grad_weight alone or
    grad_hidden alone; grad_bias stays exact. Soft cap, class weights, smoothing coefficients
    and a class offset as in test_tile_ops_by_blocks_of_rows. test_by "reductions": the CPU
    takes the CUDA branch's torch reductions (FASTLOSS_LINEAR_CE_FILTER), so that their
    arithmetic runs here too."""
    if test_by == "reductions":
        monkeypatch.setenv("FASTLOSS_LINEAR_CE_FILTER", "reductions")
    cols, rows = tile
    n, v = 23, 300
    chunk = 256 if dev == "cuda" else 128
    h, w, b_, t, cw = (make_inputs(n, 6, v, dtype, dev, weighted=True, seed=30)[i] for i in (0, 1, 3, 2, 4))
    t = torch.where(t < 0, 3, t)
    offset, cap = 2, 4.0
    g = torch.Generator().manual_seed(31)
    coef = (torch.rand(n, 3, generator=g) + 0.1).to(dev)
    x = h.double().cpu() @ w.double().cpu().T + b_.double().cpu()
    z = cap * torch.tanh(x / cap)
    local = t.cpu() - offset
    inside = (local >= 0) & (local < v)
    lse = torch.logsumexp(z, 1)
    c = coef.double().cpu()
    dz = c[:, :1] * torch.softmax(z, 1) - c[:, 2:] * cw.double().cpu()
    dz[inside, local[inside]] -= c[inside, 1]
    dx = dz * (1 - (z / cap) ** 2)
    is_target = torch.zeros_like(dx, dtype=torch.bool)
    is_target[inside, local[inside]] = True
    tc, tr = cols or v, rows or n
    # each chunk's largest ratio |entry| / |a| off the targets; eps halfway (in log) between the
    # two neighbouring ratios farthest apart, so that no chunk sits near it
    ratios = sorted(float((torch.where(is_target[rs, ks], 0.0, dx[rs, ks]).abs() / c[rs, :1].abs()).max())
                    for rs, ks in _chunks(n, v, tc, tr, chunk))
    _, i = max((ratios[i + 1] / max(ratios[i], 1e-300), i) for i in range(len(ratios) - 1))
    mid = (ratios[i] * ratios[i + 1]) ** 0.5
    for eps, label in ((mid, "mid"), (1e30, "huge"), (1e-30, "tiny")):
        kept = _filtered_reference(dx, is_target, c[:, 0], eps, tc, tr, chunk)
        if label == "mid":
            assert not torch.equal(kept, dx) and not torch.equal(kept, torch.where(is_target, dx, 0.0)), \
                "the case leaves some chunks out and keeps others"
        expected = (kept @ w.double().cpu(), kept.T @ h.double().cpu(), dx.sum(0))
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            grads = torch.ops.fastloss.linear_ce_tile_grads(h, w, b_, t, cw, offset, cap, lse.float().to(dev),
                                                            coef, True, mask, cols, rows, eps)
            for wanted, what, got, exp, like in zip(mask, ("hidden", "weight", "bias"), grads, expected,
                                                    (h, w, b_)):
                if not wanted:
                    assert got.numel() == 0, what
                    continue
                assert got.shape == exp.shape and got.dtype == (torch.float32 if what == "hidden" else like.dtype)
                close(got, exp, dtype, f"{label} eps {mask} grad_{what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev", DEVICES)
def test_low_memory_filter_eps(dev, dtype):
    """The public option: a tiny filter_eps (every entry kept, the targets' entries added apart)
    equals the float64 reference; "auto" on a peaked softmax (hidden near its target's weight
    row) stays within the bound of what it may drop (each dropped entry <= eps |a|: at most
    eps |a| sum_k |w_k| per row of grad_hidden); bad values are refused by name."""
    fused, _, ref_fn = CASES["ce_everything"][:3]
    kw = {"lse_square_scale": 1e-3, "softcap": 3.0}  # (label smoothing is refused: below)
    h, w, t, b, cw = make_inputs(50, 24, 1031, dtype, dev, True, seed=32)
    for reduction in ("mean", "none"):
        up = upstream(t.shape, reduction, dev)
        out, grads = run(fused, h, w, t, b, cw, reduction, up, low_memory=True, filter_eps=1e-30, **kw)
        exp, exp_grads = reference(ref_fn, h, w, t, b, cw, reduction, up, **kw)
        close(out, exp, dtype, f"tiny eps {reduction} loss")
        for what, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
            close(g, e, dtype, f"tiny eps {reduction} grad_{what}", floor=1e-2)
    # peaked: the rows' hidden states point at their targets' weight rows
    tt = torch.where(t < 0, 0, t)
    hp = (w.float()[tt] * 60 + h.float() * 0.05).to(dtype)
    (_, exact), (_, filt) = (run(ops.linear_cross_entropy, hp, w, tt, b, None, "sum", None, low_memory=True,
                                 filter_eps=e) for e in (None, "auto"))
    eps = torch.finfo(dtype).eps / 32
    bound = eps * w.float().abs().sum(0).cpu().double() * 1.0  # a = 1 per row (sum, no options)
    diff = (filt[0].double().cpu() - exact[0].double().cpu()).abs()
    assert (diff <= bound[None, :] + TOL[dtype] * exact[0].double().abs().max().cpu()).all()
    expect_errors([
        (lambda: ops.linear_cross_entropy(h, w, t, filter_eps=1e-3), "applies to low_memory=True"),
        (lambda: ops.linear_cross_entropy(h, w, t, low_memory=True, filter_eps=1e-3, label_smoothing=0.1),
         "cannot be used with label_smoothing"),
        (lambda: fastloss.nn.LinearCrossEntropy(24, 1031, filter_eps=1e-3), "applies to low_memory=True"),
        (lambda: ops.linear_cross_entropy(h, w, t, low_memory=True, filter_eps="yes"), "filter_eps must be None, 'auto'"),
        (lambda: ops.linear_cross_entropy(h, w, t, low_memory=True, filter_eps=-1.0), "finite float >= 0"),
        (lambda: ops.linear_cross_entropy(h, w, t, low_memory=True, filter_eps=float("nan")), "finite float >= 0"),
    ], ValueError)

def _three_losses(h, w, t, b):
    return (ops.linear_cross_entropy(h, w, t, b, label_smoothing=0.1, softcap=5.0)
            + ops.linear_ldr_loss(h, w, t, 0.5, bias=b, adaptive=True, reduction="sum")
            + ops.linear_stablemax_cross_entropy(h, w, t, reduction="none").sum())


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    compiled = torch.compile(_three_losses, fullgraph=True, dynamic=dynamic)
    for n in ((13,) if not dynamic else (13, 22)):
        inputs = make_inputs(n, 10, 31, torch.float32, seed=n)[:4]
        assert_same_runs(lambda h, w, t, bias, **_: compiled(h, w, t, bias), inputs,
                         lambda h, w, t, bias, **_: _three_losses(h, w, t, bias), inputs, "mean")


@pytest.mark.parametrize("dev", DEVICES)
def test_autocast_casts_like_linear(dev):
    h, w, t, b, _ = make_inputs(16, 12, 50, torch.float32, dev, seed=17)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = ops.linear_cross_entropy(*leaves[:2], t, leaves[2])
    assert out.dtype == torch.float32  # as F.cross_entropy after F.linear under autocast
    out.backward()
    exp, exp_grads = run(ops.linear_cross_entropy, h.bfloat16(), w.bfloat16(), t, b.bfloat16(),
                         None, "mean")
    assert exp.dtype == torch.bfloat16
    torch.testing.assert_close(out.to(exp.dtype), exp, rtol=0, atol=0)
    for x, e in zip(leaves, exp_grads):
        assert x.grad.dtype == torch.float32  # the leaves' own dtype, as autocast gives
        torch.testing.assert_close(x.grad, e.float())


def test_module_matches_function_and_shares_linear():
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 40, bias=True)
    loss_mod = fastloss.nn.LinearCrossEntropy.from_linear(head, label_smoothing=0.1)
    assert loss_mod.weight is head.weight and loss_mod.bias is head.bias
    h, _, t, _, _ = make_inputs(15, 12, 40, torch.float32, seed=18)
    out = loss_mod(h, t)
    exp = ops.linear_cross_entropy(h, head.weight, t, head.bias, label_smoothing=0.1)
    torch.testing.assert_close(out, exp)
    out.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    fresh = fastloss.nn.LinearCrossEntropy(12, 40, bias=True, reduction="sum")
    assert fresh.weight.shape == (40, 12) and fresh.bias.shape == (40,)
    state = fresh.state_dict()
    again = fastloss.nn.LinearCrossEntropy(12, 40, bias=True, reduction="sum")
    again.load_state_dict(state)
    torch.testing.assert_close(again(h, t), fresh(h, t))
    # low_memory / filter_eps reach the function (a huge eps leaves only the targets' entries)
    lean = fastloss.nn.LinearCrossEntropy.from_linear(head, low_memory=True, filter_eps=1e30)
    hl, he = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    lean(hl, t).backward()
    ops.linear_cross_entropy(he, head.weight.detach(), t, head.bias.detach(), low_memory=True,
                             filter_eps=1e30).backward()
    torch.testing.assert_close(hl.grad, he.grad)
    ops.linear_cross_entropy(he, head.weight.detach(), t, head.bias.detach()).backward()
    assert not torch.allclose(hl.grad, he.grad - hl.grad), "the filter was not applied"


# ---- bad input --------------------------------------------------------------------------------

def test_bad_input_errors_name_the_argument():
    h, w, t, b, _ = make_inputs(6, 5, 9, torch.float32, seed=19)
    f = ops.linear_cross_entropy
    cases = [
        (lambda: f(h, w[:, :4], t), "weight has 4 columns"),
        (lambda: f(h, w, t[:5]), "target must have hidden's leading shape"),
        (lambda: f(h[0, 0], w[:, :1], t[0]), "hidden must be [..., D] (at least 1-D), got a 0-d tensor"),
        (lambda: f(h, w, t, lse_square_scale=-1.0), "linear_cross_entropy: lse_square_scale must be >= 0"),
        (lambda: torch.ops.fastloss.cross_entropy_loss(h @ w.T, t, None, -100, 1, 0.0, -1.0, 0.0, False, False),
         "lse_square_scale must be >= 0"),
        (lambda: f(h, w.double(), t), "weight is Double but hidden is Float"),
        (lambda: f(h.int(), w.int(), t), "linear_cross_entropy: hidden must be float32"),
        (lambda: ops.linear_comp_sum_loss(h.double(), w.double(), t, tau=0.5),
         "linear_comp_sum_loss: hidden must be float32"),  # (the op called, not its row loss)
        (lambda: f(h, w, t.float()), "target must hold class indices"),
        (lambda: f(h, w, t, b[:3]), "bias must be 1-D with one entry per row of weight (9)"),
        (lambda: f(h, w, t, b.half()), "bias is Half but hidden is Float"),
        (lambda: f(h, w, t, class_weight=torch.ones(4)), "class_weight must be 1-D"),
        (lambda: f(h, w, t, None, -100), "class_weight must be a Tensor or None, got int"),
        (lambda: f(h, w, torch.tensor([0, 1, 2, 9, 0, 1])),
         "linear_cross_entropy: target[3] = 9 is not a class index in [0, 9)"),
        (lambda: f(h, w, t, reduction="avg"), "reduction must be one of"),
        (lambda: f(h, w, t, block_rows=0), "block_rows must be a positive int"),
        (lambda: f(h, w, t, label_smoothing=1.5), "linear_cross_entropy: label_smoothing"),
        (lambda: f(h, w[:0], t[:0] if False else t), "at least one row"),
        (lambda: ops.linear_ldr_loss(h, w, t, lam=0.0), "linear_ldr_loss: lam must be > 0"),
        (lambda: torch.ops.fastloss.linear_loss(h, w, t, None, None, 1, [], -100, 1, 0),
         "expected 1 scalar parameters, got 0"),
        (lambda: torch.ops.fastloss.linear_loss(h, w, t, None, None, 9, [], -100, 1, 0),
         "unknown loss kind"),
        (lambda: torch.ops.fastloss.linear_loss(h, w, t, None, None, 4, [], -100, 3, 0),
         "reduction must be 0 (none), 1 (mean) or 2 (sum)"),
    ]
    expect_errors(cases)


@pytest.mark.parametrize("low_memory", [False, True])
def test_uint8_targets(low_memory):
    """uint8 class indices, as F.cross_entropy takes them: the int64 targets' loss and gradients."""
    h, w, t, b, _ = make_inputs(17, 6, 40, torch.float32, seed=22)
    t = t.clone()
    t[(t < 0) | (torch.arange(17) % 5 == 0)] = 255  # (make_inputs' -100 too)
    outs = []
    for target in (t.to(torch.uint8), t):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = ops.linear_cross_entropy(hh, ww, target, b, ignore_index=255, low_memory=low_memory)
        loss.backward()
        outs.append((loss, hh.grad, ww.grad))
    for got, expected in zip(*outs):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # class 156 with the default ignore_index -100, which a uint8 comparison wraps to 156
    h, w, _, b, _ = make_inputs(5, 6, 200, torch.float32, seed=23)
    t = torch.tensor([156, 3, 156, 199, 0])
    got, expected = (ops.linear_cross_entropy(h, w, target, b, low_memory=low_memory)
                     for target in (t.to(torch.uint8), t))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("low_memory", [False, True])
def test_both_paths_raise_value_error(low_memory):
    """The same bad argument raises ValueError on either path (the default path's C++ checks
    had raised RuntimeError where the tiled path's raise ValueError)."""
    h, w, t, b, _ = make_inputs(6, 5, 9, torch.float32, seed=21)
    f = lambda *a, **k: ops.linear_cross_entropy(*a, low_memory=low_memory, **k)  # noqa: E731
    for call, message in [
            (lambda: f(h, w[:, :4], t), "weight"),
            (lambda: f(h, w.double(), t), "hidden"),
            (lambda: f(h, w, t.float()), "target must hold class indices"),
            (lambda: f(h, w, t, b[:3]), "bias must be"),
            (lambda: f(h, w, t, b.half()), "bias"),
            (lambda: f(h, w, t, class_weight=torch.ones(4)), "class_weight must be 1-D"),
            (lambda: f(h, w, torch.tensor([0, 1, 2, 9, 0, 1])), "target[3] = 9 is not a class index"),
            (lambda: f(h, w[:0], t), "weight")]:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


@requires_cuda
@pytest.mark.cuda
def test_device_mismatch():
    h, w, t, b, _ = make_inputs(6, 5, 9, torch.float32, seed=20)
    with pytest.raises(RuntimeError, match="weight is on cuda"):
        ops.linear_cross_entropy(h, w.cuda(), t)
    with pytest.raises(RuntimeError, match="target is on cuda"):
        ops.linear_cross_entropy(h, w, t.cuda())


# ---- peak memory --------------------------------------------------------------------------------

_PEAK_SETUP = """
import sys, torch.nn.functional as F, fastloss
n, d, v, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g).requires_grad_(True)
w = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_(True)
t = torch.randint(0, v, (n,), generator=g)
# warm up at a small size: libraries and allocator state, not counted
fastloss.ops.linear_cross_entropy(h[:4], w[:64], t[:4] % 64).backward()
F.cross_entropy(F.linear(h[:4], w[:64]), t[:4] % 64).backward()
h.grad = w.grad = None
"""
_PEAK_CALL = """
if mode in ("fused", "tiles"):
    fastloss.ops.linear_cross_entropy(h, w, t, block_rows=int(sys.argv[5]),
                                      low_memory=mode == "tiles").backward()
else:
    F.cross_entropy(F.linear(h, w), t).backward()
"""


def _peak_extra_bytes(*args):
    return peak_extra_bytes(_PEAK_SETUP, _PEAK_CALL, *args)


@requires_proc
def test_peak_memory_is_bounded():
    """The fused op's peak extra memory is one block of logits plus the gradients, far under
    the [N, V] logits; the same measurement sees the unfused graph's logits (so it can fail)."""
    n, d, v, block = 2048, 32, 16384, 128
    logits_bytes = n * v * 4                                   # 128 MiB
    grads_bytes = (n * d + v * d) * 4 * 2                      # results + accumulators
    bound = block * v * 4 + grads_bytes + (24 << 20)           # + 24 MiB of slack
    fused = _peak_extra_bytes(n, d, v, "fused", block)
    eager = _peak_extra_bytes(n, d, v, "eager")
    assert eager > logits_bytes, f"the measurement missed the unfused logits: {eager} B"
    assert fused < bound, f"fused peak extra memory {fused} B > bound {bound} B"
    # low_memory: one [N, tile] float32 tile (here 256 classes) instead of a block of rows
    tiles = _peak_extra_bytes(n, d, v, "tiles", 256)
    tile_bound = n * 256 * 4 + grads_bytes + (24 << 20)
    assert tiles < tile_bound, f"low_memory peak extra memory {tiles} B > bound {tile_bound} B"
