"""Tests of the float64 reference losses in python/fastloss/reference/losses.py.

The reference module is loaded by file path (importlib) so these tests do not
depend on the compiled fastloss extension being built.  Each loss is checked
against PyTorch where PyTorch has an equivalent, against its paper's formula
written out independently with the ``math`` module row by row, and for the
common semantics (reductions, ignore_index, class weights, empty batches,
compute dtypes, gradients).
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_LOSSES_PATH = (
    Path(__file__).resolve().parent.parent / "python" / "fastloss" / "reference" / "losses.py"
)


def _load_reference():
    spec = importlib.util.spec_from_file_location("_fastloss_reference_losses", _LOSSES_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

F64 = torch.float64
IGNORE = -100


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def make_inputs(n, c, seed, scale=1.0, n_ignored=0, ignore_index=IGNORE, dtype=F64):
    """Random logits [n, c], targets [n] (the first n_ignored rows ignored), weight [c]."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=F64) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_index >= 0:
        # an in-range ignore_index: make sure the other rows do not hit it by chance
        target = torch.where(target == ignore_index, (target + 1) % c, target)
    target[:n_ignored] = ignore_index
    weight = torch.rand(c, generator=g, dtype=F64) + 0.5
    return logits, target, weight


# ---------------------------------------------------------------------------
# Independent row-by-row formulas written with the math module
# ---------------------------------------------------------------------------


def _logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softplus(u):
    return max(u, 0.0) + math.log1p(math.exp(-abs(u)))


def py_cross_entropy(f, y, w, eps=0.0, sq=0.0, cap=None):
    c = len(f)
    z = [cap * math.tanh(v / cap) for v in f] if cap is not None else list(f)
    lse = _logsumexp(z)
    smooth = sum(w[k] * (lse - z[k]) for k in range(c))
    return (1 - eps) * w[y] * (lse - z[y]) + eps / c * smooth + sq * w[y] * lse**2


def py_comp_sum(f, y, w, tau):
    u = sum(math.exp(f[k] - f[y]) for k in range(len(f)) if k != y)
    if tau == 1.0:
        phi = math.log1p(u)
    else:
        phi = ((1 + u) ** (1 - tau) - 1) / (1 - tau)
    return w[y] * phi


def _ldr_d(f, y, margin):
    return [f[k] - f[y] + (margin if k != y else 0.0) for k in range(len(f))]


def py_ldr(f, y, w, lam, margin):
    d = _ldr_d(f, y, margin)
    k_classes = len(f)
    return w[y] * lam * math.log(sum(math.exp(v / lam) for v in d) / k_classes)


def py_aldr_lambda(f, y, lam, margin, alpha):
    d = _ldr_d(f, y, margin)
    k_classes = len(f)
    log_k = math.log(k_classes)
    lse = _logsumexp([v / lam for v in d])
    p0 = [math.exp(v / lam - lse) for v in d]
    kl = sum(p * math.log(k_classes * p) for p in p0 if p > 0)
    return lam * (1 - kl / (alpha * log_k))


def py_aldr(f, y, w, lam, margin, alpha):
    d = _ldr_d(f, y, margin)
    k_classes = len(f)
    log_k = math.log(k_classes)
    lam_i = py_aldr_lambda(f, y, lam, margin, alpha)
    robust = lam_i * (_logsumexp([v / lam_i for v in d]) - log_k)
    return w[y] * (robust - alpha * log_k / (2 * lam) * (lam_i - lam) ** 2)


def py_z_loss(f, y, w, a, b, eps):
    c = len(f)
    mu = sum(f) / c
    var = sum((v - mu) ** 2 for v in f) / c
    z_y = (f[y] - mu) / math.sqrt(var + eps)
    return w[y] * _softplus(a * (b - z_y)) / a


def _py_s(x):
    return x + 1.0 if x >= 0 else 1.0 / (1.0 - x)


def py_stablemax_ce(f, y, w):
    total = sum(_py_s(v) for v in f)
    return w[y] * -math.log(_py_s(f[y]) / total)


