"""Differentiating a gradient again (a gradient penalty, a Hessian-vector product) through a
fastloss op must either be right (dequant_gemm, linear in x: checked against float64 autograd)
or raise an error naming the op, never drop the second-order term silently.

The other backward formulas are kernels or ops below autograd, so the gradient they return has
no graph back to the inputs. Before the check this file guards, taking
``g = grad(loss, x, create_graph=True)`` and then backpropagating ``loss + (g ** 2).sum()`` ran
without error: the penalty either did not require grad at all (and added nothing to x.grad) or
went through an op without an autograd kernel (a torch warning; the second-order terms right
only where that kernel happened to be made of differentiable ATen ops).
"""
import warnings

import pytest
import torch

import fastloss
from fastloss import ops

requires_cuda = pytest.mark.skipif(not fastloss.cuda_available(), reason="no CUDA device or CUDA build")
PLACES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

N, C, B, D = 7, 11, 13, 6  # awkward sizes


def _rows(dev):
    return torch.randint(0, C, (N,), device=dev)


def _quantized(dev):
    return ops.quantize_weight(torch.randn(9, 64, device=dev), bits=4, group_size=32, symmetric=False)


# name -> (shape of the input that requires grad, loss of that input on a device)
CASES = {
    "cross_entropy": ((N, C), lambda x: ops.cross_entropy(x, _rows(x.device), label_smoothing=0.1)),
    "cross_entropy_grad_in_forward": ((N, C), lambda x: ops.cross_entropy(x, _rows(x.device),
                                                                          grad_in_forward=True)),
    "comp_sum_loss": ((N, C), lambda x: ops.comp_sum_loss(x, _rows(x.device), tau=0.5)),
    "ldr_loss": ((N, C), lambda x: ops.ldr_loss(x, _rows(x.device), lam=1.0, margin=0.1)),
    "spherical_z_loss": ((N, C), lambda x: ops.spherical_z_loss(x, _rows(x.device), a=1.0, b=0.5)),
    "stablemax_cross_entropy": ((N, C), lambda x: ops.stablemax_cross_entropy(x, _rows(x.device))),
    "kd_loss": ((N, C), lambda x: ops.kd_loss(x, torch.randn_like(x), T=2.0, kind="jsd")),
    "topk_kl_loss": ((N, C), lambda x: ops.topk_kl_loss(x, torch.randn_like(x), k=3, T=2.0)),
    "pld_loss": ((N, C), lambda x: ops.pld_loss(x, torch.randn_like(x), _rows(x.device), T=2.0)),
    "dice_loss": ((N, C), lambda x: ops.dice_loss(x, _rows(x.device))),
    "anyloss": ((N,), lambda x: ops.anyloss(x, torch.randint(0, 2, (N,), device=x.device).float())),
    "linear_cross_entropy": ((N, D), lambda x: ops.linear_cross_entropy(
        x, torch.randn(C, D, device=x.device), _rows(x.device))),
    "linear_cross_entropy_none": ((N, D), lambda x: ops.linear_cross_entropy(
        x, torch.randn(C, D, device=x.device), _rows(x.device), reduction="none").sum()),
    "linear_cross_entropy_low_memory": ((N, D), lambda x: ops.linear_cross_entropy(
        x, torch.randn(C, D, device=x.device), _rows(x.device), low_memory=True)),
    "linear_comp_sum_loss": ((N, D), lambda x: ops.linear_comp_sum_loss(
        x, torch.randn(C, D, device=x.device), _rows(x.device), tau=0.5)),
    "multi_similarity_loss": ((B, D), lambda x: ops.multi_similarity_loss(
        x, torch.arange(B, device=x.device) % 3)),
    "tcm_loss": ((B, D), lambda x: ops.tcm_loss(x, torch.arange(B, device=x.device) % 3)),
    "contrastive_loss": ((B, D), lambda x: ops.contrastive_loss(x, torch.randn_like(x), T=0.5)),
    "proto_triplet_loss": ((B, D), lambda x: ops.proto_triplet_loss(x, torch.arange(B, device=x.device) % 3)),
    "icnn_loss": ((B, D), lambda x: ops.icnn_loss(x, torch.arange(B, device=x.device) % 3, k=2)),
    "mw_auc_loss": ((B,), lambda x: ops.mw_auc_loss(x[:5], x[5:])),
    "dilated_conv1d": ((2, 3, 17), lambda x: ops.dilated_conv1d(
        x, torch.randn(3, 3, device=x.device), dilation=2).pow(2).sum()),
    "tcn_level": ((2, 3, 17), lambda x: ops.tcn_level(
        x, torch.randn(3, 2, device=x.device), torch.randn(3, device=x.device), dilation=3).pow(2).sum()),
    "wasserstein": ((B, 3), lambda x: ops.wasserstein(x, torch.randn(9, 3, device=x.device), eps=0.5)),
    "sinkhorn": ((N, C), lambda x: ops.sinkhorn(x.abs(), eps=0.5).cost.sum()),
    "self_transport_cost": ((B, 3), lambda x: ops.self_transport_cost(x, eps=0.5)),
}


