"""The order-based distillation losses (top-k KL, Plackett-Luce) against float64 references
written from their definitions (fastloss.reference.distill: ranks by counting, masks instead of
gathers): loss and the student's gradient on every CPU kernel path, dtype and reduction, awkward
sizes, tied teacher logits, strided and extreme inputs; the torch formulas the CUDA path uses;
opcheck, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

from fastloss import ops
from fastloss.ops import distill as distill_ops
from fastloss.reference import distill as ref
from checks import assert_compiled_matches, assert_matches_reference, expect_errors

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C): one class; short rows (std::sort); rows past 1024 classes (the radix sort)
SHAPES = [(1, 1), (3, 7), (5, 33), (4, 1031), (2, 2500)]


def make(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed * 977 + n * 31 + c)
    s = (torch.randn(n, c, generator=g) * scale).to(dtype)
    t = (torch.randn(n, c, generator=g) * scale + 0.3 * s.float()).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    if n > 2:
        y[1] = -100  # an ignored row
    return s, t, y


def compare(fn, ref_fn, student, what):
    assert_matches_reference(fn, ref_fn, [student], TOL[student.dtype], what)


def ks(c):
    return sorted({1, min(5, c), max(1, c // 3), c})


@pytest.mark.parametrize("renormalize", [False, True], ids=["full", "renorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_kl_matches_reference(dtype, shape, renormalize, device):
    s, t, _ = (v.to(device) for v in make(*shape, dtype))
    for k in ks(shape[1]):
        for reduction in ("mean", "sum", "none"):
            compare(lambda x: ops.topk_kl_loss(x, t, k, 2.0, renormalize, reduction),
                    lambda x: ref.topk_kl_loss(x, t, k, 2.0, renormalize, reduction),
                    s, f"k={k} {shape} {dtype} {reduction}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pld_matches_reference(dtype, shape, reduction, device):
    s, t, y = (v.to(device) for v in make(*shape, dtype))
    for T in (0.5, 2.0):
        compare(lambda x: ops.pld_loss(x, t, y, T, reduction=reduction),
                lambda x: ref.pld_loss(x, t, y, T, reduction=reduction), s,
                f"T={T} {shape} {dtype} {reduction}")


@pytest.mark.parametrize("c", [40, 3000])
def test_tied_teacher_logits_break_towards_the_lower_class(c, device):
    """bfloat16 teachers of a few distinct values: every selection and ranking is full of ties,
    and the result must follow the documented rule (the reference ranks by counting)."""
    s, _, y = (v.to(device) for v in make(3, c, torch.bfloat16, seed=5))
    t = torch.randint(-3, 4, (3, c), generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    for k in (1, 7, c // 2):
        compare(lambda x: ops.topk_kl_loss(x, t, k, 1.0), lambda x: ref.topk_kl_loss(x, t, k, 1.0),
                s, f"topk k={k}")
    compare(lambda x: ops.pld_loss(x, t, y), lambda x: ref.pld_loss(x, t, y), s, "pld")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_select_by_a_sampled_threshold(dtype, device):
    """C >= 4096 and k <= C / 8: a threshold from 1024 sampled logits, one vector pass keeping
    the classes above it, the exact selection among those (bfloat16: many ties at the k-th)."""
    s, t, _ = (v.to(device) for v in make(3, 5003, dtype, seed=8))
    for k in (1, 7, 100, 5003 // 8):
        compare(lambda x: ops.topk_kl_loss(x, t, k, 1.5), lambda x: ref.topk_kl_loss(x, t, k, 1.5),
                s, f"topk k={k}")


def test_sampled_threshold_falls_back_when_the_sample_misleads(device):
    """The sampled logits (every 16th class of 16384) are the row's largest, so the threshold
    keeps 1024 classes where k = 2000 are needed: the histogram selection must take over. A NaN
    among the sampled logits (a NaN threshold) falls back too; the row's loss is then NaN."""
    c, k = 16384, 2000
    s, _, _ = (v.to(device) for v in make(1, c, torch.float32, seed=9))
    t = torch.randn(1, c, generator=torch.Generator().manual_seed(2)) - 10.0
    t[:, ::16] += 20.0
    t = t.to(device)
    compare(lambda x: ops.topk_kl_loss(x, t, k, 1.0), lambda x: ref.topk_kl_loss(x, t, k, 1.0),
            s, "topk past a misleading sample")
    t_nan = t.clone()
    t_nan[0, 16 * 7] = float("nan")
    assert ops.topk_kl_loss(s, t_nan, 100, reduction="none").isnan().all()


