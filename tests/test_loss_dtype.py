"""The dtype every loss comes back in, as torch's losses give it (ops/_dtypes.py): the inputs'
dtype, except under torch.autocast, where torch runs its losses in float32 and so returns
float32. The kernels sum in float32 either way, so the two results differ by the final rounding
only: checked exactly, with the gradients (the same in both), and the autocast value against the
op on float32 copies of the inputs (a bfloat16 result is ~1e-3 off that; the float32 one is not).
Values themselves are checked against float64 references in each family's test file."""

import pytest
import torch
import torch.nn.functional as F

from fastloss import ops

from conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


def _randn(*shape, dev, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dev)


def _ints(high, n, dev, seed):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).to(dev)


# name -> (inputs(dev): (differentiable leaves, other arguments), loss(*leaves, *others))
def _rows(dev):
    return [_randn(37, 101, dev=dev, seed=1, scale=3.0)], [_ints(101, 37, dev, 2)]


def _linear(dev):
    return ([_randn(45, 24, dev=dev, seed=3), _randn(77, 24, dev=dev, seed=4, scale=0.3)],
            [_ints(77, 45, dev, 5)])


def _pair(dev):
    return [_randn(33, 53, dev=dev, seed=6, scale=2.0), _randn(33, 53, dev=dev, seed=7, scale=2.0)], []


def _embeddings(dev):
    return [_randn(41, 16, dev=dev, seed=8)], [_ints(5, 41, dev, 9)]


def _clip(dev):
    return [_randn(29, 16, dev=dev, seed=10), _randn(29, 16, dev=dev, seed=11)], []


CASES = {
    "cross_entropy": (_rows, lambda x, t: ops.cross_entropy(x, t, label_smoothing=0.1)),
    "cross_entropy_none": (_rows, lambda x, t: ops.cross_entropy(x, t, reduction="none")),
    "cross_entropy_grad_in_forward": (_rows, lambda x, t: ops.cross_entropy(x, t, grad_in_forward=True)),
    "comp_sum_loss": (_rows, lambda x, t: ops.comp_sum_loss(x, t, tau=1.5)),
    "ldr_loss": (_rows, lambda x, t: ops.ldr_loss(x, t, lam=2.0)),
    "spherical_z_loss": (_rows, lambda x, t: ops.spherical_z_loss(x, t, a=1.0, b=2.0)),
    "stablemax_cross_entropy": (_rows, lambda x, t: ops.stablemax_cross_entropy(x, t, reduction="sum")),
    "linear_cross_entropy": (_linear, lambda h, w, t: ops.linear_cross_entropy(h, w, t, reduction="sum")),
    "linear_cross_entropy_none": (_linear, lambda h, w, t: ops.linear_cross_entropy(h, w, t, reduction="none")),
    "linear_cross_entropy_low_memory": (
        _linear, lambda h, w, t: ops.linear_cross_entropy(h, w, t, low_memory=True, block_rows=16)),
    "linear_comp_sum_loss": (_linear, lambda h, w, t: ops.linear_comp_sum_loss(h, w, t, tau=0.5)),
    "kd_loss": (_pair, lambda s, t: ops.kd_loss(s, t.detach(), T=2.0, kind="jsd", beta=0.3)),
    "kd_loss_teacher_grad": (_pair, lambda s, t: ops.kd_loss(s, t, T=2.0)),
    "topk_kl_loss": (_pair, lambda s, t: ops.topk_kl_loss(s, t.detach(), k=7, T=1.5)),
    "pld_loss": (_pair, lambda s, t: ops.pld_loss(s, t.detach(), torch.arange(33, device=s.device) % 53)),
    "dice_loss_softmax": (_rows, lambda x, t: ops.dice_loss(x, t, alpha=0.5, gamma=0.5)),
    "dice_loss_sigmoid": (_pair, lambda x, y: ops.dice_loss(x, (y.detach() > 0).float(), gamma=0.5,
                                                            reduction="none")),
    "anyloss": (_pair, lambda x, y: ops.anyloss(x, (y.detach() > 0).float(), metric="f1")),
    "mw_auc_loss": (_pair, lambda p, n: ops.mw_auc_loss(p, n)),
    "contrastive_loss": (_clip, lambda a, b: ops.contrastive_loss(a, b, T=0.1)),
    "contrastive_loss_weights": (
        _clip, lambda a, b: ops.contrastive_loss(a, b, T=0.1, weights=torch.eye(29, device=a.device) + 0.1)),
    "multi_similarity_loss": (_embeddings, lambda e, y: ops.multi_similarity_loss(e, y, epsilon=0.5)),
    "tcm_loss": (_embeddings, lambda e, y: ops.tcm_loss(e, y, pos_margin=0.3, neg_margin=0.0)),
    "proto_triplet_loss": (_embeddings, lambda e, y: ops.proto_triplet_loss(e, y, margin=2.0)),
    "icnn_loss": (_embeddings, lambda e, y: ops.icnn_loss(e, y, k=3)),
}


