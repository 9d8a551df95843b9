"""Backward formulas that cannot be differentiated again, made to say so.

fastloss's backward formulas are kernels (or ops below autograd): differentiating the gradient
they return a second time would see no dependence on the inputs, and a gradient penalty taken
with ``create_graph=True`` (``(g ** 2).sum()`` of ``g = grad(loss, x, create_graph=True)``) would
drop out of the loss without a word. ``once_differentiable`` wraps a backward so that, when it
runs with ``create_graph=True`` (grad mode on inside a backward), its gradients come back marked:
using them in a further backward raises an error naming the op. The C++ formulas do the same
(``once_differentiable`` in csrc/losses/losses_op.cpp).

torch's own ``torch.autograd.function.once_differentiable`` marks the gradients only when the
incoming gradient requires grad; for a scalar loss it does not, which is the silent case above.
"""
from __future__ import annotations

import functools

import torch


def once_differentiable(op: str):
    """Decorate a backward ``(ctx, *grads) -> grads`` (of an autograd.Function or of
    torch.library.register_autograd) so that its results refuse a second differentiation."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
                return backward(ctx, *grads)
            with torch.no_grad():
                out = backward(ctx, *grads)
            single = not isinstance(out, tuple)
            outs = list((out,) if single else out)
            where = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
            if not where:
                return out
            # the same tensors, whose grad_fn raises when reached; that node's next edges are
            # this backward node's (the op's inputs) and the incoming gradients', so it lies on
            # every path back to the inputs, also for torch.autograd.grad(..., inputs) and
            # backward(inputs=...), which run only the nodes on such paths (losses_op.cpp)
            incoming = [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
            marked = torch.ops.fastloss._refuse_second_order([outs[i] for i in where], incoming, op)
            for i, m in zip(where, marked):
                outs[i] = m
            return outs[0] if single else tuple(outs)
        return wrapper
    return decorate


def refuse_grad(fn: str, name: str, t, what: str) -> None:
    """Raise when ``t`` (an argument the op treats as a constant) requires grad while autograd
    records: the op would otherwise return no gradient for it without a word (torch's
    F.cross_entropy raises the same way for its class weights)."""
    if t is not None and isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{fn}: {name} requires grad, but {fn} gives no gradient for {what}; "
                           f"pass {name}.detach()")