def test_rows_past_16k_classes_select_by_histogram_then_bisection(device):
    """Rows over 16384 classes whose sample misleads (every 20th class of 20480 lifted, k =
    2000): the histogram of the keys' top bits finds the k-th's bin, bisection within it. No
    ties here, so torch.topk in float64 (independent of the kernels; the counting reference
    would need [C, C] masks) gives the expected loss and gradient."""
    c, k, T = 20480, 2000, 1.3
    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, c, generator=g).to(device)
    t = torch.randn(2, c, generator=g) - 10.0
    t[:, ::20] += 20.0
    t = t.to(device)

    def expected(x):
        top = t.double().topk(k, dim=1).indices
        lq = F.log_softmax(t.double() / T, 1).gather(1, top)
        lp = F.log_softmax(x / T, 1).gather(1, top)
        return (lq.exp() * (lq - lp)).sum(1).mean() * T * T

    compare(lambda x: ops.topk_kl_loss(x, t, k, T), expected, s, "topk, 20480 classes")


@pytest.mark.parametrize("c", [65, 700])
def test_pld_rows_of_64_to_1023_classes(c, device):
    """The 8-bit radix sort of rows under 1024 classes: random logits (digits of every byte
    differ), a teacher of few distinct bfloat16 values (ties: the class order decides; most
    digit passes skipped), and one with every logit equal."""
    s, t, y = (v.to(device) for v in make(3, c, torch.float32, seed=12))
    compare(lambda x: ops.pld_loss(x, t, y), lambda x: ref.pld_loss(x, t, y), s, "pld random")
    tied = torch.randint(-3, 4, (3, c), generator=torch.Generator().manual_seed(4)).float().to(device)
    compare(lambda x: ops.pld_loss(x, tied, y), lambda x: ref.pld_loss(x, tied, y), s, "pld tied")
    flat = torch.full((3, c), 0.5, device=device)
    compare(lambda x: ops.pld_loss(x, flat, y), lambda x: ref.pld_loss(x, flat, y), s, "pld flat")


def test_signed_zeros_tie(device):
    """-0.0 and +0.0 teacher logits are equal (as comparisons and torch's sort see them): the
    rankings follow the class index between them, on every path."""
    s, _, y = (v.to(device) for v in make(2, 40, torch.float32, seed=6))
    t = torch.zeros(2, 40)
    t[:, ::3] = -0.0
    t[:, 5] = 1.0
    t = t.to(device)
    for k in (1, 3, 20):
        compare(lambda x: ops.topk_kl_loss(x, t, k, 1.0), lambda x: ref.topk_kl_loss(x, t, k, 1.0),
                s, f"topk k={k}")
    compare(lambda x: ops.pld_loss(x, t, y), lambda x: ref.pld_loss(x, t, y), s, "pld")