def _loss(name, dev, seed=0):
    shape, fn = CASES[name]
    torch.manual_seed(seed)
    x = torch.randn(shape, device=dev, requires_grad=True)
    torch.manual_seed(seed + 1)  # the op's other inputs: the same in every call
    return x, fn(x)


def _refusal(name):
    """The error a second differentiation through case `name` must raise: the op's own, or,
    for the transport costs (cost matrix by torch.cdist), torch < 2.14's refusal of cdist's
    second derivative, which the engine reaches first there (an error all the same)."""
    op = name.removesuffix("_none").removesuffix("_low_memory").removesuffix("_grad_in_forward")
    if name in ("wasserstein", "self_transport_cost") and _TORCH_MINOR < (2, 14):
        return rf"{op}.*double backward|derivative for '_cdist_backward' is not implemented"
    return rf"{op}.*double backward"


_TORCH_MINOR = tuple(int(v) for v in torch.__version__.split(".")[:2])


@pytest.mark.parametrize("dev", PLACES)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("upstream", ["plain", "requires_grad"])
def test_gradient_penalty_raises_naming_the_op(name, dev, upstream):
    x, loss = _loss(name, dev)
    if upstream == "requires_grad":  # an incoming gradient that itself requires grad
        loss = loss * torch.tensor(2.0, device=dev, requires_grad=True)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad  # else a penalty built from it would add nothing, silently
    penalty = g.pow(2).sum()
    with pytest.raises(RuntimeError, match=_refusal(name)):
        (loss + penalty).backward()


