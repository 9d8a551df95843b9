"""The fused classification losses against the float64 references (fastloss.reference) and
F.cross_entropy: forward and backward, every dtype, both CPU kernel paths, awkward sizes,
strided inputs, ignored rows, extreme logits; opcheck, torch.compile, autocast, modules."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import ops
from fastloss import reference as ref

from conftest import requires_cuda

# name -> (fastloss function, reference function, keyword arguments, uses class weights)
CASES = {
    "ce": (ops.cross_entropy, ref.cross_entropy, {}, False),
    "ce_weight_smooth": (ops.cross_entropy, ref.cross_entropy, {"label_smoothing": 0.1}, True),
    "ce_zloss_softcap": (ops.cross_entropy, ref.cross_entropy,
                         {"lse_square_scale": 1e-2, "softcap": 4.0}, False),
    # cap 30 on logits of scale 3: whole vectors on tanh's polynomial side (the fast path)
    "ce_softcap_wide": (ops.cross_entropy, ref.cross_entropy, {"softcap": 30.0}, False),
    "ce_everything": (ops.cross_entropy, ref.cross_entropy,
                      {"label_smoothing": 0.3, "lse_square_scale": 1e-3, "softcap": 2.5}, True),
    "comp_tau0": (ops.comp_sum_loss, ref.comp_sum_loss, {"tau": 0.0}, False),
    "comp_tau0.5": (ops.comp_sum_loss, ref.comp_sum_loss, {"tau": 0.5}, True),
    "comp_tau1": (ops.comp_sum_loss, ref.comp_sum_loss, {"tau": 1.0}, False),
    "comp_tau1.5": (ops.comp_sum_loss, ref.comp_sum_loss, {"tau": 1.5}, False),
    "comp_tau2": (ops.comp_sum_loss, ref.comp_sum_loss, {"tau": 2.0}, True),
    "ldr": (ops.ldr_loss, ref.ldr_loss, {"lam": 1.0, "margin": 1.0}, False),
    "ldr_cold": (ops.ldr_loss, ref.ldr_loss, {"lam": 0.2, "margin": 0.5}, True),
    "aldr": (ops.ldr_loss, ref.ldr_loss, {"lam": 1.0, "margin": 1.0, "adaptive": True}, False),
    "aldr_weight": (ops.ldr_loss, ref.ldr_loss,
                    {"lam": 0.5, "margin": 0.3, "adaptive": True, "alpha": 3.0}, True),
    "zloss": (ops.spherical_z_loss, ref.spherical_z_loss, {"a": 0.7, "b": 1.5}, False),
    "zloss_weight": (ops.spherical_z_loss, ref.spherical_z_loss,
                     {"a": 2.0, "b": 0.5, "eps": 0.0}, True),
    "stablemax": (ops.stablemax_cross_entropy, ref.stablemax_cross_entropy, {}, False),
    "stablemax_weight": (ops.stablemax_cross_entropy, ref.stablemax_cross_entropy, {}, True),
}

# the CPU (default kernel path) and CUDA, for tests where the kernel path matters little
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

# tau = 0 is the sum of exponentials: keep its rows inside float16's range
INPUT_SCALE = {"comp_tau0": 0.5}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C): one element, tiny, under and past 8 AVX2 lanes, past the 1024-class GPU threshold
SHAPES = [(1, 1), (2, 3), (7, 9), (33, 17), (5, 1031), (3, 4099)]
# relative tolerance by dtype: float32 math throughout, then the result is stored in dtype
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(n, c, dtype, device="cpu", weighted=False, ignore_index=-100, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed * 1000 + n * 31 + c)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if n > 2:  # ignore some rows
        target[torch.rand(n, generator=g) < 0.25] = ignore_index
    weight = torch.rand(c, generator=g) + 0.5 if weighted else None
    to = lambda t: None if t is None else t.to(device)
    return to(logits), to(target), to(weight)


def assert_close(actual, expected, dtype, what, scale_tol=1.0):
    """Compare with a tolerance relative to the largest expected magnitude.

    The float64 reference is first rounded to the output's dtype, as the op's float32 result
    is: a value past float16's range is inf in both. The absolute tolerance never goes below
    the dtype's smallest subnormal (rounding a gradient of 2e-8 to float16 moves it by up to
    half of that)."""
    tol = TOL[dtype] * scale_tol
    expected = expected.detach().to(actual.dtype).double().cpu()
    actual = actual.detach().double().cpu()
    finite = expected[torch.isfinite(expected)]
    mag = finite.abs().max().item() if finite.numel() else 1.0
    mag = mag if mag > 0 else 1.0
    smallest_subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    # NaN only where the formula itself is undefined (the Z-loss of one class with eps = 0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=max(tol * mag, smallest_subnormal),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_case(name, n, c, dtype, reduction, device="cpu", ignore_index=-100, logits=None,
               target=None, weight=None, scale_tol=1.0):
    fn, ref_fn, kwargs, weighted = CASES[name]
    if logits is None:
        logits, target, weight = make_inputs(n, c, dtype, device, weighted, ignore_index,
                                             scale=INPUT_SCALE.get(name, 3.0))
    x = logits.detach().clone().requires_grad_(True)
    x64 = logits.detach().double().cpu().requires_grad_(True)
    w64 = None if weight is None else weight.double().cpu()

    out = fn(x, target, weight=weight, ignore_index=ignore_index, reduction=reduction, **kwargs)
    expected = ref_fn(x64, target.cpu(), weight=w64, ignore_index=ignore_index,
                      reduction=reduction, **kwargs)
    assert out.dtype == logits.dtype
    assert out.shape == expected.shape
    assert_close(out, expected, dtype, f"{name} loss", scale_tol)

    if reduction == "none":
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out.backward(up.to(out.dtype).to(out.device))
        expected.backward(up.to(out.dtype).double())
    else:
        out.backward()
        expected.backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert_close(x.grad, x64.grad, dtype, f"{name} grad", scale_tol)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_cpu(name, dtype, shape, reduction, cpu_isa):
    check_case(name, *shape, dtype, reduction)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shape", SHAPES + [(4, 70001)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_cuda(name, dtype, shape, reduction):
    check_case(name, *shape, dtype, reduction, device="cuda", scale_tol=2.0 if shape[1] > 5000 else 1.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_equals_torch(weighted, label_smoothing, reduction, cpu_isa):
    logits, target, weight = make_inputs(19, 37, torch.float32, weighted=weighted, seed=3)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    a = ops.cross_entropy(x1, target, weight=weight, reduction=reduction,
                          label_smoothing=label_smoothing)
    b = F.cross_entropy(x2, target, weight=weight, reduction=reduction,
                        label_smoothing=label_smoothing)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_uint8_targets_as_f_cross_entropy_takes_them(name, device):
    """uint8 class indices (segmentation masks, ignore_index 255), which F.cross_entropy
    accepts for [N, C] logits: the same loss and gradient as the int64 targets, for [N, C] and
    [N, C, H, W] logits (where F.cross_entropy itself wants int64)."""
    fn, _, kwargs, weighted = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    for shape in ((13, 7), (2, 7, 3, 5)):
        x = (3 * torch.randn(*shape, generator=g)).to(device)
        t = torch.randint(0, 7, (shape[0],) + shape[2:], generator=g)
        t.view(-1)[::4] = 255
        w = (torch.rand(7, generator=g) + 0.5).to(device) if weighted else None
        for reduction in ("mean", "none"):
            a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            got = fn(a, t.to(torch.uint8).to(device), weight=w, ignore_index=255, reduction=reduction, **kwargs)
            expected = fn(b, t.to(device), weight=w, ignore_index=255, reduction=reduction, **kwargs)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            got.sum().backward()
            expected.sum().backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # class 156 with the default ignore_index -100, which a uint8 comparison wraps to 156
    x = torch.randn(6, 200, generator=g).to(device)
    t = torch.tensor([156, 3, 156, 199, 0, 156])
    for grad_in_forward in (False, True):
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = fn(a, t.to(torch.uint8).to(device), grad_in_forward=grad_in_forward, **kwargs)
        expected = fn(b, t.to(device), grad_in_forward=grad_in_forward, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        got.backward()
        expected.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"lse_square_scale": 1e-4},
                                     {"grad_in_forward": True}], ids=["plain", "smoothing", "zloss", "in_forward"])
def test_cross_entropy_near_certain_rows_keep_the_target_gradient(options, device):
    """A target almost certain at large logits (loss 1e-5 .. 1e-4, near one float32 step of the
    largest logit): the backward takes z_y - lse less lse's rounding residual, saved by the
    forward, where lse alone moved the target's 1 - p_y by up to half a step (1.5-4.8% off
    on the first three rows, 23% on the last). What remains is the float32 sum 1 + (the
    others' share), ~1.2e-7 absolute (F.cross_entropy has it too; the generic path's
    sequential sum a little more): 0.1% here on the first three, 3% on the last, against
    float64."""
    rows = [(64.0, 52.0), (100.0, 88.0), (40.0, 28.5), (64.0, 50.0)]  # (target, runner-up)
    x = torch.zeros(len(rows), 1000)
    for i, (top, runner_up) in enumerate(rows):
        x[i, 1:] = torch.linspace(runner_up - 88, runner_up, 999)
        x[i, 0] = top
    y = torch.zeros(len(rows), dtype=torch.long)
    a = x.to(device, copy=True).requires_grad_(True)
    loss = ops.cross_entropy(a, y.to(device), reduction="none", **options)
    g, = torch.autograd.grad(loss.sum(), a)
    e = x.double().requires_grad_(True)
    kw = {k: v for k, v in options.items() if k != "grad_in_forward"}
    want = ref.cross_entropy(e, y, reduction="none", **kw)
    ge, = torch.autograd.grad(want.sum(), e)
    for i, rtol in enumerate((5e-3, 5e-3, 5e-3, 5e-2)):
        torch.testing.assert_close(g[i, 0].double().cpu(), ge[i, 0], rtol=rtol, atol=0, msg=lambda m: f"row {i}: {m}")
    torch.testing.assert_close(g.double().cpu(), ge, rtol=5e-2, atol=1e-8)
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=5e-2, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cross_entropy_spatial_and_unbatched_equal_torch(layout, label_smoothing, reduction):
    """F.cross_entropy's [N, C, d1, d2] logits with [N, d1, d2] targets (ignored entries, class
    weights), and unbatched [C] logits with a 0-d target: the same results and gradients as
    F.cross_entropy in float64."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 13, 5, 7, generator=g) * 3
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 13, (3, 5, 7), generator=g)
    target[torch.rand(3, 5, 7, generator=g) < 0.2] = -100
    weight = torch.rand(13, generator=g) + 0.5
    for x, t in ((logits, target), (logits[1, :, 2, 3], target[1, 2, 3].clamp(min=0))):
        x1, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        got = ops.cross_entropy(x1, t, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
        want = F.cross_entropy(x64, t, weight=weight.double(), reduction=reduction,
                               label_smoothing=label_smoothing)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=2e-6)
        up = torch.rand(got.shape, generator=g, dtype=torch.float64) + 0.5
        got.backward(up.float())
        want.backward(up)
        torch.testing.assert_close(x1.grad.double(), x64.grad, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize("name", ["ce_everything", "comp_tau1.5", "aldr_weight", "zloss", "stablemax"])
def test_spatial_logits(name, device):
    """Every row loss takes [N, C, d1, ...] logits as rows of classes: against its float64
    reference on the classes moved last by the test itself; reduction "none" keeps [N, d1, ...];
    a target of the wrong shape is named."""
    fn, ref_fn, kwargs, weighted = CASES[name]
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 9, 4, 3, generator=g) * 3
    target = torch.randint(0, 9, (2, 4, 3), generator=g)
    target[0, 1] = -100
    weight = torch.rand(9, generator=g) + 0.5 if weighted else None
    dev_w = None if weight is None else weight.to(device)
    for reduction in ("none", "mean"):
        x1 = logits.to(device, copy=True).requires_grad_(True)
        x64 = logits.double().requires_grad_(True)
        got = fn(x1, target.to(device), weight=dev_w, reduction=reduction, **kwargs)
        rows64 = x64.permute(0, 2, 3, 1).reshape(-1, 9)
        want = ref_fn(rows64, target.reshape(-1), weight=None if weight is None else weight.double(),
                      reduction=reduction, **kwargs)
        if reduction == "none":
            want = want.reshape(2, 4, 3)
        assert got.shape == want.shape
        assert_close(got, want, torch.float32, f"{name} {reduction} loss")
        up = torch.rand(got.shape, generator=g, dtype=torch.float64) + 0.5
        got.backward(up.float().to(device))
        want.backward(up)
        assert_close(x1.grad, x64.grad, torch.float32, f"{name} {reduction} grad")
    with pytest.raises(ValueError, match=r"target must be \[2, 4, 3\] for logits of shape"):
        fn(logits, target[:, :3], weight=weight, **kwargs)
    with pytest.raises(ValueError, match="unbatched logits \\[C\\] take a 0-d target"):
        fn(logits[0, :, 0, 0], target[0, 0], weight=weight, **kwargs)