def _run(case, dev, dtype, autocast):
    make, loss = CASES[case]
    leaves, others = make(dev)
    leaves = [x.to(dtype).requires_grad_(True) for x in leaves]
    with torch.autocast(dev, dtype=dtype, enabled=autocast):  # (the inputs' dtype: nothing recast)
        out = loss(*leaves, *others)
    out.sum().backward()
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_dtype_follows_torch(case, dtype, dev):
    plain, plain_grads = _run(case, dev, dtype, autocast=False)
    assert plain.dtype == dtype, f"{case}: {plain.dtype} outside autocast (the inputs are {dtype})"
    amp, amp_grads = _run(case, dev, dtype, autocast=True)
    assert amp.dtype == torch.float32, f"{case}: {amp.dtype} under autocast (torch's losses: float32)"
    # the same sums: the rounding of the result is the only difference
    torch.testing.assert_close(plain, amp.to(dtype), rtol=0, atol=0, equal_nan=True)
    for g, h in zip(plain_grads, amp_grads):
        if g is None:  # (a detached teacher, targets made from an input)
            assert h is None
            continue
        assert g.dtype == h.dtype == dtype
        torch.testing.assert_close(g, h, rtol=0, atol=0)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("linear")])
def test_autocast_loss_keeps_float32_digits(case, dev):
    """Under autocast the loss of bfloat16 inputs is the float32 sum the kernels formed: the op
    on float32 copies of the same values agrees to float32 summation order, far closer than a
    bfloat16 result (8 significant bits) could be. (The linear losses form bfloat16 logits
    under autocast, as F.linear: their float32 twin differs by those; their dtype and rounding
    are checked above.)"""
    amp, _ = _run(case, dev, torch.bfloat16, autocast=True)
    make, loss = CASES[case]
    leaves, others = make(dev)
    full = loss(*[x.to(torch.bfloat16).float() for x in leaves], *others)
    torch.testing.assert_close(amp, full, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("linear")])
def test_autocast_leaves_float32_inputs_alone(case, dev):
    """A loss takes its inputs as they are under autocast, and nothing inside it is recast: float32
    inputs give exactly the float32 result and gradients of the same call without autocast.
    (Inside an op autocast used to reach the GEMMs: proto_triplet_loss raised "expected scalar
    type Float", the weighted contrastive loss dropped its similarities to bfloat16.)"""
    plain, plain_grads = _run(case, dev, torch.float32, autocast=False)
    make, loss = CASES[case]
    leaves, others = make(dev)
    leaves = [x.requires_grad_(True) for x in leaves]
    with torch.autocast(dev, dtype=torch.bfloat16):
        amp = loss(*leaves, *others)
    amp.sum().backward()
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, plain, rtol=0, atol=0, equal_nan=True)
    for g, x in zip(plain_grads, leaves):
        torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def _quant(dev):
    w = _randn(48, 64, dev="cpu", seed=12)
    return ops.quantize_weight(w, bits=4, group_size=32, symmetric=False).to(dev)