@pytest.mark.parametrize("dev", PLACES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_create_graph_keeps_the_first_order_gradient(name, dev):
    x, loss = _loss(name, dev)
    (plain,) = torch.autograd.grad(loss, x)
    assert not plain.requires_grad
    x2, loss2 = _loss(name, dev)
    (marked,) = torch.autograd.grad(loss2, x2, create_graph=True)
    torch.testing.assert_close(loss2.detach(), loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(marked.detach(), plain, rtol=1e-6, atol=1e-7)
    assert plain.abs().sum() > 0  # a gradient that is all zeros would prove nothing here


@pytest.mark.parametrize("dev", PLACES)
@pytest.mark.parametrize("bits, group_size, symmetric, codebook", [
    (4, 32, False, None), (3, 64, True, None), (2, -1, False, None), (8, 32, True, None),
    (4, 32, True, "nf4")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dequant_gemm_is_twice_differentiable(dev, bits, group_size, symmetric, codebook, with_bias):
    """y = x W^T + b is linear in x, and its backward is a GEMM too (dequant_gemm_grad_input,
    whose own backward is dequant_gemm): a gradient penalty through it must equal float64
    autograd through x @ dequantize_weight(q)^T."""
    torch.manual_seed(3)
    cb = ops.nf_codebook(4) if codebook == "nf4" else None
    q = ops.quantize_weight(torch.randn(9, 64, device=dev), bits=bits, group_size=group_size,
                            symmetric=symmetric, codebook=cb)
    w = ops.dequantize_weight(q).double()
    x = torch.randn(5, 64, device=dev, requires_grad=True)
    b = torch.randn(9, device=dev, requires_grad=True) if with_bias else None
    leaves = [x] + ([b] if with_bias else [])

    def total(y, inputs):
        loss = (y ** 3).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return loss + sum(g.pow(2).sum() for g in grads)

    with warnings.catch_warnings():
        # torch warns when a backward goes through an op without an autograd kernel (whose
        # result may then be wrong, or right by accident where the kernel is ATen ops)
        warnings.simplefilter("error")
        got = torch.autograd.grad(total(ops.dequant_gemm(x, q, b), leaves), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = ref_leaves[0] @ w.t() + (ref_leaves[1] if with_bias else 0)
    want = torch.autograd.grad(total(y_ref, ref_leaves), ref_leaves)
    for g, r in zip(got, want):
        assert r.abs().max() > 0
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


@pytest.mark.parametrize("dev", PLACES)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("form", ["grad_inputs", "backward_inputs", "through_a_layer", "bfloat16",
                                  "non_contiguous"])
def test_second_differentiation_towards_chosen_inputs_raises(name, dev, form):
    """torch.autograd.grad(..., inputs) and backward(inputs=...) run only the graph between the
    output and the inputs asked for (a Hessian-vector product, MAML's meta-gradient): the
    refusal must lie on those paths, also when the op's input comes out of a layer."""
    shape, fn = CASES[name]
    torch.manual_seed(0)
    if form == "through_a_layer":
        w = torch.eye(shape[-1], device=dev).add_(torch.randn(shape[-1], shape[-1], device=dev), alpha=0.1)
        w.requires_grad_()
        x0 = torch.randn(shape, device=dev)
        torch.manual_seed(1)
        x = x0 @ w
        leaf = w
    elif form == "non_contiguous":  # the op copies its input to a contiguous one inside
        if len(shape) != 2:
            pytest.skip("a transposed input needs a 2-D shape")
        leaf = torch.randn(shape[::-1], device=dev, requires_grad=True)
        torch.manual_seed(1)
        x = leaf.t()
    else:  # bfloat16: formulas that keep float32 copies of their inputs, not the inputs
        dtype = torch.bfloat16 if form == "bfloat16" else torch.float32
        x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
        torch.manual_seed(1)
        leaf = x
    try:
        loss = fn(x)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        if form == "bfloat16":  # (the case's other inputs are float32: covered by the other forms)
            pytest.skip(f"{name} takes no bfloat16 input beside its float32 ones: {e}")
        raise
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    total = loss + g.pow(2).sum()
    with pytest.raises(RuntimeError, match=_refusal(name)):
        if form == "backward_inputs":
            total.backward(inputs=[leaf])
        else:
            torch.autograd.grad(total, leaf)


@pytest.mark.parametrize("dev", PLACES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_edited_in_place_still_backpropagates(name, dev):
    """The refusal saves nothing: a loss scaled in place (gradient accumulation) still has its
    ordinary backward (a saved output would fail torch's in-place version check)."""
    x, loss = _loss(name, dev)
    (plain,) = torch.autograd.grad(loss, x)
    x2, loss2 = _loss(name, dev)
    loss2.mul_(0.25)
    loss2.backward()
    torch.testing.assert_close(x2.grad, plain * 0.25, rtol=1e-5, atol=1e-7)


def test_inplace_backward_with_create_graph():
    """inplace_backward=True writes the gradient into the logits; with create_graph=True the
    first-order gradient must still come out, and differentiating it again raise."""
    torch.manual_seed(0)
    x = torch.randn(N, C, requires_grad=True)
    y = torch.randint(0, C, (N,))
    (want,) = torch.autograd.grad(ops.cross_entropy(x * 1.0, y), x)
    loss = ops.cross_entropy(x * 1.0, y, inplace_backward=True)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    torch.testing.assert_close(g.detach(), want)
    with pytest.raises(RuntimeError, match="cross_entropy.*double backward"):
        torch.autograd.grad(g.pow(2).sum(), x)


@pytest.mark.parametrize("name", ["cross_entropy", "multi_similarity_loss"])
def test_create_graph_under_compiled_autograd_raises(name):
    """Compiled autograd runs the backward formulas outside the eager engine's node loop, where
    the op's input edges are unknown: create_graph=True must raise there, not return gradients
    whose second differentiation could come out partial without a word (C++ and Python
    formulas)."""
    ca = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(ca, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    shape, fn = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    torch._dynamo.reset()
    with ca._enable(lambda gm: gm):
        with pytest.raises(RuntimeError, match=rf"{name}: create_graph=True is supported only"):
            torch.autograd.grad(fn(x), x, create_graph=True)
        (g,) = torch.autograd.grad(fn(x), x)  # first order: unaffected
    torch._dynamo.reset()
    assert g.abs().sum() > 0


@pytest.mark.parametrize("name", ["kd_loss", "topk_kl_loss", "pld_loss", "linear_cross_entropy",
                                  "cross_entropy_grad_in_forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_handed_over_gradients_under_compiled_autograd(name, dtype):
    """These losses make their gradient in the forward and hand it over in the backward,
    scaled in place when the backward holds the only reference. Compiled autograd runs a
    backward on a copy of saved_data whose original keeps the buffer: with a retained graph
    the first gradient must stay as returned and the second equal it and the eager one."""
    ca = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(ca, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    torch.manual_seed(0)
    s, t = torch.randn(N, 50).to(dtype), torch.randn(N, 50).to(dtype)
    w, y = torch.randn(30, 50).to(dtype), torch.randint(0, 30, (N,))
    fn = {"kd_loss": lambda x: ops.kd_loss(x, t, 2.0),
          "topk_kl_loss": lambda x: ops.topk_kl_loss(x, t, 5),
          "pld_loss": lambda x: ops.pld_loss(x, t, y),
          "linear_cross_entropy": lambda x: ops.linear_cross_entropy(x, w, y),
          "cross_entropy_grad_in_forward": lambda x: ops.cross_entropy(x, y, grad_in_forward=True)}[name]
    x = s.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(fn(x) * 3.0, x)
    loss = fn(x) * 3.0
    torch._dynamo.reset()
    with ca._enable(lambda gm: gm):
        (first,) = torch.autograd.grad(loss, x, retain_graph=True)
        kept = first.clone()
        (second,) = torch.autograd.grad(loss, x)
    torch._dynamo.reset()
    assert torch.equal(first, kept)
    torch.testing.assert_close(second, kept)
    torch.testing.assert_close(kept, eager)