def test_torch_formulas_of_the_cuda_path_match_reference():
    """The CUDA tensors' path (torch operations) is the same math; check it here on the CPU."""
    s, t, y = make(5, 300, torch.float32, seed=6)
    for k, renorm in ((1, False), (17, False), (17, True), (300, True)):
        torch.testing.assert_close(distill_ops._topk_rows_torch(s, t, k, 1.5, renorm).double(),
                                   ref.topk_kl_loss(s, t, k, 1.5, renorm, "none"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distill_ops._pld_rows_torch(s, t, y, 0.7, -100).double(),
                               ref.pld_loss(s, t, y, 0.7, reduction="none"), rtol=1e-5, atol=1e-6)


def test_special_cases_agree_with_other_losses():
    s, t, y = make(6, 50, torch.float32, seed=1)
    # every class kept: the full forward KL, either form
    for renorm in (False, True):
        torch.testing.assert_close(ops.topk_kl_loss(s, t, 50, 3.0, renorm), ops.kd_loss(s, t, 3.0))
    # OSTQuant: F.kl_div "batchmean" over the gathered top-k columns of the full softmaxes (T = 1)
    idx = torch.topk(t, 10, -1).indices  # no ties in random floats
    expected = F.kl_div(F.log_softmax(s, -1).gather(1, idx), F.softmax(t, -1).gather(1, idx),
                        reduction="batchmean")
    torch.testing.assert_close(ops.topk_kl_loss(s, t, 10), expected, rtol=1e-5, atol=1e-6)
    # PLD with a teacher sure of the target (weight 1 on it): cross-entropy
    sure = torch.full((6, 50), -1e4).scatter(1, y.clamp(min=0)[:, None], 1e4)
    torch.testing.assert_close(ops.pld_loss(s, sure, y), F.cross_entropy(s, y), rtol=1e-5, atol=1e-6)


def test_leading_dims_strided_extreme_and_empty():
    s, t, y = make(6, 40, torch.float32, seed=2)
    out = ops.pld_loss(s.reshape(2, 3, 40), t.reshape(2, 3, 40), y.reshape(2, 3), reduction="none")
    torch.testing.assert_close(out.reshape(-1), ops.pld_loss(s, t, y, reduction="none"))
    out = ops.topk_kl_loss(s.reshape(2, 3, 40), t.reshape(2, 3, 40), 4, reduction="none")
    torch.testing.assert_close(out.reshape(-1), ops.topk_kl_loss(s, t, 4, reduction="none"))
    col_s, col_t = s.t().contiguous().t(), torch.cat([t, t], 1)[:, ::2]
    compare(lambda x: ops.topk_kl_loss(x, col_t, 6, 1.5), lambda x: ref.topk_kl_loss(x, col_t, 6, 1.5),
            col_s, "strided topk")
    compare(lambda x: ops.pld_loss(x, col_t, y, 1.5), lambda x: ref.pld_loss(x, col_t, y, 1.5),
            col_s, "strided pld")
    big_s, big_t = (s * 3000).requires_grad_(True), t * 3000
    for out in (ops.topk_kl_loss(big_s, big_t, 5), ops.topk_kl_loss(big_s, big_t, 5, renormalize=True),
                ops.pld_loss(big_s, big_t, y)):
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(big_s.grad).all()
        big_s.grad = None
    e = torch.zeros(0, 7, requires_grad=True)
    ops.pld_loss(e, torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    ops.topk_kl_loss(e, torch.zeros(0, 7), 3, reduction="sum").backward()
    assert e.grad.shape == (0, 7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_repeated_and_retained_backward(reduction, device):
    """The backward hands the forward's gradient buffer over (scaled in place): a second
    backward through the retained graph makes it again, loss.backward() twice accumulates
    twice the gradient, and an upstream gradient other than 1 (or per row) scales it, each
    equal to the float64 reference's."""
    s, t, y = (v.to(device) for v in make(6, 1031, torch.float32, seed=5))
    losses = {"topk": (lambda x: ops.topk_kl_loss(x, t, 40, 2.0, reduction=reduction),
                       lambda x: ref.topk_kl_loss(x, t.double(), 40, 2.0, reduction=reduction)),
              "pld": (lambda x: ops.pld_loss(x, t, y, 0.5, reduction=reduction),
                      lambda x: ref.pld_loss(x, t.double(), y, 0.5, reduction=reduction))}
    for name, (fn, ref_fn) in losses.items():
        x = s.clone().requires_grad_(True)
        x64 = s.double().requires_grad_(True)
        out = fn(x)
        up = torch.rand(out.shape, device=device, dtype=torch.float64) + 0.5
        (exp,) = torch.autograd.grad(ref_fn(x64), x64, up)
        (first,) = torch.autograd.grad(out, x, up.float(), retain_graph=True)
        (second,) = torch.autograd.grad(out, x, up.float(), retain_graph=True)
        for got in (first, second):
            torch.testing.assert_close(got.double(), exp, rtol=2e-5, atol=2e-7, msg=name)
        if reduction != "none":  # loss.backward() twice: the unit upstream, accumulated
            (unit,) = torch.autograd.grad(ref_fn(x64), x64)
            out.backward(retain_graph=True)
            out.backward()
            torch.testing.assert_close(x.grad.double(), 2 * unit, rtol=2e-5, atol=4e-7, msg=name)


def test_pld_mean_over_no_kept_rows(device):
    """Every row ignored: the mean is NaN and the gradients 0, as F.cross_entropy's (the
    kernel path, and the torch formulas a teacher that requires grad takes)."""
    s, t, _ = (v.to(device) for v in make(3, 40, torch.float32, seed=6))
    y = torch.full((3,), -100, device=device)
    for teacher_grad in (False, True):
        x, tt = s.clone().requires_grad_(True), t.clone().requires_grad_(teacher_grad)
        loss = ops.pld_loss(x, tt, y, 2.0)
        loss.backward()
        assert loss.isnan() and torch.equal(x.grad, torch.zeros_like(s))
        assert not teacher_grad or torch.equal(tt.grad, torch.zeros_like(t))


def test_opcheck_and_compile():
    # (a teacher that requires grad gets its gradient: tests/test_input_grads.py)
    s, t, y = make(4, 30, torch.float32, seed=3)
    s.requires_grad_(True)
    sd, td = s.detach(), t.detach()
    for grad in (True, False):
        torch.library.opcheck(torch.ops.fastloss.topk_kl_forward.default,
                              (sd.clone().requires_grad_(grad), td, 5, 2.0, False, grad))
        torch.library.opcheck(torch.ops.fastloss.topk_kl_forward.default,
                              (sd.clone().requires_grad_(grad), td, 30, 0.5, True, grad))
        torch.library.opcheck(torch.ops.fastloss.pld_forward.default,
                              (sd.clone().requires_grad_(grad), td, y, 2.0, -100, grad))
        for reduction in range(3):  # the eager paths' ops: forward, reduction, C++ autograd
            torch.library.opcheck(torch.ops.fastloss.topk_kl_loss.default,
                                  (sd.clone().requires_grad_(grad), td, 5, 2.0, False, reduction))
            torch.library.opcheck(torch.ops.fastloss.pld_loss.default,
                                  (sd.clone().requires_grad_(grad), td, y, 2.0, -100, reduction))
    # grad_scale multiplies the gradient made (the eager paths fold the mean's divisor in)
    for op, args in ((torch.ops.fastloss.topk_kl_forward, (sd, td, 5, 2.0, False, True)),
                     (torch.ops.fastloss.pld_forward, (sd, td, y, 2.0, -100, True))):
        torch.library.opcheck(op.default, args + (0.25,))
        rows, grad = op(*args)
        rows_scaled, grad_scaled = op(*args, 0.25)
        assert torch.equal(rows, rows_scaled)
        torch.testing.assert_close(grad_scaled, 0.25 * grad)
    # the backward's row scaling, for each storage dtype
    for dt in (torch.float32, torch.bfloat16):
        g, r = sd.to(dt), torch.rand(4)
        torch.library.opcheck(torch.ops.fastloss.scale_rows.default, (g, r))
        torch.testing.assert_close(torch.ops.fastloss.scale_rows(g, r), g * r[:, None].to(dt))
    f = lambda a, b: ops.topk_kl_loss(a, b, 6, 2.0) + ops.pld_loss(a, b, y, 0.5, reduction="sum")  # noqa: E731
    assert_compiled_matches(f, [sd], td)


def test_bad_input_errors_name_the_argument():
    s, t, y = make(3, 5, torch.float32)
    cases = [
        (lambda: ops.topk_kl_loss(s, t[:2], 2), "teacher must have student's shape"),
        (lambda: ops.topk_kl_loss(s, t.double(), 2), "must share a dtype"),
        (lambda: ops.topk_kl_loss(s, t, 0), "k must be an int in [1, C = 5]"),
        (lambda: ops.topk_kl_loss(s, t, 6), "k must be an int in [1, C = 5]"),
        (lambda: ops.topk_kl_loss(s, t, 2.5), "k must be an int"),
        (lambda: ops.topk_kl_loss(s, t, 2, T=0.0), "T must be > 0"),
        (lambda: ops.topk_kl_loss(s, t, 2, reduction="batchmean"), "reduction must be"),
        (lambda: ops.pld_loss(s, t, y[:2]), "target must have shape (3,)"),
        (lambda: ops.pld_loss(s, t, y.float()), "target must hold integer class indices"),
        (lambda: ops.pld_loss(s, t, torch.tensor([0, 5, 1])), "target[1] = 5 is not a class in [0, 5)"),
        (lambda: ops.pld_loss(s, t, torch.tensor([0, -1, 1])), "target[1] = -1 is not a class"),
        (lambda: ops.pld_loss(s[:, :0], t[:, :0], y), "need at least one class"),
        (lambda: torch.ops.fastloss.topk_kl_forward(s, t, 9, 1.0, False, False), "k must be in [1, C = 5]"),
        (lambda: torch.ops.fastloss.pld_forward(s[0], t[0], y, 1.0, -100, False), "student must be 2-D"),
    ]
    expect_errors(cases)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("c,k", [(300, 20), (5000, 200)], ids=["short-rows", "sampled-threshold"])
def test_cuda_path_equals_cpu(c, k):
    """The CUDA kernels against the CPU ones; 5000 classes with k = 200 take the CUDA top-k's
    sampled threshold (a row with ties across the k-th value among them)."""
    s, t, y = make(6, c, torch.float32, seed=7)
    if c > 1000:
        t[1, 100:500] = t[1].topk(k // 2).values[-1]
    fns = (lambda x, d: ops.topk_kl_loss(x, t.to(d), k, 2.0),
           lambda x, d: ops.topk_kl_loss(x, t.to(d), k, 2.0, True),
           lambda x, d: ops.pld_loss(x, t.to(d), y.to(d), 2.0))
    for fn in fns:
        results = []
        for dev in ("cpu", "cuda"):
            x = s.detach().to(dev).requires_grad_(True)
            out = fn(x, dev)
            out.backward()
            results.append((out.cpu(), x.grad.cpu()))
        for a, e in zip(*results):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