def py_reference(row_fn, logits, target, weight, reduction, ignore_index=IGNORE):
    """Apply a row formula and reduce exactly as described in the spec."""
    n, c = logits.shape
    w = weight.tolist() if weight is not None else [1.0] * c
    rows, denom = [], 0.0
    for i in range(n):
        y = int(target[i])
        if y == ignore_index:
            rows.append(0.0)
            continue
        rows.append(row_fn(logits[i].tolist(), y, w))
        denom += w[y]
    if reduction == "none":
        return torch.tensor(rows, dtype=F64)
    total = sum(rows)
    if reduction == "sum":
        return torch.tensor(total, dtype=F64)
    return torch.tensor(total / denom if denom != 0 else math.nan, dtype=F64)


# ---------------------------------------------------------------------------
# Registry of loss configurations used by the generic tests
#   name -> (reference call, row formula, weight multiplies the row loss?)
# ---------------------------------------------------------------------------

CASES = {
    "ce": (
        lambda x, t, **kw: ref.cross_entropy(x, t, **kw),
        lambda f, y, w: py_cross_entropy(f, y, w),
        True,
    ),
    "ce_smooth_sq_cap": (
        lambda x, t, **kw: ref.cross_entropy(
            x, t, label_smoothing=0.15, lse_square_scale=0.03, softcap=2.5, **kw
        ),
        lambda f, y, w: py_cross_entropy(f, y, w, eps=0.15, sq=0.03, cap=2.5),
        False,  # the smoothing term uses w_k, not w_y
    ),
    "comp_sum_tau0": (
        lambda x, t, **kw: ref.comp_sum_loss(x, t, 0.0, **kw),
        lambda f, y, w: py_comp_sum(f, y, w, 0.0),
        True,
    ),
    "comp_sum_tau0.5": (
        lambda x, t, **kw: ref.comp_sum_loss(x, t, 0.5, **kw),
        lambda f, y, w: py_comp_sum(f, y, w, 0.5),
        True,
    ),
    "comp_sum_tau1": (
        lambda x, t, **kw: ref.comp_sum_loss(x, t, 1.0, **kw),
        lambda f, y, w: py_comp_sum(f, y, w, 1.0),
        True,
    ),
    "comp_sum_tau2.5": (
        lambda x, t, **kw: ref.comp_sum_loss(x, t, 2.5, **kw),
        lambda f, y, w: py_comp_sum(f, y, w, 2.5),
        True,
    ),
    "ldr": (
        lambda x, t, **kw: ref.ldr_loss(x, t, 0.7, margin=0.5, **kw),
        lambda f, y, w: py_ldr(f, y, w, 0.7, 0.5),
        True,
    ),
    "aldr": (
        lambda x, t, **kw: ref.ldr_loss(x, t, 0.7, margin=0.5, adaptive=True, alpha=3.0, **kw),
        lambda f, y, w: py_aldr(f, y, w, 0.7, 0.5, 3.0),
        True,
    ),
    "z_loss": (
        lambda x, t, **kw: ref.spherical_z_loss(x, t, 2.0, 1.5, eps=1e-3, **kw),
        lambda f, y, w: py_z_loss(f, y, w, 2.0, 1.5, 1e-3),
        True,
    ),
    "z_loss_steep": (
        lambda x, t, **kw: ref.spherical_z_loss(x, t, 25.0, 2.0, eps=0.0, **kw),
        lambda f, y, w: py_z_loss(f, y, w, 25.0, 2.0, 0.0),
        True,
    ),
    "stablemax": (
        lambda x, t, **kw: ref.stablemax_cross_entropy(x, t, **kw),
        lambda f, y, w: py_stablemax_ce(f, y, w),
        True,
    ),
}
CASE_NAMES = list(CASES)
GRADCHECK_CASES = [name for name in CASE_NAMES if name != "aldr"]  # aldr: see analytic test
REDUCTIONS = ["none", "sum", "mean"]


def call(name, x, t, **kw):
    return CASES[name][0](x, t, **kw)


# ---------------------------------------------------------------------------
# Generic tests, every loss
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_row_formula(name, reduction, weighted):
    x, t, w = make_inputs(9, 6, seed=11, scale=2.0, n_ignored=2)
    weight = w if weighted else None
    got = call(name, x, t, weight=weight, reduction=reduction)
    expected = py_reference(CASES[name][1], x, t, weight, reduction)
    assert got.dtype == F64
    assert_close(got, expected)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("weighted", [False, True])
