"""The distillation losses against their float64 references (the forward KL also against
F.kl_div): loss and the student's gradient, every kernel path (CPU ISAs, and CUDA for kd_loss
where there is a GPU), dtype, kind and reduction,
awkward sizes, strided and extreme logits; opcheck, compile, no teacher gradient, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastloss import ops
from fastloss.reference import distill as ref
from checks import assert_compiled_matches, assert_matches_reference, expect_errors

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
KINDS = ["forward_kl", "reverse_kl", "jsd"]


def make(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed * 977 + n * 31 + c)
    s = (torch.randn(n, c, generator=g) * scale).to(dtype)
    t = (torch.randn(n, c, generator=g) * scale + 0.3 * s.float()).to(dtype)
    return s, t


def check(student, teacher, T, kind, beta, reduction, what):
    assert_matches_reference(lambda s: ops.kd_loss(s, teacher, T, kind, beta, reduction),
                             lambda s: ref.kd_loss(s, teacher.double(), T, kind, beta, reduction),
                             [student], TOL[student.dtype], what)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (4, 1031), (2, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, dtype, shape, reduction, device):
    s, t = make(*shape, dtype)
    check(s.to(device), t.to(device), 2.0, kind, 0.3, reduction, f"{kind} {shape} {dtype} {device}")


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_forward_kl_equals_kl_div_batchmean(T):
    s, t = make(6, 50, torch.float64, seed=1)
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") * T * T
    torch.testing.assert_close(ops.kd_loss(s.float(), t.float(), T).double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 50), (2, 3, 50), (50,)], ids=str)
def test_reduction_batchmean_is_kl_div_s(shape):
    """reduction="batchmean": F.kl_div's (the sum over the first dimension's size: for
    [B, T, C] the mean over B, not B T), loss and gradient, on both paths (kernels, and the
    torch formula a teacher that requires grad takes); 16-bit inputs keep their dtype."""
    g = torch.Generator().manual_seed(len(shape))
    s64, t64 = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    for teacher_grad in (False, True):
        s = s64.float().requires_grad_(True)
        t = t64.float().requires_grad_(teacher_grad)
        got = ops.kd_loss(s, t, T=2.0, reduction="batchmean")
        s2 = s64.clone().requires_grad_(True)
        expected = F.kl_div(F.log_softmax(s2 / 2, -1), F.log_softmax(t64 / 2, -1), log_target=True,
                            reduction="batchmean") * 4
        got.backward()
        expected.backward()
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(s.grad.double(), s2.grad, rtol=2e-5, atol=1e-7)
    half = ops.kd_loss(s64.bfloat16(), t64.bfloat16(), T=2.0, reduction="batchmean")
    assert half.dtype == torch.bfloat16


def test_empty_batch():
    s, t = make(0, 7, torch.float32)
    s.requires_grad_(True)
    ops.kd_loss(s, t, 2.0, reduction="sum").backward()
    assert s.grad.shape == (0, 7)
    assert torch.isnan(ops.kd_loss(s, t)), "the mean over no rows is NaN, as torch's mean"


def test_leading_dims_strided_and_extreme_logits():
    s, t = make(6, 40, torch.float32, seed=2)
    out = ops.kd_loss(s.reshape(2, 3, 40), t.reshape(2, 3, 40), 2.0, reduction="none")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.reshape(-1), ops.kd_loss(s, t, 2.0, reduction="none"))
    check(s.t().contiguous().t(), t[:, :], 1.5, "jsd", 0.5, "mean", "column-major student")
    check(torch.cat([s, s], 1)[:, ::2], torch.cat([t, t], 1)[:, ::2], 1.5, "reverse_kl", 0.5, "mean",
          "strided classes")
    big_s, big_t = s * 3000, t * 3000
    for kind in KINDS:
        out = ops.kd_loss(big_s.requires_grad_(True), big_t, 1.0, kind)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(big_s.grad).all(), kind
        big_s.grad = None


@pytest.mark.parametrize("C", [4, 37])
def test_nan_logit_gives_a_nan_row(C, device):
    """A NaN in a row of the teacher (first class, or the last: a vector tail) or of the student
    makes that row's loss and its whole gradient row NaN, for every kind and for top-k KL (the
    JSD had given a finite gradient: the scalar min / max chose the other operand when the data
    was NaN); the other rows are untouched. A finite gradient there would let a loss scaler's
    inf / NaN check pass."""
    s, t = make(4, C, torch.float32, seed=5)
    t[0, 0] = t[1, C - 1] = s[2, 1] = float("nan")
    nan_rows = torch.tensor([True, True, True, False])
    losses = {kind: (lambda x, kind=kind: ops.kd_loss(x, t.to(device), 2.0, kind, 0.3, "none"))
              for kind in KINDS}
    losses["topk"] = lambda x: torch.stack([ops.topk_kl_loss(x[i:i + 1], t[i:i + 1].to(device), 2, 2.0)
                                            for i in range(4)])
    for what, fn in losses.items():
        x = s.to(device, copy=True).requires_grad_(True)
        out = fn(x)
        out.sum().backward()
        assert out.isnan().cpu().equal(nan_rows), (what, out)
        assert x.grad.isnan().cpu().all(1).equal(nan_rows) and x.grad[3].isfinite().all(), (what, x.grad)


def masked_pair(where, C, columns, seed):
    """Student and teacher rows (3 x C) with `columns` masked by -inf in "both", the "student"
    or the "teacher"."""
    s, t = make(3, C, torch.float32, seed=seed)
    if where in ("both", "student"):
        s[:, columns] = float("-inf")
    if where in ("both", "teacher"):
        t[:, columns] = float("-inf")
    return s, t


def at_the_limit(x):
    """x in float64 with its -inf classes at -300: their probabilities below 1e-64, the limit the
    masked classes' terms take (the references take logarithms of probabilities)."""
    return x.double().masked_fill(x == float("-inf"), -300.0)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_classes_count_as_zero_probability(kind, device):
    """A class masked with -inf (a padded vocabulary) has probability 0: its terms of the KLs
    are 0 (0 log 0 = 0), not NaN. The reference is the limit: the masked logits at -300 in
    float64 (the references take logarithms of probabilities), where their probabilities are
    below 1e-64. Masked in both rows, in the teacher only (forward KL and JSD stay finite) and
    in the student only (reverse KL and JSD); the student's gradient, and a finite teacher's
    where it requires grad; kd_loss, and top-k KL with k = C (its selection takes masked classes
    too). A class the student masks where the teacher has mass makes the forward KL +inf in the
    formula (the reverse KL likewise): here ~1e30 or more (the masked logit is taken as -1e30)."""
    # the first class, one inside the vectors, the last of a tail
    C, masked = 37, [0, 16, 36]
    finite = {"forward_kl": ("both", "teacher"), "reverse_kl": ("both", "student"),
              "jsd": ("both", "teacher", "student")}
    for where in ("both", "teacher", "student"):
        s, t = masked_pair(where, C, masked, seed=11)
        if where not in finite[kind]:
            out = ops.kd_loss(s.to(device), t.to(device), 2.0, kind, 0.3, "none")
            assert (out > 1e25).all(), (where, out)
            continue
        calls = {"kd": (lambda a, b: ops.kd_loss(a, b, 2.0, kind, 0.3, "none"),
                        lambda a, b: ref.kd_loss(at_the_limit(a), at_the_limit(b), 2.0, kind, 0.3, "none"))}
        if kind == "forward_kl":
            calls["topk"] = (lambda a, b: ops.topk_kl_loss(a, b, C, 2.0, reduction="none"),
                             lambda a, b: ref.topk_kl_loss(at_the_limit(a), at_the_limit(b), C, 2.0, reduction="none"))
        # (a teacher that requires grad takes the torch-operation formulas, one that does not
        # the kernels)
        for (what, (fast, slow)), teacher_grad in itertools.product(calls.items(), (False, True)):
            a = s.to(device, copy=True).requires_grad_(True)
            b = t.to(device, copy=True).requires_grad_(teacher_grad)
            out = fast(a, b)
            grads = torch.autograd.grad(out.sum(), (a, b) if teacher_grad else (a,))
            a64 = s.double().requires_grad_(True)
            b64 = t.double().requires_grad_(True)
            exp = slow(a64, b64)
            expected = torch.autograd.grad(exp.sum(), a64)[0]   # (the references detach the teacher)
            assert all(torch.isfinite(g).all() for g in grads) and torch.isfinite(out).all(), (what, where, out)
            torch.testing.assert_close(out.cpu().double(), exp.detach(), rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(grads[0].cpu().double(), expected, rtol=2e-5, atol=2e-5)


def test_rows_with_every_class_masked_are_nan(device):
    """A student or teacher row whose classes are all -inf has no distribution: its loss and
    its gradient row are NaN (as log_softmax of it is), on the kernels and on the torch formulas
    of a teacher that requires grad; the other rows are untouched. (Taken as -1e30 each, its
    log-sum-exp had lost log C to rounding: a forward KL of -7.6e22.)"""
    s, t = make(4, 37, torch.float32, seed=13)
    s[1] = float("-inf")
    t[2] = float("-inf")
    nan_rows = torch.tensor([False, True, True, False])
    calls = {kind: (lambda a, b, kind=kind: ops.kd_loss(a, b, 2.0, kind, 0.3, "none")) for kind in KINDS}
    calls["topk"] = lambda a, b: ops.topk_kl_loss(a, b, 37, 2.0, reduction="none")
    for (what, fn), teacher_grad in itertools.product(calls.items(), (False, True)):
        a = s.to(device, copy=True).requires_grad_(True)
        b = t.to(device, copy=True).requires_grad_(teacher_grad)
        out = fn(a, b)
        g = torch.autograd.grad(out.sum(), a)[0]
        assert out.isnan().cpu().equal(nan_rows), (what, teacher_grad, out)
        assert g.isnan().cpu().all(1).equal(nan_rows) and g[[0, 3]].isfinite().all(), (what, teacher_grad)


def test_pld_masked_classes(device):
    """PLD with classes masked with -inf: masked in both rows (or the teacher's only) they weigh
    0 in the ranking's terms, which had been NaN (0 (lse - (-inf)) over a masked suffix); the
    limit reference puts them at -300. A class the student masks where the teacher has weight
    is an infinite term in the formula: ~1e30 or more here."""
    C, masked = 37, [3, 16, 36]
    y = torch.tensor([0, 5, 20])
    for where in ("both", "teacher", "student"):
        s, t = masked_pair(where, C, masked, seed=12)
        for teacher_grad in (False, True):
            a = s.to(device, copy=True).requires_grad_(True)
            b = t.to(device, copy=True).requires_grad_(teacher_grad)
            out = ops.pld_loss(a, b, y.to(device), 2.0, reduction="none")
            if where == "student":
                assert (out > 1e25).all(), out
                continue
            ga = torch.autograd.grad(out.sum(), a)[0]
            a64 = s.double().requires_grad_(True)
            exp = ref.pld_loss(at_the_limit(a64), at_the_limit(t), y, 2.0, reduction="none")
            ea = torch.autograd.grad(exp.sum(), a64)[0]
            assert torch.isfinite(out).all() and torch.isfinite(ga).all(), (where, teacher_grad, out)
            torch.testing.assert_close(out.cpu().double(), exp.detach(), rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(ga.cpu().double(), ea, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_made_with_the_forward_equals_the_separate_backward(kind, dtype, cpu_isa):
    """kd_forward_grad (the CPU autograd path when the student needs its gradient) against
    kd_forward + kd_backward on the same rows (awkward C: vector body and tail), with a scale."""
    s, t = make(7, 1037, dtype, seed=11)
    code = KINDS.index(kind)
    rows, grad = torch.ops.fastloss.kd_forward_grad(s, t, code, 1.7, 0.3, 0.5)
    rows_ref, stats = torch.ops.fastloss.kd_forward(s, t, code, 1.7, 0.3)
    grad_ref = torch.ops.fastloss.kd_backward(torch.full((7,), 0.5), s, t, stats, code, 1.7, 0.3)
    torch.testing.assert_close(rows, rows_ref, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(grad.float(), grad_ref.float(), **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_repeated_and_retained_backward(reduction, device):
    """The backward hands over (scaled in place) the gradient the CPU forward made: a second
    backward through the retained graph makes it again, loss.backward() twice accumulates
    twice, and an upstream other than 1 (or per row) scales it; each equal to the float64
    reference's."""
    s, t = (v.to(device) for v in make(6, 1031, torch.float32, seed=12))
    for kind in KINDS:
        x = s.clone().requires_grad_(True)
        x64 = s.double().requires_grad_(True)
        out = ops.kd_loss(x, t, 2.0, kind, 0.3, reduction)
        exp_fn = lambda: ref.kd_loss(x64, t.double(), 2.0, kind, 0.3, reduction)  # noqa: E731
        up = torch.rand(out.shape, device=device, dtype=torch.float64) + 0.5
        (exp,) = torch.autograd.grad(exp_fn(), x64, up)
        (first,) = torch.autograd.grad(out, x, up.float(), retain_graph=True)
        (second,) = torch.autograd.grad(out, x, up.float(), retain_graph=True)
        for got in (first, second):
            torch.testing.assert_close(got.double(), exp, rtol=2e-5, atol=2e-7, msg=kind)
        if reduction != "none":
            (unit,) = torch.autograd.grad(exp_fn(), x64)
            out.backward(retain_graph=True)
            out.backward()
            torch.testing.assert_close(x.grad.double(), 2 * unit, rtol=2e-5, atol=4e-7, msg=kind)


def test_float16_gradient_under_a_loss_scale():
    """float16 logits under a large upstream (a GradScaler's loss scale): the gradient is formed
    in float32 with the upstream applied before its one rounding, not made at scale 1 / N in
    float16 and multiplied after (which flushed a third of it to zero)."""
    s, t = make(64, 1000, torch.float16, seed=13)
    for kind in KINDS:
        x, xf = s.clone().requires_grad_(True), s.float().requires_grad_(True)
        (g,) = torch.autograd.grad(ops.kd_loss(x, t, 2.0, kind) * 32768, x)
        (gf,) = torch.autograd.grad(ops.kd_loss(xf, t.float(), 2.0, kind) * 32768, xf)
        err = (g.float() - gf).abs().sum() / gf.abs().sum()
        assert err < 1e-3, (kind, err.item())


def test_other_losses_in_place_backward_on_the_same_logits():
    """kd_loss, topk_kl_loss and pld_loss keep their inputs only for a second backward: an
    in-place backward of another loss on the same logits (run before theirs) must not make
    them raise, and the gradients add up as with the out-of-place one."""
    s, t = make(8, 40, torch.float32, seed=14)
    y = torch.randint(0, 40, (8,), generator=torch.Generator().manual_seed(3))
    grads = []
    for inplace in (True, False):
        x = s.clone().requires_grad_(True)
        z = x * 1.0
        loss = (ops.kd_loss(z, t) + ops.topk_kl_loss(z, t, 5) + ops.pld_loss(z, t, y)
                + ops.cross_entropy(z, y, inplace_backward=inplace))
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_opcheck_and_compile():
    # (a teacher that requires grad gets its gradient: tests/test_input_grads.py)
    s, t = make(4, 30, torch.float32, seed=3)
    s.requires_grad_(True)
    for kind in range(3):
        torch.library.opcheck(torch.ops.fastloss.kd_forward.default,
                              (s.detach().clone().requires_grad_(True), t.detach(), kind, 2.0, 0.4))
        _, stats = torch.ops.fastloss.kd_forward(s.detach(), t.detach(), kind, 2.0, 0.4)
        torch.library.opcheck(torch.ops.fastloss.kd_backward.default,
                              (torch.rand(4), s.detach(), t.detach(), stats, kind, 2.0, 0.4))
        torch.library.opcheck(torch.ops.fastloss.kd_forward_grad.default,
                              (s.detach(), t.detach(), kind, 2.0, 0.4, 0.25))
        for reduction in range(3):  # the eager path's op: forward, reduction, C++ autograd
            torch.library.opcheck(torch.ops.fastloss.kd_loss.default,
                                  (s.detach().clone().requires_grad_(True), t.detach(), kind, 2.0, 0.4,
                                   reduction))
    f = lambda a, b: ops.kd_loss(a, b, 2.0) + ops.kd_loss(a, b, 1.0, "jsd", 0.2, "sum")  # noqa: E731
    assert_compiled_matches(f, [s], t.detach())


def test_bad_input_errors_name_the_argument():
    s, t = make(3, 5, torch.float32)
    cases = [
        (lambda: ops.kd_loss(s, t[:2]), "teacher must have student's shape"),
        (lambda: ops.kd_loss(s, t.double()), "must share a dtype"),
        (lambda: ops.kd_loss(s, t, T=0.0), "T must be > 0"),
        (lambda: ops.kd_loss(s, t, kind="kl"), "kind must be one of"),
        (lambda: ops.kd_loss(s, t, kind="jsd", beta=1.0), "beta must be in (0, 1)"),
        (lambda: ops.kd_loss(s, t, reduction="avg"), "reduction must be"),
        (lambda: ops.kd_loss(s[:, :0], t[:, :0]), "need at least one class"),
        (lambda: torch.ops.fastloss.kd_forward(s, t, 5, 1.0, 0.5), "kind must be 0 (forward_kl)"),
        (lambda: torch.ops.fastloss.kd_forward(s[0], t[0], 0, 1.0, 0.5), "student must be 2-D"),
    ]
    expect_errors(cases)


# ---- the dual-head module ----------------------------------------------------------------------

import fastloss  # noqa: E402


@pytest.mark.parametrize("aux_loss", ["mse", "forward_kl", "jsd"])
def test_dual_head_kd_equals_its_formula_and_keeps_heads_apart(aux_loss):
    torch.manual_seed(0)
    module = fastloss.nn.DualHeadKD(12, 9, T=2.0, aux_weight=0.7, prob_weight=0.3, aux_loss=aux_loss)
    f = torch.randn(16, 12, requires_grad=True)
    y = torch.randint(0, 9, (16,))
    t = torch.randn(16, 9) * 2
    loss = module(f, y, t)
    main, aux = module.main(f), module.aux(f)
    aux_ref = (F.mse_loss(aux, t) if aux_loss == "mse"
               else ref.kd_loss(aux.double(), t.double(), 2.0, aux_loss).float())
    expected = F.cross_entropy(main, y) + 0.3 * ref.kd_loss(main.double(), t.double(), 2.0).float() + 0.7 * aux_ref
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the auxiliary loss reaches the backbone features and the auxiliary head, not the main head:
    # with every label ignored the main head has no loss term (its gradients are zero, as
    # torch gives for a cross-entropy over no rows), only the auxiliary one remains
    aux_only = fastloss.nn.DualHeadKD(12, 9, T=2.0, aux_weight=1.0, aux_loss=aux_loss)
    aux_only.load_state_dict(module.state_dict())
    g_main = torch.autograd.grad(aux_only.aux_weight * (aux_only(f, torch.full((16,), -100), t)),
                                 (aux_only.main.weight, aux_only.aux.weight, f), allow_unused=True)
    assert g_main[0] is None or (g_main[0] == 0).all()
    assert (g_main[1] != 0).any() and (g_main[2] != 0).any()
    assert module.predict(f).shape == (16, 9)
    with pytest.raises(ValueError, match="aux_loss must be"):
        fastloss.nn.DualHeadKD(4, 3, aux_loss="l1")
    with pytest.raises(ValueError, match=r"teacher_logits must be \[N, C\] = \(16, 9\)"):
        module(f, y, torch.randn(16, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_path_equals_cpu(kind):
    # 2 rows of 70000 classes: more than 256 elements per thread, so the online maxima move
    s, t = make(2, 70_000, torch.float32, seed=8)
    out = [ops.kd_loss(s.to(dev), t.to(dev), 1.5, kind, 0.3, "none").cpu() for dev in ("cpu", "cuda")]
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-5)
    s, t = make(6, 300, torch.float32, seed=7)
    results = []
    for dev in ("cpu", "cuda"):
        x = s.detach().to(dev).requires_grad_(True)
        out = ops.kd_loss(x, t.to(dev), 2.0, kind, 0.3)
        out.backward()
        results.append((out.cpu(), x.grad.cpu()))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
