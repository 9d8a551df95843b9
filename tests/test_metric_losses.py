"""AnyLoss against its float64 reference (written cell by cell), every metric, binary and
multi-label, logits and probabilities; gradients; bad input. The self-adjusting Dice loss against
its naive float64 form (binary, multi-label, multi-class), and at softmax saturation. Each kernel
path (generic, AVX2, AVX-512, and CUDA where there is a GPU) is run; opcheck and torch.compile
of the kernel ops; the torch-operation path of other devices against the same references."""

import pytest
import torch

from fastloss import ops
from fastloss.reference import metric_losses as ref
from checks import assert_matches_reference


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(40,), (33, 3), (9, 37)], ids=["binary", "multilabel", "wide"])
@pytest.mark.parametrize("metric", ["f1", "fbeta", "accuracy", "balanced_accuracy", "gmean"])
def test_matches_reference(metric, shape, from_logits, device):
    g = torch.Generator().manual_seed(len(metric) + len(shape))
    scores = torch.randn(*shape, generator=g) * 0.3 if from_logits else torch.rand(*shape, generator=g)
    target = (torch.rand(*shape, generator=g) < 0.3).float()
    target[:2] = torch.tensor([0.0, 1.0]).reshape((2,) + (1,) * (len(shape) - 1))  # both classes in each column
    x = scores.clone().to(device).requires_grad_(True)
    out = ops.anyloss(x, target.to(device), metric, L=10.0, beta=2.0, from_logits=from_logits)
    out.backward()
    x64 = scores.double().requires_grad_(True)
    exp = ref.anyloss(x64, target, metric, L=10.0, beta=2.0, from_logits=from_logits)
    exp.backward()
    torch.testing.assert_close(out.double().cpu(), exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("metric", ["f1", "fbeta", "accuracy", "balanced_accuracy", "gmean"])
def test_half_precision_default_L_and_strided_scores(metric, dtype):
    """16-bit scores (computed in float32: only the results' rounding differs from the float64
    reference on the same rounded inputs), the paper's L = 73, and multi-label scores given as
    a transposed (column-major) view."""
    g = torch.Generator().manual_seed(len(metric))
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for from_logits in (True, False):
        scores = torch.randn(3, 33, generator=g) * 0.3 if from_logits else torch.rand(3, 33, generator=g)
        target = (torch.rand(33, 3, generator=g) < 0.3).float()
        target[:2] = torch.tensor([[0.0], [1.0]])
        x = scores.to(dtype).t()  # [33, 3], not contiguous
        assert not x.is_contiguous()
        assert_matches_reference(lambda a: ops.anyloss(a, target, metric, beta=2.0, from_logits=from_logits),
                                 lambda a: ref.anyloss(a, target.double(), metric, beta=2.0,
                                                       from_logits=from_logits),
                                 [x], tol, f"{metric} logits={from_logits}")


def test_perfect_and_bad_predictions_and_input_checks():
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    good = torch.tensor([0.99, 0.01, 0.98, 0.02])
    bad = 1 - good
    assert ops.anyloss(good, target, "f1", from_logits=False) < 0.01
    assert ops.anyloss(bad, target, "f1", from_logits=False) > 0.99
    with pytest.raises(ValueError, match="metric must be one of"):
        ops.anyloss(good, target, "auc")
    with pytest.raises(ValueError, match="target the same shape"):
        ops.anyloss(good, target[:3])
    with pytest.raises(ValueError, match="L must be > 0"):
        ops.anyloss(good, target, L=0.0)
    with pytest.raises(ValueError, match="target must hold binary targets in"):
        ops.anyloss(good, target * 2)
    with pytest.raises(ValueError, match="target must hold binary targets in"):
        ops.anyloss(good, target - 1)
    with pytest.raises(ValueError, match="scores must be probabilities in"):
        ops.anyloss(good + 0.5, target, from_logits=False)
    assert ops.anyloss(good + 0.5, target).isfinite()  # (logits: any value)


# ---- self-adjusting Dice loss -------------------------------------------------------------------

DICE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _dice_case(form, dtype, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    if form == "binary":
        x = torch.randn(n, generator=g) * 3
        y = (torch.rand(n, generator=g) < 0.2).float()
    elif form == "multilabel":
        x = torch.randn(n, c, generator=g) * 3
        y = torch.rand(n, c, generator=g)  # soft targets too
    else:
        x = torch.randn(n, c, generator=g) * 3
        y = torch.randint(0, c, (n,), generator=g)
        if n > 2:
            y[1] = -100
    return x.to(dtype), y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("params", [(1.0, 1.0, 0.0), (0.01, 1.0, 0.0), (0.0, 0.5, 0.0), (2.0, 0.0, 1e-3)],
                         ids=lambda p: "a{}g{}s{}".format(*p))
def test_dice_matches_reference(params, dtype, form, reduction, device):
    from fastloss.reference.metric_losses import dice_loss as ref_dice
    for n, c in ((1, 1), (7, 3), (37, 11), (5, 67)):
        if form == "multiclass" and c == 1:
            continue
        x, y = (t.to(device) for t in _dice_case(form, dtype, n, c, seed=n * 7 + c))
        assert_matches_reference(lambda a: ops.dice_loss(a, y, *params, reduction=reduction),
                                 lambda a: ref_dice(a, y, *params, reduction=reduction),
                                 [x], DICE_TOL[dtype], f"{form} {n}x{c}", seed=3)


def test_dice_gradient_stays_finite_when_the_softmax_saturates(device):
    """A dominant class saturates p to 1.0 in float32; the naive derivative has (1 - p)^(a - 1)
    = inf there. The written-out backward must be finite and agree with float64 (where p < 1)."""
    from fastloss.reference.metric_losses import dice_loss as ref_dice
    x = torch.randn(6, 37, generator=torch.Generator().manual_seed(0))
    x[:, 2] += 30.0   # p_2 = 1 - ~1e-11: exactly 1.0 in float32, not in float64
    y = torch.tensor([2, 0, 2, 1, 2, 36])
    for alpha in (0.01, 0.5, 1.0):
        a = x.clone().to(device).requires_grad_(True)
        ops.dice_loss(a, y.to(device), alpha).backward()
        e = x.double().requires_grad_(True)
        ref_dice(e, y, alpha).backward()
        assert torch.isfinite(a.grad).all(), alpha
        torch.testing.assert_close(a.grad.double().cpu(), e.grad, rtol=1e-4, atol=1e-6)
    xb = torch.tensor([40.0, -40.0, 0.3], device=device, requires_grad=True)
    ops.dice_loss(xb, torch.tensor([1.0, 0.0, 1.0], device=device), 0.1).backward()
    assert torch.isfinite(xb.grad).all()


@pytest.mark.parametrize("alpha", [0.1, 0.01, 1.0, 0.0])
def test_dice_far_saturated_softmax_and_sigmoid(alpha, device):
    """A dominant class far ahead (logit gaps of 88-200): 1 - p of the top class is subnormal or
    below float32's range, but (1 - p)^alpha is not small for the paper's alpha of 0.1 ..
    0.001 (a gap of 95 at alpha = 0.01: 0.39). The kernels carry it as a logarithm (it had been
    flushed to 0: the top's term up to 0.29 off, its gradient 0), against the reference's
    log(1 - p) in float64; the torch formulas of other devices likewise; the sigmoid form at
    logits of +-100 .. 200."""
    from fastloss.ops import metric_losses as M
    from fastloss.reference.metric_losses import dice_loss as ref_dice
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 37, generator=g)
    x[:, 5] += torch.tensor([88.0, 95.0, 120.0, 200.0, 30.0])
    x[4, 9] = x[4, 5]   # a tie at the maximum: the first is the top
    y = torch.tensor([5, 1, 36, 5, 9])
    xs = torch.tensor([100.0, -100.0, 150.0, -200.0, 95.0])
    ys = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    cases = [(lambda a: ops.dice_loss(a, y.to(device), alpha, reduction="none"), lambda a: ref_dice(a, y, alpha, reduction="none"), x),
             (lambda a: ops.dice_loss(a, ys.to(device), alpha, reduction="none"), lambda a: ref_dice(a, ys, alpha, reduction="none"), xs)]
    if device == "cpu":
        cases += [(lambda a: M._SoftmaxDice.apply(a, y, alpha, 1.0, 0.0).sum(1), lambda a: ref_dice(a, y, alpha, reduction="none"), x),
                  (lambda a: M._SigmoidDice.apply(a, ys, alpha, 1.0, 0.0), lambda a: ref_dice(a, ys, alpha, reduction="none"), xs)]
    for fast, slow, inp in cases:
        a = inp.to(device, copy=True).requires_grad_(True)
        out = fast(a)
        up = torch.rand(out.shape, generator=g) + 0.5
        ga = torch.autograd.grad(out, a, up.to(device))[0]
        e = inp.double().requires_grad_(True)
        exp = slow(e)
        ge = torch.autograd.grad(exp, e, up.double())[0]
        torch.testing.assert_close(out.double().cpu(), exp.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga.double().cpu(), ge, rtol=1e-4, atol=1e-6)


def test_dice_special_cases_compile_and_bad_input():
    from checks import assert_compiled_matches, expect_errors
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 4, (8,))
    # alpha = 0, gamma = 0: the plain Dice 2py / (p + y) per class
    p = torch.softmax(x, -1)
    oh = torch.nn.functional.one_hot(y, 4).float()
    plain = (1 - 2 * p * oh / (p + oh + 1e-6)).sum(1).mean()
    torch.testing.assert_close(ops.dice_loss(x, y, 0.0, 0.0, 1e-6), plain)
    f = lambda a: ops.dice_loss(a, y, 0.3) + ops.dice_loss(a[:, 0], (y == 0).float(), 0.5, reduction="sum")  # noqa: E731
    assert_compiled_matches(f, [x], fullgraph=True)  # (the target checks are left to eager calls)
    expect_errors([
        (lambda: ops.dice_loss(x, y, alpha=-1.0), "alpha must be a finite number >= 0"),
        (lambda: ops.dice_loss(x, y, gamma=0.0), "gamma and smooth are both 0"),
        (lambda: ops.dice_loss(x, y.float()), "holds integer classes"),
        (lambda: ops.dice_loss(x, y[:3]), "logits [N] or [N, K] with target of the same shape"),
        (lambda: ops.dice_loss(x, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])), "outside [0, C = 4)"),
        (lambda: ops.dice_loss(x[:, 0], x[:, 1]), "binary targets in [0, 1]"),
        (lambda: ops.dice_loss(x.double(), y), "logits must be float32"),
        (lambda: ops.dice_loss(x, y, reduction="batchmean"), "reduction must be"),
    ])