def test_spatial_logits_compile():
    from checks import assert_compiled_matches

    g = torch.Generator().manual_seed(13)
    x, t = torch.randn(2, 7, 3, 4, generator=g), torch.randint(0, 7, (2, 3, 4), generator=g)
    assert_compiled_matches(lambda a: ops.cross_entropy(a, t, reduction="none").sum()
                            + ops.ldr_loss(a, t, 1.0) + ops.cross_entropy(a[0, :, 1, 1], t[0, 1, 1]), [x])


@pytest.mark.parametrize("name", ["ce", "ce_everything", "comp_tau1.5", "aldr", "zloss", "stablemax"])
def test_ignore_index_that_is_a_class(name, device):
    logits, target, weight = make_inputs(23, 11, torch.float32, device, weighted=CASES[name][3],
                                         seed=5, ignore_index=0)
    target[::3] = 0  # rows of class 0 are ignored when ignore_index = 0
    check_case(name, 0, 0, torch.float32, "mean", device, ignore_index=0, logits=logits,
               target=target, weight=weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["row_strided", "transposed", "one_row_view"])
@pytest.mark.parametrize("name", ["ce_everything", "comp_tau0.5", "aldr_weight", "zloss", "stablemax"])
def test_non_contiguous_logits(name, layout, dtype, device):
    n, c = 13, 29
    g = torch.Generator().manual_seed(11)
    if layout == "row_strided":  # rows further apart than C
        logits = (torch.randn(n, c + 7, generator=g) * 3).to(dtype)[:, 3:3 + c]
    elif layout == "transposed":  # classes not contiguous
        logits = (torch.randn(c, n, generator=g) * 3).to(dtype).t()
    else:
        logits = (torch.randn(4, c, generator=g) * 3).to(dtype)[2:3]
        n = 1
    target = torch.randint(0, c, (n,), generator=g)
    weight = torch.rand(c, generator=g) + 0.5 if CASES[name][3] else None
    # .to() keeps the strides: the same layouts reach the CUDA kernels
    to = lambda t: None if t is None else t.to(device)
    check_case(name, n, c, dtype, "none", device, logits=to(logits), target=to(target),
               weight=to(weight))


