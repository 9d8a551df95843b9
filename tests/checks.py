"""Shared assertions of the tests."""

import pytest


def expect_errors(cases, exceptions=(RuntimeError, ValueError, TypeError)):
    """Each `(call, message)`: calling raises one of `exceptions` whose text contains `message`."""
    for call, message in cases:
        with pytest.raises(exceptions) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


def assert_matches_reference(fn, ref_fn, inputs, tol, what="", *, names=None, seed=4, floor=1e-2,
                             signed_upstream=False):
    """`fn(*inputs)` against `ref_fn` on float64 copies of the inputs: the same dtype (the
    first input's) and shape, then the output and each input's gradient for one random upstream
    gradient (uniform in [0.5, 1.5), or normal with `signed_upstream`, rounded to the dtype, on
    the output's device) within
    rtol=tol, atol=tol * max(|reference|, floor). The floor: a loss near 0 is often a difference
    of O(1) terms, rounded in float32 to ~1e-7 absolute. `names`: the gradients' labels."""
    import torch

    dtype = inputs[0].dtype
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    exp = ref_fn(*leaves64)
    assert out.dtype == dtype and out.shape == exp.shape, what
    gen = torch.Generator().manual_seed(seed)
    up = (torch.randn(out.shape, generator=gen, dtype=torch.float64) if signed_upstream
          else torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5)
    out.backward(up.to(dtype).to(out.device))
    exp.backward(up.to(dtype).double().to(exp.device))
    if names is None:
        names = ["grad"] if len(inputs) == 1 else [f"grad{i}" for i in range(len(inputs))]
    pairs = [("loss", out, exp)] + [(nm, a.grad, e.grad) for nm, a, e in zip(names, leaves, leaves64)]
    for name, a, e in pairs:
        mag = max(e.abs().max().item(), floor)
        torch.testing.assert_close(a.double(), e.detach().to(dtype).double(), rtol=tol, atol=tol * mag,
                                   msg=lambda m: f"{what} {name}: {m}")


def assert_compiled_matches(f, leaves, *others, fullgraph=True):
    """`torch.compile(f)` and `f` give the same output and the same gradients of `leaves` (fresh
    leaf copies for each), called as `f(*leaves, *others)`."""
    import torch

    results = []
    for fn in (torch.compile(f, fullgraph=fullgraph), f):
        xs = [t.detach().clone().requires_grad_(True) for t in leaves]
        out = fn(*xs, *others)
        out.backward()
        results.append((out, *[x.grad for x in xs]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