def test_large_batches_and_target_at_the_maximum(cpu_isa):
    """Sizes past the kernels' float32 partial-sum blocks (AnyLoss: 2^14 elements per block,
    2^16 rows per thread-independent block) against the torch formula in float64 (itself checked
    against the reference for every metric in test_torch_formulas_of_the_cuda_path_match_reference:
    the cell-by-cell reference is too slow at these sizes); Dice rows whose
    target is the largest logit (the two corrected classes are then one)."""
    from fastloss.ops.metric_losses import _confusion_sums_torch, _metric
    g = torch.Generator().manual_seed(11)
    for shape in ((70001,), (3001, 29)):
        s = torch.randn(*shape, generator=g)
        y = (torch.rand(*shape, generator=g) < 0.4).float()
        a = s.clone().requires_grad_(True)
        ops.anyloss(a, y, "balanced_accuracy", L=5.0).backward()
        e = s.double().requires_grad_(True)
        cells = _confusion_sums_torch(e.reshape(shape[0], -1), y.double().reshape(shape[0], -1), 5.0, True)
        (1 - _metric(*cells, "balanced_accuracy", 1.0)).mean().backward()
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=1e-4, atol=1e-12)
    from fastloss.reference.metric_losses import dice_loss as ref_dice
    x = torch.randn(40, 53, generator=g) * 4
    y = x.argmax(1)
    y[::3] = torch.randint(0, 53, (14,), generator=g)
    for alpha in (1.0, 0.1):
        assert_matches_reference(lambda a: ops.dice_loss(a, y, alpha), lambda a: ref_dice(a, y, alpha),
                                 [x], 1e-5, f"target at the maximum, alpha {alpha}")


