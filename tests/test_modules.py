"""The module forms of the distillation, pair-based, metric-learning and metric-driven losses
(fastloss.nn) against their functions (fastloss.ops, which the other test files check against
float64 references): the same values and gradients with every hyper-parameter away from its
default (so that one passed to the wrong argument shows), the same defaults as the function,
bad hyper-parameters reported by the function with the argument's name, no state."""

import inspect
import math

import pytest
import torch

import fastloss
from fastloss import ops


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _target_with_ignored(n, classes, seed):
    t = _labels(n, classes, seed)
    t[3] = -7
    return t


# name -> (module class, function, hyper-parameters (none at its default), inputs:
#          (differentiable tensors, other arguments after them))
CASES = {
    "kd": (fastloss.nn.KDLoss, ops.kd_loss, dict(T=2.5, kind="jsd", beta=0.3, reduction="sum"),
           lambda: ([_randn(13, 37, seed=1)], [_randn(13, 37, seed=2)])),
    "topk_kl": (fastloss.nn.TopKKLLoss, ops.topk_kl_loss,
                dict(k=5, T=1.7, renormalize=True, reduction="none"),
                lambda: ([_randn(11, 29, seed=3)], [_randn(11, 29, seed=4)])),
    "pld": (fastloss.nn.PLDLoss, ops.pld_loss, dict(T=1.3, ignore_index=-7, reduction="sum"),
            lambda: ([_randn(10, 23, seed=5)], [_randn(10, 23, seed=6), _target_with_ignored(10, 23, 7)])),
    "multi_similarity": (fastloss.nn.MultiSimilarityLoss, ops.multi_similarity_loss,
                         dict(alpha=1.5, beta=20.0, base=0.4, epsilon=0.2, reduction="sum", block_rows=7),
                         lambda: ([_randn(40, 16, seed=8)], [_labels(40, 5, 9)])),
    "tcm": (fastloss.nn.TCMLoss, ops.tcm_loss,
            dict(pos_margin=0.6, neg_margin=0.1, pos_weight=0.7, neg_weight=1.3, block_rows=9),
            lambda: ([_randn(37, 6, seed=10)], [_labels(37, 4, 11)])),
    "contrastive": (fastloss.nn.ContrastiveLoss, ops.contrastive_loss,
                    dict(T=0.2, symmetric=False, reduction="none", block_rows=5),
                    lambda: ([_randn(24, 16, seed=12), _randn(24, 16, seed=13)], [])),
    "contrastive_weights": (fastloss.nn.ContrastiveLoss, ops.contrastive_loss,
                            dict(T=0.3, reduction="sum"),
                            lambda: ([_randn(9, 5, seed=14), _randn(9, 5, seed=15)],
                                     [_randn(9, 9, seed=16).abs()]),
                            lambda a, b, w: ((a, b), {"weights": w})),
    "mw_auc": (fastloss.nn.MWAUCLoss, ops.mw_auc_loss, dict(reduction="none"),
               lambda: ([_randn(3, 17, seed=17), _randn(3, 29, seed=18)], [])),
    "proto_triplet": (fastloss.nn.ProtoTripletLoss, ops.proto_triplet_loss, dict(margin=1.5),
                      lambda: ([_randn(20, 8, seed=19), _randn(12, 8, seed=21)],
                               [_labels(20, 4, 20), torch.arange(12) % 4]),
                      lambda q, s, ql, sl: ((q, ql, s, sl), {})),
    "icnn": (fastloss.nn.ICNNLoss, ops.icnn_loss, dict(k=3, num_neighbors=5),
             lambda: ([_randn(30, 8, seed=27)], [_labels(30, 3, 28)])),  # (num_neighbors matters)
    "dice": (fastloss.nn.DiceLoss, ops.dice_loss,
             dict(alpha=0.5, gamma=0.8, smooth=0.1, ignore_index=-7, reduction="sum"),
             lambda: ([_randn(20, 6, seed=24)], [_target_with_ignored(20, 6, 25)])),
    "anyloss": (fastloss.nn.AnyLoss, ops.anyloss, dict(metric="fbeta", L=50.0, beta=2.0, from_logits=False),
                lambda: ([torch.rand(40, 3, generator=torch.Generator().manual_seed(26))],
                         [(_randn(40, 3, seed=27) > 0).float()])),
}


