"""Every floating-point input that requires grad either gets its gradient or makes the op raise,
never a silent ``None``.

* The distillation losses' teacher: gradients as ``F.kl_div`` gives them (through the
  torch-operation formulas; the fused kernels give only the student's), checked against
  float64 formulas written here.
* Arguments the ops treat as constants (class weights, CWCL weights, AnyLoss targets): a clear
  error naming the argument, as ``F.cross_entropy`` raises for its class weights; detached, or
  under ``torch.no_grad()``, they work.
"""
import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import ops

requires_cuda = pytest.mark.skipif(not fastloss.cuda_available(), reason="no CUDA device or CUDA build")
PLACES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
N, C, T = 5, 9, 1.7


def _kl(log_p, log_q):  # KL(p || q) per row, from log-probabilities
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _kd_reference(s, t, kind, beta=0.4):
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if kind == "forward_kl":
        rows = _kl(lt, ls)
    elif kind == "reverse_kl":
        rows = _kl(ls, lt)
    else:  # jsd: the teacher's weight beta in the mixture m
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        rows = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    return rows.mean() * T * T


def _topk_reference(s, t, k, renormalize):
    rows = []
    for i in range(s.shape[0]):
        keep = sorted(range(C), key=lambda j: (-t[i, j].item(), j))[:k]
        si, ti = s[i] / T, t[i] / T
        if renormalize:
            lp, lq = F.log_softmax(si[keep], -1), F.log_softmax(ti[keep], -1)
        else:
            lp, lq = F.log_softmax(si, -1)[keep], F.log_softmax(ti, -1)[keep]
        rows.append((lq.exp() * (lq - lp)).sum())
    return torch.stack(rows).mean() * T * T


def _pld_reference(s, t, y):
    rows = []
    for i in range(s.shape[0]):
        rest = sorted((j for j in range(C) if j != y[i]), key=lambda j: (-t[i, j].item(), j))
        order = [int(y[i])] + rest
        w = torch.softmax(t[i] / T, -1)
        rows.append(sum(w[order[k]] * (torch.logsumexp(s[i, order[k:]], 0) - s[i, order[k]])
                        for k in range(C)))
    return torch.stack(rows).mean()


CASES = {
    "kd_forward_kl": (lambda s, t, y: ops.kd_loss(s, t, T=T), lambda s, t, y: _kd_reference(s, t, "forward_kl")),
    "kd_reverse_kl": (lambda s, t, y: ops.kd_loss(s, t, T=T, kind="reverse_kl"),
                      lambda s, t, y: _kd_reference(s, t, "reverse_kl")),
    "kd_jsd": (lambda s, t, y: ops.kd_loss(s, t, T=T, kind="jsd", beta=0.4),
               lambda s, t, y: _kd_reference(s, t, "jsd", 0.4)),
    "topk_kl": (lambda s, t, y: ops.topk_kl_loss(s, t, k=4, T=T), lambda s, t, y: _topk_reference(s, t, 4, False)),
    "topk_kl_renormalized": (lambda s, t, y: ops.topk_kl_loss(s, t, k=4, T=T, renormalize=True),
                             lambda s, t, y: _topk_reference(s, t, 4, True)),
    "pld": (lambda s, t, y: ops.pld_loss(s, t, y, T=T), lambda s, t, y: _pld_reference(s, t, y)),
}


@pytest.mark.parametrize("dev", PLACES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_teacher_that_requires_grad_gets_its_gradient(name, dev):
    op, reference = CASES[name]
    g = torch.Generator().manual_seed(7)
    s = torch.randn(N, C, generator=g).to(dev).requires_grad_()
    t = (2 * torch.randn(N, C, generator=g)).to(dev).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g).to(dev)
    got = torch.autograd.grad(op(s, t, y), (s, t))
    s64, t64 = (v.detach().double().requires_grad_() for v in (s, t))
    want = torch.autograd.grad(reference(s64, t64, y), (s64, t64))
    for a, b in zip(got, want):
        assert b.abs().max() > 1e-3  # both gradients are there to compare
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    # a detached teacher takes the kernels: the same student gradient
    (plain,) = torch.autograd.grad(op(s, t.detach(), y), (s,))
    torch.testing.assert_close(plain, got[0], rtol=1e-4, atol=1e-6)