def test_kernel_ops_opcheck_and_compile():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 21, generator=g)
    soft = torch.rand(9, 21, generator=g)
    y = torch.randint(0, 21, (9,), generator=g)
    y[4] = -100
    F = torch.ops.fastloss
    for op, args in [
        (F.dice_sigmoid_forward, (x.clone().requires_grad_(True), soft, 0.1, 1.0, 0.0)),
        (F.dice_sigmoid_backward, (torch.rand(9), x, soft, 0.1, 1.0, 0.0)),
        (F.dice_softmax_forward, (x.clone().requires_grad_(True), y, 0.1, 1.0, 0.0, -100)),
        (F.dice_softmax_backward, (torch.rand(9), x, y, 0.1, 1.0, 0.0, -100)),
        (F.confusion_sums, (x.clone().requires_grad_(True), soft.round(), 20.0, True)),
        (F.confusion_sums_backward, (torch.randn(4, 21), x, soft.round(), 20.0, True)),
    ] + [  # the eager paths' ops: forward, reduction, C++ autograd
        (F.dice_loss, (x.clone().requires_grad_(True), soft, False, 0.1, 1.0, 0.0, -100, r)) for r in range(3)
    ] + [
        (F.dice_loss, (x.clone().requires_grad_(True), y, True, 0.1, 1.0, 0.0, -100, r)) for r in range(3)
    ] + [
        (F.anyloss, (x.clone().requires_grad_(True), soft.round(), m, 20.0, 0.7, True)) for m in range(5)
    ]:
        torch.library.opcheck(op.default, args)
    from checks import assert_compiled_matches
    labels = soft.round()
    assert_compiled_matches(lambda a: ops.anyloss(a, labels, "f1") + ops.anyloss(a[:, 0], labels[:, 0], "gmean"), [x])