LAYERS = {  # ops that are a linear layer or a convolution at heart: cast as F.linear / F.conv1d
    "dequant_gemm_1_row": lambda dev: (lambda x, b: ops.dequant_gemm(x, _quant(dev), b),
                                       [_randn(1, 64, dev=dev, seed=13), _randn(48, dev=dev, seed=14)]),
    "dequant_gemm_70_rows": lambda dev: (lambda x, b: ops.dequant_gemm(x, _quant(dev), b),
                                         [_randn(70, 64, dev=dev, seed=15), _randn(48, dev=dev, seed=16)]),
    "dilated_conv1d_depthwise": lambda dev: (
        lambda x, w, b: ops.dilated_conv1d(x, w, b, dilation=3),
        [_randn(2, 5, 41, dev=dev, seed=17), _randn(5, 3, dev=dev, seed=18), _randn(5, dev=dev, seed=19)]),
    "dilated_conv1d_full": lambda dev: (
        lambda x, w, b: ops.dilated_conv1d(x, w, b, dilation=2),
        [_randn(2, 4, 41, dev=dev, seed=20), _randn(6, 4, 3, dev=dev, seed=21), _randn(6, dev=dev, seed=22)]),
}


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("case", list(LAYERS))
def test_layers_cast_as_torch_layers(case, dev):
    """Under autocast dequant_gemm and dilated_conv1d cast their float32 inputs to the autocast
    dtype as F.linear / F.conv1d do (a QuantLinear stays a drop-in nn.Linear; the depthwise
    kernel path and the full-weight F.conv1d path agree): the result is the op on inputs cast
    by hand, exactly, and the float32 leaves get float32 gradients."""
    fn, inputs = LAYERS[case](dev)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = fn(*leaves)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    cast = [x.to(torch.bfloat16).requires_grad_(True) for x in inputs]
    want = fn(*cast)
    want.float().sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for x, c in zip(leaves, cast):
        assert x.grad.dtype == torch.float32
        torch.testing.assert_close(x.grad, c.grad.float(), rtol=0, atol=0)


def test_compiled_under_autocast():
    """torch.compile(fullgraph=True) traces the dtype rules (autocast's state is read while
    tracing): the same dtypes and values as eager, inside and outside autocast."""
    def f(x, t, h, w, ht, e, y):
        return (ops.cross_entropy(x, t), ops.linear_cross_entropy(h, w, ht),
                ops.proto_triplet_loss(e, y, margin=2.0))

    (x,), (t,) = _rows("cpu")
    (h, w), (ht,) = _linear("cpu")
    (e,), (y,) = _embeddings("cpu")
    args = (x.bfloat16(), t, h.bfloat16(), w.bfloat16(), ht, e.bfloat16(), y)
    compiled = torch.compile(f, fullgraph=True)
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want, got = f(*args), compiled(*args)
        for u, v in zip(want, got):
            assert u.dtype == v.dtype
            torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-6)
        for u in want:
            assert u.dtype == (torch.float32 if autocast else torch.bfloat16)