def _constant_argument_cases(dev):
    x = torch.randn(N, C, device=dev, requires_grad=True)
    y = torch.randint(0, C, (N,), device=dev)
    cw = torch.rand(C, device=dev) + 0.5
    h, w = torch.randn(N, 6, device=dev, requires_grad=True), torch.randn(C, 6, device=dev)
    e = torch.randn(8, 4, device=dev, requires_grad=True)
    ww = torch.rand(8, 8, device=dev) + 0.1
    binary = torch.randint(0, 2, (N,), device=dev).float()
    return [
        ("cross_entropy", "weight", cw, lambda v: ops.cross_entropy(x, y, weight=v)),
        ("comp_sum_loss", "weight", cw, lambda v: ops.comp_sum_loss(x, y, tau=0.5, weight=v)),
        ("stablemax_cross_entropy", "weight", cw, lambda v: ops.stablemax_cross_entropy(x, y, weight=v)),
        ("linear_cross_entropy", "class_weight", cw,
         lambda v: ops.linear_cross_entropy(h, w, y, class_weight=v)),
        ("linear_cross_entropy", "class_weight", cw,
         lambda v: ops.linear_cross_entropy(h, w, y, class_weight=v, low_memory=True)),
        ("contrastive_loss", "weights", ww, lambda v: ops.contrastive_loss(e, e.detach() + 1, T=0.5, weights=v)),
        ("anyloss", "target", binary, lambda v: ops.anyloss(x[:, 0], v)),
        ("dice_loss", "target", binary, lambda v: ops.dice_loss(x[:, 0], v)),
        ("dice_loss", "target", binary[:, None].expand(N, C).contiguous(), lambda v: ops.dice_loss(x, v)),
        ("dequant_gemm", "qw.scales", None, None),  # (below: a QuantizedWeight's own tensors)
    ]


@pytest.mark.parametrize("dev", PLACES)
def test_constant_arguments_that_require_grad_raise(dev):
    for op, arg, value, call in _constant_argument_cases(dev):
        if value is None:
            continue
        with pytest.raises(RuntimeError, match=rf"{op}: {arg} requires grad.*{arg}\.detach\(\)"):
            call(value.clone().requires_grad_())
        expected = call(value)
        torch.testing.assert_close(call(value.clone().requires_grad_().detach()), expected)
        with torch.no_grad():  # nothing records: no gradient is missing
            torch.testing.assert_close(call(value.clone().requires_grad_()), expected.detach())


@pytest.mark.parametrize("dev", PLACES)
def test_quantized_weight_tensors_that_require_grad_raise(dev):
    """dequant_gemm differentiates x and bias, not the packed weight's scales / zeros /
    codebook (a learned-scale setup must say so rather than get None)."""
    w = torch.randn(6, 64, device=dev)
    x = torch.randn(3, 64, device=dev, requires_grad=True)
    asymmetric = ops.quantize_weight(w, bits=4, group_size=32, symmetric=False)
    nf4 = ops.quantize_weight(w, bits=4, group_size=32, symmetric=True, codebook=ops.nf_codebook(4).to(dev))
    for qw, name in ((asymmetric, "scales"), (asymmetric, "zeros"), (nf4, "codebook")):
        expected = ops.dequant_gemm(x, qw)
        original = getattr(qw, name)
        setattr(qw, name, original.clone().requires_grad_())
        with pytest.raises(RuntimeError, match=rf"dequant_gemm: qw\.{name} requires grad"):
            ops.dequant_gemm(x, qw)
        with torch.no_grad():
            torch.testing.assert_close(ops.dequant_gemm(x, qw), expected.detach())
        setattr(qw, name, original)


def test_vocab_parallel_class_weight_that_requires_grad_raises():
    """Checked before the process group is consulted (no group is needed to see the refusal)."""
    h, w = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6)
    with pytest.raises(RuntimeError, match=r"class_weight requires grad.*class_weight\.detach\(\)"):
        ops.vocab_parallel_linear_cross_entropy(h, w, torch.randint(0, 5, (4,)), group=None,
                                                class_weight=torch.rand(5, requires_grad=True))


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("name", ["kd_jsd", "topk_kl", "pld"])
def test_teacher_gradient_other_reductions_and_compile(name, reduction):
    """The torch-operation path with a teacher that requires grad: reductions none / sum (PLD
    with an ignored row), and torch.compile(fullgraph=True) of the same call."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(N, C, generator=g).requires_grad_()
    t = (2 * torch.randn(N, C, generator=g)).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    call = {"kd_jsd": lambda a, b: ops.kd_loss(a, b, T=T, kind="jsd", beta=0.4, reduction=reduction),
            "topk_kl": lambda a, b: ops.topk_kl_loss(a, b, k=4, T=T, reduction=reduction),
            "pld": lambda a, b: ops.pld_loss(a, b, y, T=T, reduction=reduction)}[name]
    ref_rows = {"kd_jsd": lambda a, b: torch.stack([_kd_reference(a[i:i + 1], b[i:i + 1], "jsd", 0.4)
                                                    for i in range(N)]),
                "topk_kl": lambda a, b: torch.stack([_topk_reference(a[i:i + 1], b[i:i + 1], 4, False)
                                                     for i in range(N)]),
                "pld": lambda a, b: torch.stack([_pld_reference(a[i:i + 1], b[i:i + 1], y[i:i + 1])
                                                 if y[i] != -100 else a.sum() * 0 for i in range(N)])}[name]
    weights = torch.rand(N, generator=g)  # an upstream that differs per row
    out = call(s, t)
    got = torch.autograd.grad((out * weights).sum() if reduction == "none" else out, (s, t))
    s64, t64 = (v.detach().double().requires_grad_() for v in (s, t))
    rows = ref_rows(s64, t64)
    want = torch.autograd.grad((rows * weights.double()).sum() if reduction == "none" else rows.sum(), (s64, t64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    compiled = torch.compile(call, fullgraph=True)
    torch.testing.assert_close(compiled(s, t), out)