def test_reduction_consistency(name, weighted):
    x, t, w = make_inputs(13, 5, seed=12, scale=1.5, n_ignored=3)
    weight = w if weighted else None
    none = call(name, x, t, weight=weight, reduction="none")
    total = call(name, x, t, weight=weight, reduction="sum")
    mean = call(name, x, t, weight=weight, reduction="mean")
    valid = t != IGNORE
    denom = (w[t[valid]].sum() if weighted else valid.sum().to(F64))
    assert none.shape == (13,)
    assert total.shape == () and mean.shape == ()
    assert_close(total, none.sum())
    assert_close(mean, total / denom)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ignored_rows_zero_loss_and_grad(name, reduction):
    x, t, w = make_inputs(8, 7, seed=13, scale=2.0)
    ignored = torch.tensor([0, 3, 6])
    t[ignored] = IGNORE
    x.requires_grad_(True)
    out = call(name, x, t, weight=w, reduction=reduction)
    (out.sum() if reduction == "none" else out).backward()
    if reduction == "none":
        assert torch.all(out[ignored] == 0)
        assert torch.all(out[[1, 2, 4, 5, 7]] != 0)
    assert torch.all(x.grad[ignored] == 0)
    assert torch.all(x.grad[[1, 2, 4, 5, 7]].abs().sum(dim=1) > 0)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_ignored_rows_do_not_change_other_rows(name):
    x, t, w = make_inputs(10, 6, seed=14, scale=1.5)
    t2 = t.clone()
    t2[[2, 5]] = IGNORE
    full = call(name, x, t, weight=w, reduction="none")
    part = call(name, x, t2, weight=w, reduction="none")
    keep = t2 != IGNORE
    assert_close(part[keep], full[keep])
    # mean over the kept rows equals the mean over the sub-batch without them
    sub_mean = call(name, x[keep], t[keep], weight=w, reduction="mean")
    assert_close(call(name, x, t2, weight=w, reduction="mean"), sub_mean)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_custom_in_range_ignore_index(name):
    x, t, w = make_inputs(9, 5, seed=15, scale=1.5, n_ignored=3, ignore_index=2)
    got = call(name, x, t, weight=w, ignore_index=2, reduction="none")
    expected = py_reference(CASES[name][1], x, t, w, "none", ignore_index=2)
    assert_close(got, expected)
    assert torch.all(got[:3] == 0)


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if CASES[n][2]])
def test_weight_multiplies_row_loss(name):
    x, t, w = make_inputs(11, 6, seed=16, scale=1.5, n_ignored=2)
    plain = call(name, x, t, reduction="none")
    weighted = call(name, x, t, weight=w, reduction="none")
    valid = t != IGNORE
    w_y = torch.where(valid, w[t.clamp(0)], torch.zeros(()))
    assert_close(weighted, plain * w_y)
    mean = call(name, x, t, weight=w, reduction="mean")
    assert_close(mean, (plain * w_y).sum() / w_y.sum())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_uniform_weight_does_not_change_mean(name):
    x, t, _ = make_inputs(7, 4, seed=17, scale=1.5, n_ignored=1)
    plain = call(name, x, t, reduction="mean")
    scaled = call(name, x, t, weight=torch.full((4,), 3.0, dtype=F64), reduction="mean")
    assert_close(scaled, plain)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_empty_batch(name):
    x = torch.randn(0, 5, dtype=F64, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    none = call(name, x, t, reduction="none")
    assert none.shape == (0,) and none.dtype == F64
    total = call(name, x, t, reduction="sum")
    assert total.shape == () and total.item() == 0.0
    mean = call(name, x, t, reduction="mean")
    assert mean.shape == () and math.isnan(mean.item())
    # same as torch for cross-entropy
    assert math.isnan(F.cross_entropy(x, t, reduction="mean").item())
    assert F.cross_entropy(x, t, reduction="sum").item() == 0.0


@pytest.mark.parametrize("name", CASE_NAMES)
def test_all_rows_ignored(name):
    x, t, w = make_inputs(4, 5, seed=18, n_ignored=4)
    for weight in (None, w):
        assert torch.all(call(name, x, t, weight=weight, reduction="none") == 0)
        assert call(name, x, t, weight=weight, reduction="sum").item() == 0.0
        assert math.isnan(call(name, x, t, weight=weight, reduction="mean").item())


@pytest.mark.parametrize("name", GRADCHECK_CASES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck(name, reduction):
    x, t, w = make_inputs(5, 7, seed=19, scale=1.5, n_ignored=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda inp: call(name, inp, t, weight=w, reduction=reduction), (x,)
    )


@pytest.mark.parametrize("name", CASE_NAMES)
def test_compute_dtype(name):
    x32, t, w = make_inputs(6, 5, seed=20, scale=1.5, n_ignored=1, dtype=torch.float32)
    # default: cast to float64 and compute there
    got = call(name, x32, t, weight=w.float(), reduction="none")
    assert got.dtype == F64
    assert_close(got, call(name, x32.double(), t, weight=w.float().double(), reduction="none"))
    # compute_dtype=None: computed in the logits' own dtype
    eager = call(name, x32, t, weight=w.float(), reduction="none", compute_dtype=None)
    assert eager.dtype == torch.float32
    assert_close(eager.double(), got, rtol=1e-5, atol=1e-5)
    eager_mean = call(name, x32, t, weight=w.float(), reduction="mean", compute_dtype=None)
    assert eager_mean.dtype == torch.float32
    # explicit float32
    f32 = call(name, x32.double(), t, reduction="sum", compute_dtype=torch.float32)
    assert f32.dtype == torch.float32


@pytest.mark.parametrize("name", CASE_NAMES)
def test_grad_flows_to_float32_input(name):
    x32, t, _ = make_inputs(4, 6, seed=21, dtype=torch.float32)
    x32.requires_grad_(True)
    call(name, x32, t).backward()
    assert x32.grad.dtype == torch.float32
    assert torch.isfinite(x32.grad).all() and x32.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_reduction(name):
    x, t, _ = make_inputs(3, 4, seed=22)
    with pytest.raises(ValueError, match="reduction"):
        call(name, x, t, reduction="avg")


# ---------------------------------------------------------------------------
# 1. cross_entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index,n_ignored", [(IGNORE, 0), (IGNORE, 3), (1, 3)])
def test_cross_entropy_matches_torch(reduction, weighted, smoothing, ignore_index, n_ignored):
    x, t, w = make_inputs(12, 7, seed=30, scale=2.0, n_ignored=n_ignored, ignore_index=ignore_index)
    weight = w if weighted else None
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    got = ref.cross_entropy(x1, t, **kw)
    expected = F.cross_entropy(x2, t, **kw)
    assert_close(got, expected)
    got.sum().backward()
    expected.sum().backward()
    assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_eager_float32_matches_torch(reduction):
    x, t, w = make_inputs(16, 9, seed=31, scale=3.0, n_ignored=2, dtype=torch.float32)
    got = ref.cross_entropy(x, t, weight=w.float(), reduction=reduction, label_smoothing=0.1,
                            compute_dtype=None)
    expected = F.cross_entropy(x, t, weight=w.float(), reduction=reduction, label_smoothing=0.1)
    assert got.dtype == torch.float32
    assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_lse_square_and_softcap_terms():
    x, t, _ = make_inputs(10, 6, seed=32, scale=4.0, n_ignored=2)
    valid = t != IGNORE
    base = ref.cross_entropy(x, t, reduction="none")
    with_sq = ref.cross_entropy(x, t, reduction="none", lse_square_scale=0.25)
    lse = torch.logsumexp(x, dim=-1)
    assert_close(with_sq - base, torch.where(valid, 0.25 * lse**2, torch.zeros(())))
    # softcap == F.cross_entropy on the capped logits
    capped = 3.0 * torch.tanh(x / 3.0)
    assert_close(
        ref.cross_entropy(x, t, softcap=3.0, reduction="mean"),
        F.cross_entropy(capped, t, reduction="mean"),
    )
    # a huge softcap is (nearly) no cap
    assert_close(ref.cross_entropy(x, t, softcap=1e6), ref.cross_entropy(x, t), rtol=1e-8, atol=1e-10)


def test_cross_entropy_large_logits_stable():
    x, t, _ = make_inputs(6, 5, seed=33, scale=1000.0)
    got = ref.cross_entropy(x, t, reduction="none")
    assert torch.isfinite(got).all()
    assert_close(got, F.cross_entropy(x, t, reduction="none"))


def test_cross_entropy_validation():
    x, t, _ = make_inputs(3, 4, seed=34)
    with pytest.raises(ValueError, match="label_smoothing"):
        ref.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        ref.cross_entropy(x, t, softcap=0.0)
    with pytest.raises(ValueError, match="logits"):
        ref.cross_entropy(x[0], t)
    with pytest.raises(ValueError, match="target"):
        ref.cross_entropy(x, t[:2])
    with pytest.raises(ValueError, match="weight"):
        ref.cross_entropy(x, t, weight=torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------
# 2. comp_sum_loss
# ---------------------------------------------------------------------------


def _comp_sum_inputs():
    return make_inputs(12, 6, seed=40, scale=1.5)


def test_comp_sum_tau1_is_cross_entropy():
    x, t, w = _comp_sum_inputs()
    assert_close(ref.comp_sum_loss(x, t, 1.0, reduction="none"), F.cross_entropy(x, t, reduction="none"))
    assert_close(ref.comp_sum_loss(x, t, 1, weight=w), F.cross_entropy(x, t, weight=w))


def test_comp_sum_tau0_is_sum_exponential():
    x, t, _ = _comp_sum_inputs()
    f_y = x.gather(1, t[:, None])
    not_y = torch.arange(6)[None, :] != t[:, None]
    expected = (torch.exp(x - f_y) * not_y).sum(dim=1)
    assert_close(ref.comp_sum_loss(x, t, 0.0, reduction="none"), expected)


def test_comp_sum_tau2_is_mae():
    x, t, _ = _comp_sum_inputs()
    expected = 1.0 - torch.softmax(x, dim=1).gather(1, t[:, None]).squeeze(1)
    assert_close(ref.comp_sum_loss(x, t, 2.0, reduction="none"), expected)


def test_comp_sum_tau1p5_power_formula():
    x, t, _ = _comp_sum_inputs()
    f_y = x.gather(1, t[:, None])
    not_y = torch.arange(6)[None, :] != t[:, None]
    u = (torch.exp(x - f_y) * not_y).sum(dim=1)
    expected = ((1.0 + u) ** (1.0 - 1.5) - 1.0) / (1.0 - 1.5)
    assert_close(ref.comp_sum_loss(x, t, 1.5, reduction="none"), expected)


def test_comp_sum_continuous_at_tau1():
    x, t, _ = _comp_sum_inputs()
    at_one = ref.comp_sum_loss(x, t, 1.0, reduction="none")
    for tau in (1.0 - 1e-6, 1.0 + 1e-6):
        near = ref.comp_sum_loss(x, t, tau, reduction="none")
        assert_close(near, at_one, rtol=1e-5, atol=1e-9)


def test_comp_sum_decreasing_in_tau():
    # Phi_tau(u) is non-increasing in tau for u >= 0
    x, t, _ = _comp_sum_inputs()
    values = [ref.comp_sum_loss(x, t, tau, reduction="none") for tau in (0.0, 0.5, 1.0, 1.5, 2.0, 4.0)]
    for hi, lo in zip(values, values[1:]):
        assert torch.all(lo <= hi + 1e-12)


def test_comp_sum_validation():
    x, t, _ = make_inputs(3, 4, seed=41)
    with pytest.raises(ValueError, match="tau"):
        ref.comp_sum_loss(x, t, -0.1)
    with pytest.raises(ValueError, match="tau"):
        ref.comp_sum_loss(x, t, float("nan"))


# ---------------------------------------------------------------------------
# 3. ldr_loss / ldr_adaptive_lambda
# ---------------------------------------------------------------------------


def test_ldr_margin0_lam1_is_cross_entropy_minus_logk():
    x, t, _ = make_inputs(10, 7, seed=50, scale=2.0)
    got = ref.ldr_loss(x, t, 1.0, margin=0.0, reduction="none")
    assert_close(got, F.cross_entropy(x, t, reduction="none") - math.log(7))


def test_ldr_small_lambda_is_hinge_like():
    x, t, _ = make_inputs(10, 7, seed=51, scale=2.0)
    lam, margin, k = 1e-3, 1.0, 7
    got = ref.ldr_loss(x, t, lam, margin=margin, reduction="none")
    f_y = x.gather(1, t[:, None]).squeeze(1)
    others = x.masked_fill(torch.arange(k)[None, :] == t[:, None], -math.inf)
    hinge = torch.clamp(others.max(dim=1).values - f_y + margin, min=0.0)
    # lam * logsumexp(d / lam) lies in [max d, max d + lam log K]
    assert torch.all(got >= hinge - lam * math.log(k) - 1e-12)
    assert torch.all(got <= hinge + 1e-12)
    assert_close(got, hinge - lam * math.log(k), rtol=0, atol=lam * math.log(k) + 1e-12)


def test_ldr_large_lambda_tends_to_mean_margin():
    # lam -> inf: lam * log(mean exp(d / lam)) -> mean_k d_k
    x, t, _ = make_inputs(8, 5, seed=52)
    d = x - x.gather(1, t[:, None]) + 0.5 * (torch.arange(5)[None, :] != t[:, None]).to(F64)
    got = ref.ldr_loss(x, t, 1e6, margin=0.5, reduction="none")
    assert_close(got, d.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_aldr_lambda_range():
    lam, alpha = 0.8, 2.5
    for seed, scale in ((53, 0.3), (54, 3.0), (55, 50.0)):
        x, t, _ = make_inputs(40, 9, seed=seed, scale=scale)
        lam_i = ref.ldr_adaptive_lambda(x, t, lam, margin=1.0, alpha=alpha)
        assert lam_i.shape == (40,) and lam_i.dtype == F64
        assert not lam_i.requires_grad
        assert torch.all(lam_i >= lam * (1 - 1 / alpha) - 1e-12)
        assert torch.all(lam_i <= lam + 1e-12)
    # very peaked rows push lam_i to the lower end of the range
    assert lam_i.min() < lam * (1 - 1 / alpha) + 0.05


def test_aldr_lambda_matches_formula():
    x, t, _ = make_inputs(9, 6, seed=56, scale=2.0)
    lam_i = ref.ldr_adaptive_lambda(x, t, 0.6, margin=0.3, alpha=4.0)
    expected = [py_aldr_lambda(x[i].tolist(), int(t[i]), 0.6, 0.3, 4.0) for i in range(9)]
    assert_close(lam_i, torch.tensor(expected, dtype=F64))


def test_aldr_lambda_uniform_logits():
    x = torch.full((4, 6), 1.7, dtype=F64)
    t = torch.tensor([0, 2, 5, 3])
    lam_i = ref.ldr_adaptive_lambda(x, t, 0.9, margin=0.0, alpha=2.0)
    assert_close(lam_i, torch.full((4,), 0.9, dtype=F64))
    # and the adaptive loss then equals the non-adaptive one (both 0 here)
    a = ref.ldr_loss(x, t, 0.9, margin=0.0, adaptive=True, reduction="none")
    assert_close(a, ref.ldr_loss(x, t, 0.9, margin=0.0, reduction="none"))
    assert_close(a, torch.zeros(4, dtype=F64))


def test_aldr_lambda_ignored_targets_get_lam():
    x, t, _ = make_inputs(5, 4, seed=57, n_ignored=2)
    lam_i = ref.ldr_adaptive_lambda(x, t, 0.5)
    assert torch.all(lam_i[:2] == 0.5)


def test_aldr_uses_helper_lambda():
    x, t, w = make_inputs(10, 6, seed=58, scale=2.0, n_ignored=2)
    lam, margin, alpha = 0.7, 0.4, 3.0
    got = ref.ldr_loss(x, t, lam, margin=margin, adaptive=True, alpha=alpha, weight=w, reduction="none")
    lam_i = ref.ldr_adaptive_lambda(x, t, lam, margin=margin, alpha=alpha)
    tc = t.clamp(0)
    d = x - x.gather(1, tc[:, None]) + margin * (torch.arange(6)[None, :] != tc[:, None]).to(F64)
    log_k = math.log(6)
    row = lam_i * (torch.logsumexp(d / lam_i[:, None], dim=1) - log_k)
    row = row - alpha * log_k / (2 * lam) * (lam_i - lam) ** 2
    valid = t != IGNORE
    assert_close(got, torch.where(valid, w[tc] * row, torch.zeros(())))


def test_aldr_large_alpha_is_ldr():
    x, t, _ = make_inputs(8, 5, seed=59, scale=2.0)
    a = ref.ldr_loss(x, t, 0.6, adaptive=True, alpha=1e9, reduction="none")
    b = ref.ldr_loss(x, t, 0.6, reduction="none")
    assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_aldr_gradient_is_analytic(reduction):
    # lam_i is detached, so d loss_i / d f = w_y * (softmax(d / lam_i) - onehot(y))
    x, t, w = make_inputs(5, 7, seed=60, scale=1.5, n_ignored=1)
    lam, margin, alpha = 0.7, 0.5, 3.0
    x.requires_grad_(True)
    out = ref.ldr_loss(x, t, lam, margin=margin, adaptive=True, alpha=alpha, weight=w, reduction=reduction)
    out.sum().backward()

    valid = t != IGNORE
    tc = t.clamp(0)
    xd = x.detach()
    lam_i = ref.ldr_adaptive_lambda(xd, tc, lam, margin=margin, alpha=alpha)
    d = xd - xd.gather(1, tc[:, None]) + margin * (torch.arange(7)[None, :] != tc[:, None]).to(F64)
    onehot = F.one_hot(tc, 7).to(F64)
    w_y = torch.where(valid, w[tc], torch.zeros(()))
    expected = w_y[:, None] * (torch.softmax(d / lam_i[:, None], dim=1) - onehot)
    if reduction == "mean":
        expected = expected / w_y.sum()
    assert_close(x.grad, expected)


def test_ldr_single_class():
    x = torch.randn(3, 1, dtype=F64, generator=torch.Generator().manual_seed(61))
    t = torch.zeros(3, dtype=torch.long)
    for adaptive in (False, True):
        out = ref.ldr_loss(x, t, 0.5, adaptive=adaptive, reduction="none")
        assert_close(out, torch.zeros(3, dtype=F64))
    assert_close(ref.ldr_adaptive_lambda(x, t, 0.5), torch.full((3,), 0.5, dtype=F64))


def test_ldr_validation():
    x, t, _ = make_inputs(3, 4, seed=62)
    with pytest.raises(ValueError, match="lam"):
        ref.ldr_loss(x, t, 0.0)
    with pytest.raises(ValueError, match="lam"):
        ref.ldr_loss(x, t, -1.0, adaptive=True)
    with pytest.raises(ValueError, match="alpha"):
        ref.ldr_loss(x, t, 1.0, adaptive=True, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ref.ldr_adaptive_lambda(x, t, 1.0, alpha=0.5)
    with pytest.raises(ValueError, match="lam"):
        ref.ldr_adaptive_lambda(x, t, 0.0)


# ---------------------------------------------------------------------------
# 4. spherical_z_loss
# ---------------------------------------------------------------------------


def test_z_loss_shift_invariance():
    x, t, _ = make_inputs(8, 6, seed=70, scale=2.0)
    shift = torch.randn(8, 1, dtype=F64, generator=torch.Generator().manual_seed(71)) * 10
    for eps in (1e-6, 0.0, 0.5):
        a = ref.spherical_z_loss(x, t, 1.5, 2.0, eps=eps, reduction="none")
        b = ref.spherical_z_loss(x + shift, t, 1.5, 2.0, eps=eps, reduction="none")
        assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_z_loss_scale_invariance_eps0():
    x, t, _ = make_inputs(8, 6, seed=72, scale=2.0)
    a = ref.spherical_z_loss(x, t, 1.5, 2.0, eps=0.0, reduction="none")
    b = ref.spherical_z_loss(x * 3.7, t, 1.5, 2.0, eps=0.0, reduction="none")
    assert_close(a, b)
    # with eps > 0 scaling changes the loss
    c = ref.spherical_z_loss(x, t, 1.5, 2.0, eps=1.0, reduction="none")
    d = ref.spherical_z_loss(x * 3.7, t, 1.5, 2.0, eps=1.0, reduction="none")
    assert not torch.allclose(c, d)


def test_z_loss_direct_formula_numpy():
    np = pytest.importorskip("numpy")
    x, t, _ = make_inputs(5, 8, seed=73, scale=3.0)
    a, b, eps = 3.0, 0.5, 1e-4
    xn, tn = x.numpy(), t.numpy()
    mu = xn.mean(axis=1)
    sigma = np.sqrt(xn.var(axis=1) + eps)
    z_y = (xn[np.arange(5), tn] - mu) / sigma
    expected = np.logaddexp(0.0, a * (b - z_y)) / a
    got = ref.spherical_z_loss(x, t, a, b, eps=eps, reduction="none")
    assert_close(got, torch.from_numpy(expected))


def test_z_loss_accurate_in_linear_regime():
    # large a * (b - z): softplus must not be linearised (F.softplus threshold)
    x, t, _ = make_inputs(6, 5, seed=74)
    got = ref.spherical_z_loss(x, t, 40.0, 3.0, eps=0.0, reduction="none")
    expected = py_reference(lambda f, y, w: py_z_loss(f, y, w, 40.0, 3.0, 0.0), x, t, None, "none")
    assert_close(got, expected, rtol=1e-14, atol=0)


def test_z_loss_validation():
    x, t, _ = make_inputs(3, 4, seed=75)
    with pytest.raises(ValueError, match="a must"):
        ref.spherical_z_loss(x, t, 0.0, 1.0)
    with pytest.raises(ValueError, match="eps"):
        ref.spherical_z_loss(x, t, 1.0, 1.0, eps=-1e-3)


# ---------------------------------------------------------------------------
# 5. stablemax_cross_entropy
# ---------------------------------------------------------------------------


def test_stablemax_probabilities_sum_to_one():
    x, _, _ = make_inputs(10, 7, seed=80, scale=5.0)
    p = ref.stablemax(x)
    assert torch.all(p > 0)
    assert_close(p.sum(dim=1), torch.ones(10, dtype=F64))
    # exp(-loss) over every possible target also sums to one
    total = torch.zeros(10, dtype=F64)
    for k in range(7):
        t = torch.full((10,), k, dtype=torch.long)
        total += torch.exp(-ref.stablemax_cross_entropy(x, t, reduction="none"))
    assert_close(total, torch.ones(10, dtype=F64))


def test_stablemax_direct_formula():
    x, t, _ = make_inputs(10, 7, seed=81, scale=5.0)
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))  # no autograd here, both branches fine
    expected = -torch.log(s.gather(1, t[:, None]).squeeze(1) / s.sum(dim=1))
    assert_close(ref.stablemax_cross_entropy(x, t, reduction="none"), expected)
    assert_close(ref.stablemax(x), s / s.sum(dim=1, keepdim=True))


def test_stablemax_monotone_in_target_logit():
    x, t, _ = make_inputs(4, 6, seed=82, scale=2.0)
    values = torch.linspace(-50.0, 50.0, 201, dtype=F64)
    losses = []
    for v in values:
        xv = x.clone()
        xv[torch.arange(4), t] = v
        losses.append(ref.stablemax_cross_entropy(xv, t, reduction="none"))
    losses = torch.stack(losses)  # [steps, 4]
    assert torch.all(losses[1:] < losses[:-1])


def test_stablemax_gradient_at_zero_and_extremes():
    # s is C^1 at 0 (derivative 1 from both sides); large |x| must not produce inf/nan
    x = torch.tensor([[0.0, -1e30, 2.0, -0.5], [1e30, 0.0, -3.0, 0.25]], dtype=F64, requires_grad=True)
    t = torch.tensor([0, 1])
    out = ref.stablemax_cross_entropy(x, t, reduction="sum")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    xd = x.detach()
    s = torch.where(xd >= 0, xd + 1, 1 / (1 - xd))
    ds = torch.where(xd >= 0, torch.ones_like(xd), 1 / (1 - xd) ** 2)
    expected = ds / s.sum(dim=1, keepdim=True)
    rows = torch.arange(2)
    expected[rows, t] -= ds[rows, t] / s[rows, t]
    assert_close(x.grad, expected)