def _call_args(case, tensors, others):
    """Positional arguments of the module (and of the function before its hyper-parameters)."""
    arrange = case[4] if len(case) > 4 else (lambda *xs: (xs, {}))
    return arrange(*tensors, *others)


def _loss_and_grads(loss_fn, case, tensors, others):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    args, kwargs = _call_args(case, leaves, others)
    out = loss_fn(*args, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    return out, torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("name", list(CASES))
def test_module_matches_function(name):
    module_cls, fn, hyper, make = CASES[name][:4]
    tensors, others = make()
    module = module_cls(**hyper)
    got, got_grads = _loss_and_grads(module, CASES[name], tensors, others)
    want, want_grads = _loss_and_grads(lambda *a, **k: fn(*a, **k, **hyper), CASES[name], tensors, others)
    assert got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # each hyper-parameter matters on these inputs (it is off its default, and the default
    # changes the loss or its gradients), so one the module passed to the wrong argument shows
    defaults = inspect.signature(fn).parameters
    for key in hyper:
        if defaults[key].default is inspect.Parameter.empty:
            continue  # (topk's k: no default)
        other = {k: v for k, v in hyper.items() if k != key}
        try:
            out, grads = _loss_and_grads(lambda *a, **k: fn(*a, **k, **other), CASES[name], tensors, others)
        except (RuntimeError, ValueError):  # (ignore_index at its default: -7 is no class)
            continue
        same = out.shape == want.shape and torch.equal(out, want) and all(
            torch.equal(g, w) for g, w in zip(grads, want_grads))
        assert not same, f"{name}: {key} at its default gives the same loss and gradients"
    assert dict(module.state_dict()) == {} and list(module.parameters()) == []
    for key, value in hyper.items():
        if key != "block_rows":
            assert f"{key}={value!r}" in repr(module) or f"{key}={value}" in repr(module)


@pytest.mark.parametrize("name", list(CASES))
def test_module_defaults_are_the_function_defaults(name):
    module_cls, fn = CASES[name][:2]
    fn_params = inspect.signature(fn).parameters
    module_params = inspect.signature(module_cls.__init__).parameters
    shared = [p for p in module_params if p in fn_params]
    module_only = {"learnable"} if module_cls is fastloss.nn.ContrastiveLoss else set()
    assert shared == [p for p in module_params if p != "self" and p not in module_only]
    for p in shared:
        assert module_params[p].default == fn_params[p].default, p


def test_bad_hyper_parameters_are_named_by_the_function():
    s, t = _randn(4, 5, seed=1), _randn(4, 5, seed=2)
    e, lab = _randn(12, 4, seed=3), _labels(12, 3, 4)
    for call, message in [
        (lambda: fastloss.nn.KDLoss(T=-1.0)(s, t), "kd_loss: T must be > 0"),
        (lambda: fastloss.nn.KDLoss(kind="kl")(s, t), "kd_loss: kind must be one of"),
        (lambda: fastloss.nn.TopKKLLoss(k=0)(s, t), "topk_kl_loss: k"),
        (lambda: fastloss.nn.MultiSimilarityLoss(reduction="avg")(e, lab), "multi_similarity_loss: reduction"),
        (lambda: fastloss.nn.ContrastiveLoss(T=0.0)(e, e), "contrastive_loss: T must be > 0"),
        (lambda: fastloss.nn.ICNNLoss(k=0)(e, lab), "icnn_loss: k must be a positive int"),
        (lambda: fastloss.nn.AnyLoss(metric="auc")(s.sigmoid(), (t > 0).float()), "anyloss: metric must be one of"),
        (lambda: fastloss.nn.DiceLoss(reduction="avg")(s, lab[:4]), "dice_loss: reduction"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def test_contrastive_loss_with_a_learnable_temperature():
    """CLIP's parametrisation: logit_scale = log(1 / T), a parameter; its gradient against the
    float64 reference differentiated through T = exp(-logit_scale)."""
    from fastloss.reference import contrastive as ref

    a, b = _randn(21, 9, seed=30), _randn(21, 9, seed=31)
    module = fastloss.nn.ContrastiveLoss(T=0.2, learnable=True)
    assert [name for name, _ in module.named_parameters()] == ["logit_scale"]
    torch.testing.assert_close(module.logit_scale.detach(), torch.tensor(math.log(5.0)))
    x = a.clone().requires_grad_(True)
    loss = module(x, b)
    loss.backward()
    scale64 = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    x64 = a.double().requires_grad_(True)
    want = ref.contrastive_loss(x64, b.double(), torch.exp(-scale64))
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(module.logit_scale.grad.double(), scale64.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-5, atol=2e-6)
    assert "learnable" in repr(module) and set(module.state_dict()) == {"logit_scale"}
    with pytest.raises(ValueError, match="ContrastiveLoss: T must be > 0"):
        fastloss.nn.ContrastiveLoss(T=0.0, learnable=True)
    with pytest.raises(ValueError, match="ContrastiveLoss: T must be a finite number"):
        fastloss.nn.ContrastiveLoss(T=float("inf"), learnable=True)
    assert math.isfinite(float(fastloss.nn.ContrastiveLoss(T=1e-320, learnable=True).logit_scale.detach()))


def test_row_loss_modules_show_their_hyper_parameters():
    assert repr(fastloss.nn.CompSumLoss(1.5)) == "CompSumLoss(tau=1.5)"
    assert repr(fastloss.nn.LDRLoss(0.5, adaptive=True)) == "LDRLoss(lam=0.5, margin=1.0, adaptive=True, alpha=2.0)"
    assert repr(fastloss.nn.SphericalZLoss(1.0, 2.0, reduction="sum")) == \
        "SphericalZLoss(a=1.0, b=2.0, eps=1e-06, reduction='sum')"
    assert "label_smoothing=0.1" in repr(fastloss.nn.CrossEntropyLoss(torch.ones(3), label_smoothing=0.1))
    assert "weight=[3]" in repr(fastloss.nn.CrossEntropyLoss(torch.ones(3)))
    assert "T=2.0, aux_weight=0.5, prob_weight=0.0, aux_loss='forward_kl'" in \
        repr(fastloss.nn.DualHeadKD(8, 5, T=2.0, aux_weight=0.5, aux_loss="forward_kl"))


def test_meta_device_modules_initialise_with_reset_parameters():
    """A model built on the meta device and moved with to_empty is initialised by calling each
    module's reset_parameters (as FSDP's deferred initialisation does): the same parameters as
    building it on the CPU with the same seed. DilatedConv1d (so TCN) and a learnable
    ContrastiveLoss had no reset_parameters: their parameters stayed uninitialised memory."""
    makers = [lambda: fastloss.nn.DilatedConv1d(6, 3, dilation=2),
              lambda: fastloss.nn.TCN(5, depth=3, kernel_size=3),
              lambda: fastloss.nn.ContrastiveLoss(T=0.05, learnable=True)]
    for make in makers:
        torch.manual_seed(0)
        want = make()
        with torch.device("meta"):
            got = make()
        got.to_empty(device="cpu")
        torch.manual_seed(0)
        for m in got.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda msg: f"{type(got).__name__}.{name}: {msg}")
    assert float(got.logit_scale.detach()) == pytest.approx(math.log(1 / 0.05))