@pytest.mark.parametrize("name", ["ce", "ce_everything", "comp_tau1", "comp_tau2", "ldr", "aldr",
                                  "stablemax", "zloss"])
def test_extreme_logits(name, device):
    """Logits of +-1e4 and -inf masked classes: finite results that match the reference."""
    g = torch.Generator().manual_seed(13)
    n, c = 9, 40
    logits = torch.randn(n, c, generator=g) * 3
    logits[:, ::5] = 1e4
    logits[:, 1::7] = -1e4
    target = torch.randint(0, c, (n,), generator=g)
    if name != "zloss":  # the Z-loss's mean and variance of a row with -inf are undefined
        mask = torch.rand(n, c, generator=g) < 0.2
        mask[torch.arange(n), target] = False
        logits[mask] = -math.inf
    fn, ref_fn, kwargs, _ = CASES[name]
    x = logits.to(device, copy=True).requires_grad_(True)
    x64 = logits.double().requires_grad_(True)
    out = fn(x, target.to(device), reduction="none", **kwargs).cpu()
    expected = ref_fn(x64, target, reduction="none", **kwargs)
    assert torch.isfinite(out).all(), out
    # float32 logits of 1e4 are only known to about 1e-3, so the tolerance is absolute
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=5e-3)
    out.sum().backward()
    expected.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-4)