def test_torch_formulas_of_the_cuda_path_match_reference():
    """Devices without the kernels run these torch-operation forms; check them here on
    the CPU against the references, values and gradients."""
    from fastloss.ops import metric_losses as M
    from fastloss.reference.metric_losses import dice_loss as ref_dice
    g = torch.Generator().manual_seed(8)
    x = torch.randn(13, 7, generator=g) * 3
    y = torch.randint(0, 7, (13,), generator=g)
    soft = torch.rand(13, 7, generator=g)
    labels = soft.round()
    cases = [
        (lambda a: M._SoftmaxDice.apply(a, y, 0.3, 1.0, 0.0).sum(1).mean(), lambda a: ref_dice(a, y, 0.3)),
        (lambda a: M._SigmoidDice.apply(a, soft, 0.3, 1.0, 0.0).sum(1).mean(), lambda a: ref_dice(a, soft, 0.3)),
    ] + [  # every metric (test_large_batches_and_target_at_the_maximum uses these forms as its
        # float64 oracle at sizes the cell-by-cell reference is too slow for)
        (lambda a, m=m: 1 - M._metric(*M._confusion_sums_torch(a, labels, 10.0, True), m, 2.0).mean(),
         lambda a, m=m: ref.anyloss(a, labels, m, L=10.0, beta=2.0))
        for m in ("f1", "fbeta", "accuracy", "balanced_accuracy", "gmean")
    ]
    for fn, ref_fn in cases:
        assert_matches_reference(fn, ref_fn, [x], 1e-5)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0), (0, 0)])
def test_empty_batch(shape, device):
    """No rows: AnyLoss's confusion cells are all 0 and its metrics 0 / 0 (NaN, as a mean over no
    rows is in torch), a gradient of the empty shape; no label columns: the mean over no metrics
    (NaN; the CPU kernel had divided by the column count: SIGFPE); Dice's mean over no rows
    likewise."""
    x = torch.zeros(shape, device=device, requires_grad=True)
    loss = ops.anyloss(x, torch.zeros(shape, device=device))
    loss.backward()
    assert loss.isnan() and x.grad.shape == shape
    logits = torch.zeros(0, 4, device=device, requires_grad=True)
    dice = ops.dice_loss(logits, torch.zeros(0, dtype=torch.long, device=device))
    dice.backward()
    assert dice.isnan() and logits.grad.shape == (0, 4)


def test_meta_tensors_give_the_loss_shape():
    """Meta tensors (shape inference, e.g. torch.device("meta") model construction): the value
    checks are skipped instead of reading data that is not there."""
    m = "meta"
    for out in (ops.dice_loss(torch.randn(8, 4, device=m), torch.rand(8, 4, device=m)),
                ops.dice_loss(torch.randn(8, 4, device=m), torch.zeros(8, dtype=torch.long, device=m)),
                ops.dice_loss(torch.randn(8, 4, device=m), torch.zeros(8, dtype=torch.long, device=m),
                              reduction="none"),
                ops.anyloss(torch.randn(8, 4, device=m), torch.rand(8, 4, device=m))):
        assert out.device.type == m
    assert out.shape == ()