@pytest.mark.parametrize("dev", DEVICES)
def test_linear_loss_keeps_float32_digits(dev):
    """The fused linear loss under autocast is F.cross_entropy of F.linear's bfloat16 logits,
    summed in float32: within float32 summation order of that, where a bfloat16 loss (8
    significant bits, rounded inside and then cast back) would be ~1e-3 off."""
    h, w = _randn(256, 64, dev=dev, seed=23), _randn(500, 64, dev=dev, seed=24, scale=0.5)
    t = _ints(500, 256, dev, 25)
    with torch.autocast(dev, dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(h, w, t, reduction="sum")
        logits = F.linear(h, w)
    want = F.cross_entropy(logits.double(), t, reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("case", ["multi_similarity_loss", "tcm_loss", "proto_triplet_loss",
                                  "contrastive_loss_weights"])
def test_torch_paths_leave_float32_inputs_alone(monkeypatch, case):
    """The torch-operation paths (devices without fastloss kernels, e.g. CUDA tensors with a
    CPU-only build) keep autocast out of their GEMMs as the kernels do."""
    from fastloss.ops import few_shot, metric
    monkeypatch.setattr(metric, "_kernels", lambda e: False)
    monkeypatch.setattr(few_shot, "_kernels", lambda x: False)
    test_autocast_leaves_float32_inputs_alone(case, "cpu")


@pytest.mark.parametrize("dev", DEVICES)
def test_tcn_level_keeps_its_inputs_under_autocast(dev):
    """tcn_level (fused, depthwise [C, K] weights; and the torch path, [C, 1, K] grouped
    weights) gives float32 x a float32 result under autocast, convolution included: the same
    as without autocast, and the two paths agree."""
    x, w, b = _randn(2, 5, 41, dev=dev, seed=26), _randn(5, 3, dev=dev, seed=27), _randn(5, dev=dev, seed=28)
    for weight in (w, w[:, None, :]):
        plain = ops.tcn_level(x, weight, b, dilation=2)
        with torch.autocast(dev, dtype=torch.bfloat16):
            amp = ops.tcn_level(x, weight, b, dilation=2)
        assert amp.dtype == torch.float32
        torch.testing.assert_close(amp, plain, rtol=0, atol=0)
    with torch.autocast(dev, dtype=torch.bfloat16):
        fused, full = ops.tcn_level(x, w, b, dilation=2), ops.tcn_level(x, w[:, None, :], b, dilation=2)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)


def _rounding_op_cases(x, t, teacher):
    """(op name, arguments before the reduction, arguments after it, whether it takes the
    inplace / grad_in_forward flags: None for an op without a reduction) of every op with a
    round_loss flag."""
    rows = {"cross_entropy": (0.1, 0.0, 0.0), "comp_sum": (1.5,), "ldr": (2.0, 1.0, False, 2.0),
            "spherical_z": (1.0, 2.0, 1e-6), "stablemax": ()}
    cases = [(f"{name}_loss", (t, None, -100), scalars, True) for name, scalars in rows.items()]
    head = (0.1 * teacher[:29]).contiguous()  # a [V, D] weight for x as hidden states
    return cases + [("linear_loss", (head, t % 29, None, None, 0, [0.1, 0.0, 0.0], -100), (0,), False),
                    ("dice_loss", (t, True, 0.5, 1.0, 1.0, -100), (), False),
                    ("mw_auc_loss", (teacher,), (), False),
                    ("anyloss", ((teacher > 0).float(), 0, 20.0, 1.0, True), (), None),
                    ("contrastive_loss", (teacher, 0.5, True, 16), (), False),
                    ("kd_loss", (teacher, 2, 2.0, 0.3), (), False),
                    ("topk_kl_loss", (teacher, 7, 2.0, False), (), False),
                    ("pld_loss", (teacher, t, 2.0, -100), (), False)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dev", DEVICES)
def test_loss_ops_round_the_loss_themselves(dtype, dev):
    """The row, fused linear, Dice, AnyLoss, AUC, contrastive and distillation losses' ops
    round to the inputs' dtype with round_loss=True (what the functions ask for outside
    autocast), so that no cast op and autograd node of its own follows them: the value is the
    float32 op's rounded, the gradient the same; opcheck with the flag."""
    x = _randn(37, 101, dev=dev, seed=12, scale=3.0).to(dtype)
    t = _ints(101, 37, dev, 13)
    teacher = _randn(37, 101, dev=dev, seed=14, scale=3.0).to(dtype)
    for name, before, after, flags in _rounding_op_cases(x, t, teacher):
        op = getattr(torch.ops.fastloss, name).default
        for reduction in ((0, 1, 2) if flags is not None else (None,)):
            red = () if reduction is None else (reduction,)
            for fused in ((False, True) if flags else (None,)):
                a, b = (x.clone().requires_grad_(True) for _ in range(2))
                # the row losses: (..., reduction, scalars, inplace, grad_in_forward)
                args = lambda v: (v, *before, *red, *after) + ((False, fused) if flags else ())  # noqa: E731
                rounded = op(*args(a), round_loss=True)
                plain = op(*args(b))
                assert rounded.dtype == dtype and plain.dtype == torch.float32, (name, reduction)
                assert type(rounded.grad_fn).__name__ != "ToCopyBackward0"
                torch.testing.assert_close(rounded, plain.to(dtype), rtol=0, atol=0)
                up = torch.rand(rounded.shape, device=dev).to(dtype)
                rounded.backward(up)
                plain.backward(up.float())
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
            plain_args = (x.clone().requires_grad_(True), *before, *red, *after)
            torch.library.opcheck(op, plain_args, {"round_loss": True})
    # the public functions: their results are those ops', no cast after them
    for loss in (ops.cross_entropy(x.clone().requires_grad_(True), t),
                 ops.kd_loss(x.clone().requires_grad_(True), teacher, T=2.0),
                 ops.linear_cross_entropy(x.clone().requires_grad_(True), teacher[:29], t % 29),
                 ops.pld_loss(x.clone().requires_grad_(True), teacher, t)):
        assert loss.dtype == dtype and type(loss.grad_fn).__name__ != "ToCopyBackward0"