VECTOR_ISAS = [isa for isa in fastloss.cpu_isas() if isa not in ("generic", "amx")]


@pytest.mark.skipif(not VECTOR_ISAS, reason="this CPU has no AVX2")
@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("name", ["ce", "comp_tau1.5", "ldr", "aldr"])  # (a soft-cap bounds the spread)
def test_wide_logits_give_no_subnormals(name, isa):
    """Logits spread over hundreds: never a subnormal gradient for a class k != y (each costs
    a microcode assist in every x86 operation that takes it: 7-12x slower rows), and the
    results still match the float64 reference. (The kernels' flush-to-zero mode alone would
    zero a subnormal result; the vector exp's own flushing and the backward's factor in the
    exponent keep the arithmetic before it free of subnormals, which a result cannot show.)"""
    fastloss.set_cpu_isa(isa)
    try:
        g = torch.Generator().manual_seed(17)
        logits = torch.randn(37, 211, generator=g) * 60
        target = torch.randint(0, 211, (37,), generator=g)
        fn, ref_fn, kwargs, _ = CASES[name]
        x = logits.clone().requires_grad_(True)
        x64 = logits.double().requires_grad_(True)
        out = fn(x, target, reduction="mean", **kwargs)
        expected = ref_fn(x64, target, reduction="mean", **kwargs)
        out.backward()
        expected.backward()
        torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        tiny = torch.finfo(torch.float32).tiny
        others = x.grad.scatter(1, target[:, None], 1.0)  # (the target's own term is scalar code)
        nonzero = others[others != 0].abs()
        assert (nonzero >= tiny).all(), f"subnormal gradients: {nonzero[nonzero < tiny][:5]}"
        assert ((x64.grad != 0) & (x64.grad.abs() < tiny)).any(), \
            "the test needs nonzero gradients below the normal range"
    finally:
        fastloss.set_cpu_isa("auto")


def test_subnormal_mode_of_the_caller_is_kept():
    """The kernels flush subnormals for their own call only: afterwards torch's arithmetic on
    this thread and on its worker threads still makes subnormals."""
    x = torch.randn(4096, 257, requires_grad=True)
    ops.cross_entropy(x, torch.randint(0, 257, (4096,))).backward()
    tiny = torch.full((1 << 20,), 3e-39)  # subnormal, and so is half of it
    assert (tiny * 0.5 > 0).all()
    assert (tiny.view(-1, 1024).sum(1) > 3e-39 * 1000).all()


def test_huge_vocabulary(device):
    """C past a million: float32 accumulation over long rows."""
    check_case("ce_weight_smooth", 2, (1 << 20) + 3, torch.float32, "mean", device, scale_tol=5.0)
    check_case("zloss", 2, (1 << 20) + 3, torch.float32, "none", device, scale_tol=5.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dev", DEVICES)
def test_empty_batch_and_all_ignored(name, reduction, dev):
    fn, _, kwargs, _ = CASES[name]
    logits = torch.randn(0, 5, device=dev, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=dev)
    out = fn(logits, target, reduction=reduction, **kwargs)
    expected = F.cross_entropy(logits, target, reduction=reduction)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, equal_nan=True)
    out.sum().backward()
    assert logits.grad.shape == (0, 5)

    logits = torch.randn(4, 5, device=dev, requires_grad=True)
    target = torch.full((4,), -100, device=dev)
    out = fn(logits, target, reduction=reduction, **kwargs)
    expected = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(out, expected, equal_nan=True)
    (out.nansum() if reduction == "mean" else out.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros(4, 5, device=dev))


@pytest.mark.parametrize("isa", [i for i in fastloss.cpu_isas() if i != "generic"])
def test_vector_paths_agree_with_generic(isa):
    logits, target, weight = make_inputs(31, 2053, torch.bfloat16, weighted=True, seed=9)
    results = {}
    for name in ("generic", isa):
        fastloss.set_cpu_isa(name)
        x = logits.clone().requires_grad_(True)
        loss = ops.cross_entropy(x, target, weight=weight, label_smoothing=0.1, softcap=5.0,
                                 reduction="sum")
        loss.backward()
        results[name] = (loss.float(), x.grad.float())
    fastloss.set_cpu_isa("auto")
    torch.testing.assert_close(results["generic"][0], results[isa][0], rtol=1e-5, atol=0)
    # gradients are rounded to bfloat16 from float32 values a few ulp apart
    torch.testing.assert_close(results["generic"][1], results[isa][1], rtol=8e-3, atol=1e-6)


# ---- the torch integration: opcheck, compile, autocast, modules -----------------------------

