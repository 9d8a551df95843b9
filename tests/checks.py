"""Shared assertions of the tests."""

import pytest


def expect_errors(cases, exceptions=(RuntimeError, ValueError, TypeError)):
    """Each `(call, message)`: calling raises one of `exceptions` whose text contains `message`."""
    for call, message in cases:
        with pytest.raises(exceptions) as info:
            call()
        assert message in str(info.value), (message, str(info.value))


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