def _op_samples(dev):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 11, generator=g).to(dev)
    target = torch.tensor([0, 3, -100, 10, 5, 5], device=dev)
    weight = (torch.rand(11, generator=g) + 0.5).to(dev)
    return [
        ("cross_entropy", (-100, 0.1, 1e-3, 3.0)),
        ("comp_sum", (-100, 0.7)),
        ("ldr", (-100, 0.5, 1.0, True, 2.0)),
        ("spherical_z", (-100, 1.0, 2.0, 1e-6)),
        ("stablemax", (-100,)),
    ], logits, target, weight


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(with_weight, dev):
    samples, logits, target, weight = _op_samples(dev)
    w = weight if with_weight else None
    for name, scalars in samples:
        fwd = getattr(torch.ops.fastloss, f"{name}_forward").default
        bwd = getattr(torch.ops.fastloss, f"{name}_backward").default
        x = logits.clone().requires_grad_(True)
        torch.library.opcheck(fwd, (x, target, w, *scalars))
        _, s0, s1 = fwd(logits, target, w, *scalars)
        torch.library.opcheck(bwd, (torch.rand(6, device=dev), logits, target, w, s0, s1, *scalars))
        bwd_ = getattr(torch.ops.fastloss, f"{name}_backward_").default
        torch.library.opcheck(bwd_, (torch.rand(6, device=dev), logits.clone(), target, w, s0, s1,
                                     *scalars))
        x = logits.clone().requires_grad_(True)
        torch.library.opcheck(fwd, (x, target, w, *scalars, True))
        fwd_grad = getattr(torch.ops.fastloss, f"{name}_forward_grad").default
        torch.library.opcheck(fwd_grad, (torch.rand(6, device=dev), logits, target, w, *scalars))
        fwd_grad_ = getattr(torch.ops.fastloss, f"{name}_forward_grad_").default
        torch.library.opcheck(fwd_grad_, (torch.rand(6, device=dev), logits.clone(), target, w, *scalars))
        # the in-place one's loss and gradient are the out-of-place one's
        g = torch.rand(6, device=dev)
        made, over = fwd_grad(g, logits, target, w, *scalars), logits.clone()
        rows = fwd_grad_(g, over, target, w, *scalars)
        torch.testing.assert_close(rows[0], made[0])
        torch.testing.assert_close(over, made[3])
        # the eager path's op: forward, reduction (0 none, 1 mean, 2 sum) and C++ autograd
        loss_op = getattr(torch.ops.fastloss, f"{name}_loss").default
        for reduction in (0, 1, 2):
            x = logits.clone().requires_grad_(True)
            torch.library.opcheck(loss_op, (x, target, w, scalars[0], reduction, *scalars[1:]))


def _all_losses(x, t, w):
    return (ops.cross_entropy(x, t, weight=w, label_smoothing=0.1, softcap=4.0)
            + ops.comp_sum_loss(x, t, 1.5, reduction="sum")
            + ops.ldr_loss(x, t, 0.5, adaptive=True).mul(2)
            + ops.spherical_z_loss(x, t, 1.0, 2.0, weight=w)
            + ops.stablemax_cross_entropy(x, t, reduction="none").sum())


def _check_compiled(compiled, logits, target, weight):
    """The compiled _all_losses against the eager one: value and logits gradient."""
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    a = compiled(x1, target, weight)
    b = _all_losses(x2, target, weight)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_torch_compile_fullgraph():
    compiled = torch.compile(_all_losses, fullgraph=True)
    _check_compiled(compiled, *make_inputs(9, 13, torch.float32, weighted=True, seed=4))


def test_torch_compile_dynamic_batch():
    """A compiled graph with a symbolic batch size gives eager's results at two batch sizes
    (that it is one graph, without recompiling, is checked per loss by test_compile_dynamic.py)."""
    compiled = torch.compile(_all_losses, fullgraph=True, dynamic=True)
    for n in (9, 17):
        _check_compiled(compiled, *make_inputs(n, 13, torch.float32, weighted=True, seed=n))


@pytest.mark.parametrize("dev", DEVICES)
def test_autocast(dev):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10).to(dev)
    h = torch.randn(8, 16, device=dev)
    t = torch.randint(0, 10, (8,), device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16):
        logits = lin(h)
        assert logits.dtype == torch.bfloat16
        loss = ops.cross_entropy(logits, t)
    assert loss.dtype == torch.float32  # as F.cross_entropy under autocast
    loss.backward()
    expected = ref.cross_entropy(logits.detach().double(), t)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_modules_match_functions():
    logits, target, weight = make_inputs(12, 7, torch.float32, weighted=True, seed=6)
    pairs = [
        (fastloss.nn.CrossEntropyLoss(weight, label_smoothing=0.1, softcap=3.0),
         ops.cross_entropy(logits, target, weight, label_smoothing=0.1, softcap=3.0)),
        (fastloss.nn.CompSumLoss(0.5, weight), ops.comp_sum_loss(logits, target, 0.5, weight)),
        (fastloss.nn.LDRLoss(0.7, adaptive=True, weight=weight),
         ops.ldr_loss(logits, target, 0.7, adaptive=True, weight=weight)),
        (fastloss.nn.SphericalZLoss(1.0, 2.0, weight=weight),
         ops.spherical_z_loss(logits, target, 1.0, 2.0, weight=weight)),
        (fastloss.nn.StableMaxCrossEntropyLoss(weight), ops.stablemax_cross_entropy(logits, target, weight)),
    ]
    for module, expected in pairs:
        torch.testing.assert_close(module(logits, target), expected)
        state = module.state_dict()
        assert torch.equal(state["weight"], weight)
    # the opt-in gradient paths reach the functions: the gradient written over the logits
    module = fastloss.nn.CrossEntropyLoss(weight, grad_in_forward=True, inplace_backward=True)
    z = logits.clone().requires_grad_(True) * 1.0
    loss = module(z, target)
    x = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.cross_entropy(x, target, weight), x)
    torch.testing.assert_close(z.detach(), want)  # written by the forward already
    assert loss.grad_fn is not None


@pytest.mark.parametrize("name", ["ce_everything", "comp_tau0.5", "aldr_weight", "zloss", "stablemax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward(name, dtype, device):
    """The opt-in in-place backward gives the same gradient, written over the logits."""
    fn, _, kwargs, weighted = CASES[name]
    logits, target, weight = make_inputs(21, 37, dtype, device, weighted=weighted, seed=8)
    h = torch.randn(21, 5, dtype=dtype, device=device, requires_grad=True)
    proj = torch.randn(5, 37, dtype=dtype, device=device)
    wide = torch.zeros(21, 40, dtype=dtype, device=device)

    def grads(inplace):
        h.grad = None
        z = h @ proj + logits                    # logits as an intermediate of the graph
        z = torch.narrow(wide.clone(), 1, 0, 37).add_(z)  # and with a row stride != C
        z.retain_grad()
        loss = fn(z, target, weight=weight, reduction="sum", inplace_backward=inplace, **kwargs)
        loss.backward()
        return z, loss, h.grad.clone()

    z1, l1, g1 = grads(False)
    z2, l2, g2 = grads(True)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g2, g1, rtol=TOL[dtype], atol=TOL[dtype])
    # the logits now hold the gradient that reached them
    torch.testing.assert_close(z2.detach(), z1.grad, rtol=TOL[dtype], atol=TOL[dtype])


def test_inplace_backward_protects_saved_logits():
    """Autograd refuses the overwrite when another op saved the logits for its backward."""
    logits = torch.randn(6, 9, requires_grad=True)
    target = torch.randint(0, 9, (6,))
    z = logits * 1.0
    other = (z * z).sum()  # saves z
    loss = ops.cross_entropy(z, target, inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_with_strided_classes():
    """Logits whose classes are not contiguous are copied once; the copy takes the gradient."""
    base = torch.randn(6, 9)
    logits = base.t().requires_grad_(True)  # [9, 6], classes 9 apart
    target = torch.randint(0, 6, (9,))
    (g_inplace,) = torch.autograd.grad(ops.cross_entropy(logits, target, inplace_backward=True), logits)
    (g_plain,) = torch.autograd.grad(F.cross_entropy(logits, target), logits)
    torch.testing.assert_close(g_inplace, g_plain)
    assert torch.equal(logits.detach(), base.t())  # the caller's tensor is untouched


def test_raw_inplace_op_needs_contiguous_classes():
    logits = torch.randn(6, 9).t()
    target = torch.randint(0, 6, (9,))
    _, s0, s1 = torch.ops.fastloss.cross_entropy_forward(logits, target, None, -100, 0., 0., 0.)
    with pytest.raises(RuntimeError, match="writing the gradient over the logits needs logits whose classes are contiguous"):
        torch.ops.fastloss.cross_entropy_backward_(torch.ones(9), logits, target, None, s0, s1,
                                                   -100, 0., 0., 0.)


def test_inplace_backward_compiles():
    logits, target, _ = make_inputs(9, 13, torch.float32, seed=12)
    h = torch.randn(9, 4, requires_grad=True)
    proj = torch.randn(4, 13)

    def f(h):
        return ops.cross_entropy(h @ proj + logits, target, softcap=3.0, inplace_backward=True)

    a = torch.compile(f, fullgraph=True)(h)
    a.backward()
    g_compiled = h.grad.clone()
    h.grad = None
    f(h).backward()
    torch.testing.assert_close(g_compiled, h.grad)


@pytest.mark.parametrize("name", ["ce_everything", "comp_tau0.5", "comp_tau1.5", "ldr_cold", "aldr",
                                  "zloss", "stablemax"])
def test_no_nan_at_any_magnitude(name, device):
    """Finite logits up to 1e30 give no NaN in the loss or the gradient."""
    fn, _, kwargs, weighted = CASES[name]
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(6, 50, generator=g) * torch.tensor([1e-30, 1.0, 1e10, 1e20, 1e30, -1e30])[:, None]
    target = torch.randint(0, 50, (6,), generator=g)
    x = logits.to(device, copy=True).requires_grad_(True)
    out = fn(x, target.to(device), reduction="none", **kwargs)
    out.sum().backward()
    assert not torch.isnan(out).any(), out
    assert not torch.isnan(x.grad).any()


@pytest.mark.parametrize("C", [4, 37, 1000])
@pytest.mark.parametrize("name", ["ce", "ce_everything", "comp_tau0.5", "comp_tau1.5", "ldr_cold",
                                  "aldr", "zloss", "stablemax"])
def test_nan_logit_gives_a_nan_row(name, C, device):
    """A NaN logit (at the target, first, or elsewhere in the row, in a vector's body or its
    tail) makes that row's loss and its whole gradient row NaN, as the formulas (and the
    references) do; the other rows are untouched. StableMax had dropped it: the scalar min /
    max chose the other operand when the data was NaN."""
    fn, _, kwargs, weighted = CASES[name]
    g = torch.Generator().manual_seed(22 + C)
    logits = torch.randn(5, C, generator=g) * 3
    target = torch.randint(1, C, (5,), generator=g)
    target[4] = 0
    logits[0, target[0]] = float("nan")       # at the target
    logits[1, 0] = float("nan")                # first class
    logits[2, C - 1] = float("nan")            # last class (a tail lane when C % width != 0)
    logits[4, 0] = float("nan")                # first class, which is the target
    x = logits.to(device, copy=True).requires_grad_(True)
    out = fn(x, target.to(device), reduction="none", **kwargs)
    out.sum().backward()
    nan_rows = torch.tensor([True, True, True, False, True])
    assert out.isnan().cpu().equal(nan_rows), out
    assert x.grad.isnan().cpu().all(1).equal(nan_rows) and x.grad[3].isfinite().all(), x.grad
    clean = logits[3:4].to(device, copy=True).requires_grad_(True)
    alone = fn(clean, target[3:4].to(device), reduction="none", **kwargs)
    alone.sum().backward()
    torch.testing.assert_close(out[3:4], alone)
    torch.testing.assert_close(x.grad[3:4], clean.grad)


# ---- CUDA-only behaviour (skipped without a GPU) --------------------------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["ce_everything", "comp_tau0.5", "aldr_weight", "zloss", "stablemax"])
def test_cuda_inplace_strided_and_ignored(name):
    fn, ref_fn, kwargs, weighted = CASES[name]
    logits, target, weight = make_inputs(37, 2500, torch.bfloat16, "cuda", weighted, seed=31)
    wide = torch.zeros(37, 2600, dtype=torch.bfloat16, device="cuda")
    z = wide[:, 50:2550].copy_(logits).requires_grad_(False)  # row stride 2600
    for inplace in (False, True):
        x = z.detach().requires_grad_(True)
        # plain: the row-strided view itself; in place: an intermediate (not a leaf's storage)
        h = x * 1 if inplace else x
        out = fn(h, target, weight=weight, reduction="sum", inplace_backward=inplace, **kwargs)
        (g,) = torch.autograd.grad(out, x)
        x64 = logits.double().cpu().requires_grad_(True)
        w64 = None if weight is None else weight.double().cpu()
        expected = ref_fn(x64, target.cpu(), weight=w64, reduction="sum", **kwargs)
        expected.backward()
        assert_close(out, expected, torch.bfloat16, f"{name} cuda loss")
        assert_close(g, x64.grad, torch.bfloat16, f"{name} cuda grad (inplace={inplace})")


@requires_cuda
@pytest.mark.cuda
def test_cuda_out_of_range_target_gives_nan_row():
    logits = torch.randn(4, 10, device="cuda", requires_grad=True)
    target = torch.tensor([1, 10, -100, 3], device="cuda")
    rows = ops.cross_entropy(logits, target, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 3]]).all() and rows[2] == 0
    rows.nansum().backward()
    assert torch.isnan(logits.grad[1]).all() and torch.isfinite(logits.grad[[0, 2, 3]]).all()


@requires_cuda
@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    compiled = torch.compile(_all_losses, fullgraph=True)
    _check_compiled(compiled, *make_inputs(9, 1300, torch.float32, "cuda", weighted=True, seed=4))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dev", DEVICES)
def test_no_grad_and_inference_mode(reduction, dev):
    """Without autograd (no_grad, inference_mode) the op takes its plain kernels: same values."""
    logits, target, weight = make_inputs(11, 23, torch.float32, dev, weighted=True, seed=17)
    x = logits.clone().requires_grad_(True)
    with_grad = ops.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.2)
    with torch.no_grad():
        no_grad = ops.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.2)
    with torch.inference_mode():
        inference = ops.cross_entropy(logits, target, weight=weight, reduction=reduction,
                                      label_smoothing=0.2)
    assert with_grad.requires_grad and not no_grad.requires_grad
    torch.testing.assert_close(no_grad, with_grad.detach())
    torch.testing.assert_close(inference, with_grad.detach())


@pytest.mark.parametrize("dev", DEVICES)
def test_backward_twice(dev):
    """retain_graph: a second backward adds the same gradient again; after an in-place backward
    the saved logits hold the gradient, and a second backward raises instead of reading it."""
    logits, target, _ = make_inputs(6, 13, torch.float32, dev, seed=19)
    x = logits.clone().requires_grad_(True)
    loss = ops.cross_entropy(x, target, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)

    # the in-place modes: the op's own error, naming it, for a second backward and for a
    # double backward (which runs the first backward again)
    for kw in (dict(inplace_backward=True), dict(inplace_backward=True, grad_in_forward=True)):
        h = logits.clone().requires_grad_(True)
        loss = ops.cross_entropy(h * 1.0, target, **kw)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="cross_entropy: a second backward"):
            loss.backward()
        h = logits.clone().requires_grad_(True)
        loss = ops.cross_entropy(h * 1.0, target, **kw)
        (g,) = torch.autograd.grad(loss, h, create_graph=True)
        # (the op's refusal of a second run, or of differentiating its gradient: whichever node
        # the engine reaches first; never torch's anonymous in-place error)
        with pytest.raises(RuntimeError, match="cross_entropy: (a second backward or a double|double) backward"):
            (loss + g.pow(2).sum()).backward()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_grad_in_forward(name, dtype, reduction, device):
    """grad_in_forward=True (the gradient made with the forward, one pass over the logits) gives
    the loss and gradient of the default path, for an incoming gradient of 1 and of anything else."""
    fn, _, kwargs, weighted = CASES[name]
    logits, target, weight = make_inputs(13, 1031, dtype, device, weighted, seed=23,
                                         scale=INPUT_SCALE.get(name, 3.0))
    for upstream in ("ones", "random"):
        grads, losses = [], []
        # the default path; grad_in_forward; both with inplace_backward (the gradient written
        # over the logits, here the output of a layer: x * 1)
        for fused, inplace in ((False, False), (True, False), (True, True)):
            x = logits.clone().requires_grad_(True)
            z = x * 1.0 if inplace else x
            out = fn(z, target, weight=weight, reduction=reduction, grad_in_forward=fused,
                     inplace_backward=inplace, **kwargs)
            up = torch.ones_like(out)
            if upstream == "random":
                up = torch.rand(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
            out.backward(up)
            losses.append(out.detach())
            grads.append(x.grad)
            if inplace and upstream == "ones":  # the logits hold the gradient (made for 1)
                assert_close(z.detach(), grads[0].float(), dtype, f"{name} logits overwritten")
        for k, what in ((1, "fused"), (2, "fused in place")):
            torch.testing.assert_close(losses[k], losses[0], equal_nan=True)
            assert_close(grads[k], grads[0].float(), dtype, f"{name} {upstream} {what} grad")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_grad_in_forward_retained_graph(reduction, device):
    """grad_in_forward's backward on the CPU returns the saved gradient, or a scaled copy: a
    second backward through the retained graph gives the same, and loss.backward() twice
    accumulates twice the default path's gradient. On CUDA the saved gradient is scaled in
    place (no host synchronisation): a second backward raises the op's error (the first, from
    a GPU run at f95b002, raised torch's anonymous in-place error)."""
    logits, target, _ = make_inputs(11, 1031, torch.float32, device, False, seed=29)
    up = None
    grads = []
    for fused in (False, True):
        x = logits.clone().requires_grad_(True)
        out = ops.cross_entropy(x, target, reduction=reduction, grad_in_forward=fused)
        if up is None:
            up = torch.rand(out.shape, generator=torch.Generator().manual_seed(5)).to(out) + 0.5
        (first,) = torch.autograd.grad(out, x, up, retain_graph=True)
        kept = first.clone()
        if fused and device == "cuda":
            torch.testing.assert_close(kept, grads[0][0])
            with pytest.raises(RuntimeError, match="cross_entropy: a second backward"):
                torch.autograd.grad(out, x, up, retain_graph=True)
            return
        (second,) = torch.autograd.grad(out, x, up, retain_graph=True)
        torch.testing.assert_close(first, kept)
        torch.testing.assert_close(second, kept)
        out.backward(up, retain_graph=True)
        out.backward(up)
        grads.append((kept, x.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], 2 * grads[0][0])


@pytest.mark.parametrize("fused", [False, True], ids=["inplace_backward", "both"])
def test_gradient_over_the_logits_edge_cases(fused):
    """Writing the gradient over the logits (inplace_backward, alone or with grad_in_forward):
    rows that overlap in memory (an expanded tensor) are copied first; a bad target is found
    before any row is overwritten; an incoming gradient other than 1 scales the logits in place
    (no [N, C] allocation); autograd.grad hands back their storage, not the tensor itself."""
    g = torch.Generator().manual_seed(31)
    kw = dict(inplace_backward=True, grad_in_forward=fused)
    row = torch.randn(1, 40, generator=g)
    t = torch.randint(0, 40, (6,), generator=g)
    x = row.clone().requires_grad_(True)
    loss = ops.cross_entropy(x.expand(6, 40), t, **kw)
    x64 = row.double().requires_grad_(True)
    want = F.cross_entropy(x64.expand(6, 40), t)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-6, atol=0)
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-5, atol=1e-7)

    logits = torch.randn(64, 9, generator=g)
    bad = torch.randint(0, 9, (64,), generator=g)
    bad[40] = 9
    z = (logits.clone().requires_grad_(True)) * 1.0
    with pytest.raises(RuntimeError, match=r"target\[40\] = 9 is not a class index"):
        ops.cross_entropy(z, bad, **kw)
    assert torch.equal(z, logits)  # nothing written

    target = bad.clamp(max=8)
    x = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ops.cross_entropy(x, target) * 0.25, x)
    z = logits.clone().requires_grad_(True) * 1.0
    seen = []
    z.register_hook(lambda grad: seen.append(grad))
    (ops.cross_entropy(z, target, **kw) * 0.25).backward()
    assert seen[0].data_ptr() == z.data_ptr()  # scaled where it lies
    torch.testing.assert_close(seen[0], want)
    z = logits.clone().requires_grad_(True) * 1.0
    (got,) = torch.autograd.grad(ops.cross_entropy(z, target, **kw), z)
    assert got is not z and not got.requires_grad and got.data_ptr() == z.data_ptr()


def test_grad_in_forward_checks():
    logits, target, _ = make_inputs(4, 7, torch.float32)
    x = logits.requires_grad_(True)
    # with inplace_backward the forward writes the gradient over the logits: an op that saved
    # them for its own backward raises instead of reading gradients
    z = x * 1.0
    other = z.sin()
    loss = ops.cross_entropy(z, target, inplace_backward=True, grad_in_forward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other.sum()).backward()
    with torch.no_grad():  # nothing to differentiate: the plain forward, no gradient made
        torch.testing.assert_close(ops.cross_entropy(x, target, grad_in_forward=True),
                                   ops.cross_entropy(x, target))
