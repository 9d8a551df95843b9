"""Log-domain Sinkhorn against the float64 reference (plain Sinkhorn scaling, unrolled for its
gradients): plan, cost, marginals, gradients w.r.t. cost and marginals; small eps without
overflow; batched equals one by one; point clouds; non-convergence reported; bad input."""

import functools
import importlib
import warnings

import pytest
import torch

import fastloss
from fastloss import ops
from fastloss.reference import sinkhorn as ref
from fastloss.ops.sinkhorn import _symmetric_potential
from checks import assert_compiled_matches, expect_errors


def problem(n, m, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed * 31 + n * 7 + m)
    c = torch.rand(n, m, generator=g, dtype=torch.float64) * scale
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.2
    return c.to(dtype), (a / a.sum()).to(dtype), (b / b.sum()).to(dtype)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (6, 1), (7, 9), (40, 23)], ids=str)
@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_matches_reference_plan_cost_and_gradients(shape, eps):
    c, a, b = problem(*shape)
    cc, aa, bb = (t.clone().requires_grad_(True) for t in (c, a, b))
    res = ops.sinkhorn(cc, aa, bb, eps=eps, tol=1e-11, max_iter=20000, return_plan=True)
    assert bool(res.converged)
    plan = ref.sinkhorn_plan(c, a, b, eps)
    torch.testing.assert_close(res.plan, plan, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(res.plan.sum(1), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.plan.sum(0), b, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.transport_cost, (plan * c).sum(), rtol=1e-7, atol=1e-12)
    c2, a2, b2 = (t.clone().requires_grad_(True) for t in (c, a, b))
    expected = ref.ot_eps(c2, a2, b2, eps)
    torch.testing.assert_close(res.cost, expected.detach(), rtol=1e-7, atol=1e-12)
    res.cost.backward()
    expected.backward()
    torch.testing.assert_close(cc.grad, c2.grad, rtol=1e-6, atol=1e-10)
    for got, exp in ((aa.grad, a2.grad), (bb.grad, b2.grad)):   # defined up to a constant
        torch.testing.assert_close(got - got.mean(), exp - exp.mean(), rtol=1e-6, atol=1e-9)


def test_small_eps_does_not_overflow_and_float32():
    c, a, b = problem(30, 30, seed=1, scale=10.0)
    res = ops.sinkhorn(c, a, b, eps=1e-3, tol=1e-6, max_iter=50000)   # 1e-4 x the cost scale
    assert bool(res.converged) and torch.isfinite(res.cost) and torch.isfinite(res.f).all()
    r32 = ops.sinkhorn(c.float(), a.float(), b.float(), eps=0.5, tol=1e-5)
    r64 = ops.sinkhorn(c, a, b, eps=0.5, tol=1e-10)
    torch.testing.assert_close(r32.cost.double(), r64.cost, rtol=1e-5, atol=1e-5)


def test_batched_equals_one_by_one_and_uniform_marginals():
    cs = torch.stack([problem(8, 6, seed=s)[0] for s in range(3)])
    res = ops.sinkhorn(cs, eps=0.1, tol=1e-10, max_iter=10000)
    for i in range(3):
        one = ops.sinkhorn(cs[i], torch.full((8,), 1 / 8, dtype=torch.float64),
                           torch.full((6,), 1 / 6, dtype=torch.float64), eps=0.1, tol=1e-10, max_iter=10000)
        torch.testing.assert_close(res.cost[i], one.cost)


def test_wasserstein_point_clouds_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 12, 3, generator=g, dtype=torch.float64) + 1.0
    cost = ops.wasserstein(x, y, eps=0.5, tol=1e-10, max_iter=5000)
    cost.sum().backward()
    # the gradient of OT_eps w.r.t. x_i is sum_j P_ij d|x_i - y_j|^2 / dx_i = 2 (a_i x_i - (P y)_i)
    c = torch.cdist(x.detach(), y) ** 2
    plan = ops.sinkhorn(c, eps=0.5, tol=1e-10, max_iter=5000, return_plan=True).plan
    expected = 2 * (plan.sum(2, keepdim=True) * x.detach() - plan @ y)
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_negative_costs(method):
    """Costs with negative entries (POT accepts them): plan, value, <P, C>, potentials and
    gradients of the float64 reference on the same (unshifted) cost, for an all-negative and a
    mixed-sign problem batched with a non-negative one."""
    c0, a, b = problem(9, 13, seed=6)
    cs = torch.stack([c0 - 2.5, c0 - 0.5, c0])
    cc = cs.clone().requires_grad_(True)
    aa = a.expand(3, 9).clone().requires_grad_(True)
    res = ops.sinkhorn(cc, aa, b.expand(3, 13), eps=0.1, method=method, tol=1e-11, max_iter=20000,
                       return_plan=True)
    assert bool(res.converged.all())
    res.cost.sum().backward()
    for k in range(3):
        c2 = cs[k].clone().requires_grad_(True)
        a2 = a.clone().requires_grad_(True)
        plan = ref.sinkhorn_plan(cs[k], a, b, 0.1)
        torch.testing.assert_close(res.plan[k], plan, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(res.transport_cost[k], (plan * cs[k]).sum(), rtol=1e-7, atol=1e-12)
        # the potentials of the cost as given: P = a b^T exp((f + g - C) / eps)
        log_p = (res.f[k][:, None] + res.g[k][None, :] - cs[k]) / 0.1 + (a[:, None] * b[None, :]).log()
        torch.testing.assert_close(log_p.exp(), plan, rtol=1e-7, atol=1e-12)
        expected = ref.ot_eps(c2, a2, b, 0.1)
        torch.testing.assert_close(res.cost[k], expected.detach(), rtol=1e-7, atol=1e-12)
        expected.backward()
        torch.testing.assert_close(cc.grad[k], c2.grad, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(aa.grad[k], a2.grad - a2.grad.mean(), rtol=1e-6, atol=1e-9)
    # masses equal within the accepted 1e-5 only: <P, C> still that of the returned plan
    ca, aa2, bb2 = problem(6, 8, seed=8)
    r = ops.sinkhorn(ca - 300, aa2 * (1 + 9e-6), bb2, eps=0.1, method=method, tol=1e-4, return_plan=True)
    torch.testing.assert_close(r.transport_cost, (r.plan * (ca - 300)).sum(), rtol=0, atol=1e-9)
    # float32: an offset costs no accuracy (the solver sees the shifted cost), so the step
    # counts and the value's error stay those of the non-negative cost
    c32, a32, b32 = (t.float() for t in problem(30, 41, seed=7))
    base = ops.sinkhorn(c32, a32, b32, eps=0.05, method=method)
    for offset in (-3.0, -300.0):
        r = ops.sinkhorn(c32 + offset, a32, b32, eps=0.05, method=method)
        assert bool(r.converged) and abs(int(r.n_iter) - int(base.n_iter)) <= 3, (offset, r.n_iter, base.n_iter)
        torch.testing.assert_close(r.cost - offset, base.cost, rtol=0, atol=5e-6 * (1 - offset))


def test_wasserstein_under_autocast_takes_16_bit_clouds():
    """torch.cdist runs in float32 under autocast: 16-bit (or mixed) clouds give the float32
    cost of their float32 copies, with gradients in their own dtype."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 3, generator=g).bfloat16().requires_grad_(True)
    y = torch.randn(9, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.wasserstein(x, y, eps=0.5, tol=1e-5)
    x32 = x.detach().float().requires_grad_(True)
    expected = ops.wasserstein(x32, y, eps=0.5, tol=1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.backward()
    expected.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, x32.grad.bfloat16(), rtol=0, atol=0)


def test_non_convergence_is_reported_and_bad_input():
    c, a, b = problem(20, 20, seed=4)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        res = ops.sinkhorn(c, a, b, eps=1e-3, max_iter=3, tol=1e-12)
    assert not bool(res.converged) and int(res.n_iter) == 3 and float(res.marginal_error) > 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.sinkhorn(c, a, b, eps=1e-3, max_iter=3, warn=False)
    cases = [
        (lambda: ops.sinkhorn(c.masked_fill(c > 0.9, float("inf")), a, b, eps=0.1), "cost must be finite"),
        (lambda: ops.sinkhorn(c.masked_fill(c > 0.9, float("nan")), a, b, eps=0.1), "cost must be finite"),
        (lambda: ops.sinkhorn(c, a * 2, b, eps=0.1), "same positive total mass"),
        (lambda: ops.sinkhorn(c, -a, b, eps=0.1), "a must be finite and non-negative"),
        (lambda: ops.sinkhorn(c, a[:5], b, eps=0.1), "a must be [20]"),
        (lambda: ops.sinkhorn(c, a, b, eps=0.0), "eps must be > 0"),
        (lambda: ops.sinkhorn(c.int(), a, b, eps=0.1), "cost must be a float32/float64"),
        (lambda: ops.sinkhorn(c, a, b, eps=0.1, method="newton"), "method must be 'sinkhorn' or 'sns'"),
        (lambda: ops.sinkhorn(c, a, b, eps=0.1, method="sns", sparsity=0), "sparsity must be a fraction"),
        (lambda: ops.sinkhorn(c, a, b, eps=0.1, method="sns", sparsity=1.5), "sparsity must be a fraction"),
        (lambda: ops.wasserstein(torch.randn(3, 2), torch.randn(4, 3), eps=0.1), "x and y must be"),
        (lambda: ops.wasserstein(torch.randn(3, 2).half(), torch.randn(4, 2).half(), eps=0.1),
         "x and y must both be float32 or both float64"),
        (lambda: ops.wasserstein(torch.randn(3, 2), torch.randn(4, 2).double(), eps=0.1),
         "got torch.float32 and torch.float64"),
    ]
    expect_errors(cases, ValueError)


def test_small_eps_approaches_the_exact_assignment_cost():
    optimize = pytest.importorskip("scipy.optimize", reason="scipy comes with the test dependencies")
    g = torch.Generator().manual_seed(5)
    c = torch.rand(8, 8, generator=g, dtype=torch.float64)
    rows, cols = optimize.linear_sum_assignment(c.numpy())
    exact = float(c[rows, cols].sum()) / 8           # uniform marginals 1/8
    gaps = []
    for eps in (0.1, 0.03, 0.01):
        res = ops.sinkhorn(c, eps=eps, tol=1e-6, max_iter=100000)
        assert bool(res.converged)
        gaps.append(float(res.transport_cost) - exact)
    assert gaps[0] > gaps[1] > gaps[2] > -1e-5 and gaps[2] < 0.05 * exact, gaps


@pytest.mark.parametrize("sparsity", [0.1, 3, 1.0])
@pytest.mark.parametrize("eps", [0.2, 0.02, 0.004])
def test_sns_agrees_with_sinkhorn_and_the_reference(eps, sparsity):
    c, a, b = problem(24, 17, seed=6)
    sns = ops.sinkhorn(c, a, b, eps=eps, method="sns", sparsity=sparsity, tol=1e-10, max_iter=2000,
                       return_plan=True)
    assert bool(sns.converged), sns.marginal_error
    plain = ops.sinkhorn(c, a, b, eps=eps, tol=1e-10, max_iter=200000, return_plan=True, warn=False)
    torch.testing.assert_close(sns.cost, plain.cost, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(sns.plan, plain.plan, rtol=1e-5, atol=1e-9)
    if eps >= 0.02:   # the plain-scaling reference underflows at smaller eps
        torch.testing.assert_close(sns.plan, ref.sinkhorn_plan(c, a, b, eps, iters=20000), rtol=1e-5, atol=1e-9)
    if eps < 0.01:   # the point of the method: far fewer iterations at small eps
        assert int(sns.n_iter) * 5 < int(plain.n_iter), (int(sns.n_iter), int(plain.n_iter))


def test_sns_gradients_and_batch():
    cs = torch.stack([problem(10, 12, seed=s)[0] for s in range(3)]).requires_grad_(True)
    res = ops.sinkhorn(cs, eps=0.05, method="sns", tol=1e-11, max_iter=500)
    assert bool(res.converged.all())
    res.cost.sum().backward()
    plan = ops.sinkhorn(cs.detach(), eps=0.05, tol=1e-11, max_iter=100000, return_plan=True).plan
    torch.testing.assert_close(cs.grad, plan, rtol=1e-6, atol=1e-10)
    # finite differences of the cost w.r.t. one entry of the cost matrix
    c0 = cs.detach()[0]
    h = 1e-6
    bump = torch.zeros_like(c0)
    bump[3, 4] = h
    fd = (ops.sinkhorn(c0 + bump, eps=0.05, method="sns", tol=1e-12, max_iter=500).cost
          - ops.sinkhorn(c0 - bump, eps=0.05, method="sns", tol=1e-12, max_iter=500).cost) / (2 * h)
    torch.testing.assert_close(fd, cs.grad[0, 3, 4], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("mass", [0.25, 3.7])
@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_unnormalised_marginals_cost_is_the_generalised_kl_one(method, mass):
    """Marginals of equal total mass m != 1: the cost is <P, C> + eps KL(P || a b^T) with the
    generalised KL (the reference's; the op had returned the plain KL's value, off by
    eps (m^2 - m) and negative at m = 10), the plan and gradients those of the normalised
    problem scaled by m; the self term too."""
    c, a, b = problem(8, 11, seed=9)
    eps = 0.3
    res = ops.sinkhorn(c, a * mass, b * mass, eps=eps, method=method, tol=1e-12, max_iter=5000,
                       return_plan=True)
    torch.testing.assert_close(res.cost, ref.ot_eps(c, a * mass, b * mass, eps, iters=20000),
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.plan, mass * ref.sinkhorn_plan(c, a, b, eps, iters=20000),
                               rtol=1e-7, atol=1e-12)
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    w = torch.rand(9, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * mass / 4.5
    self_cost = ops.self_transport_cost(x, w / w.sum() * mass, eps=eps, tol=1e-12, max_iter=2000)
    torch.testing.assert_close(self_cost, ref.ot_eps(torch.cdist(x, x) ** 2, w / w.sum() * mass,
                                                     w / w.sum() * mass, eps, iters=20000),
                               rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 300), (300, 1), (9, 17), (37, 301), (130, 64)], ids=str)
@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_float32_kernels_on_each_cpu_path(cpu_isa, shape, method):
    """The float32 solver (vector passes of every width, scalar tails, column blocks past 256)
    against the float64 reference, with a zero-mass row and column when there is room."""
    c, a, b = problem(*shape, seed=7)
    if shape[0] > 2 and shape[1] > 2:
        a[1], b[2] = 0.0, 0.0
        a, b = a / a.sum(), b / b.sum()
    eps = 0.05
    cc = c.float().requires_grad_(True)
    res = ops.sinkhorn(cc, a.float(), b.float(), eps=eps, method=method, tol=2e-6, max_iter=5000,
                       return_plan=True)
    assert bool(res.converged), res.marginal_error
    plan = ref.sinkhorn_plan(c, a, b, eps, iters=20000)
    assert res.plan.dtype == torch.float32
    torch.testing.assert_close(res.plan.double(), plan, rtol=2e-4, atol=1e-5 / plan.numel())
    torch.testing.assert_close(res.transport_cost.double(), (plan * c).sum(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.cost.double(), ref.ot_eps(c, a, b, eps, iters=20000), rtol=1e-4, atol=1e-6)
    w = torch.rand(()) + 0.5      # a non-unit upstream gradient reaches the plan's scale
    (res.cost * w).backward()
    torch.testing.assert_close(cc.grad.double(), w.double() * plan, rtol=2e-4, atol=1e-5 / plan.numel())


@functools.lru_cache(maxsize=None)
def _float64_case(shape):
    """A float64 problem (cost scale 10, a zero-mass row and column when there is room) and its
    reference plan and cost, computed once for every path and method."""
    c, a, b = problem(*shape, seed=9, scale=10.0)
    if shape[0] > 2 and shape[1] > 2:
        a[1], b[2] = 0.0, 0.0
        a, b = a / a.sum(), b / b.sum()
    eps = 0.5 if min(shape) == 1 else 0.3
    return c, a, b, eps, ref.sinkhorn_plan(c, a, b, eps, iters=50000), ref.ot_eps(c, a, b, eps, iters=50000)


@pytest.mark.parametrize("shape", [(1, 301), (300, 1), (9, 17), (37, 301), (130, 258)], ids=str)
@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_float64_kernels_on_each_cpu_path(cpu_isa, shape, method):
    """The float64 solver on every CPU path (AVX2 / AVX-512: four-lane double vectors and their
    exp; generic: std::exp) against the float64 reference, with a zero-mass row and column, at
    an eps that takes the exact fallback in the first passes (cost scale 10, eps 0.01)."""
    c, a, b, eps, plan, cost = _float64_case(shape)
    cc = c.clone().requires_grad_(True)
    res = ops.sinkhorn(cc, a, b, eps=eps, method=method, tol=1e-11, max_iter=20000, return_plan=True)
    assert bool(res.converged), res.marginal_error
    torch.testing.assert_close(res.plan, plan, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(res.cost, cost, rtol=1e-9, atol=1e-12)
    res.cost.backward()
    torch.testing.assert_close(cc.grad, plan, rtol=1e-7, atol=1e-12)


def test_float32_small_eps_takes_the_exact_fallback():
    """At eps = 1e-3 x the cost scale the first shifted sums underflow in float32 (the solver redoes
    those rows and column blocks exactly); the result matches the float64 solve. (float32 cannot
    go much under tol 1e-4 here: a cost of 10 is known to 1e-6, i.e. 1e-4 of eps, in the exponent.)"""
    c, a, b = problem(45, 70, seed=8, scale=10.0)
    for method in ("sinkhorn", "sns"):
        r64 = ops.sinkhorn(c, a, b, eps=1e-2, method=method, tol=1e-9, max_iter=100000)
        r32 = ops.sinkhorn(c.float(), a.float(), b.float(), eps=1e-2, method=method, tol=2e-4, max_iter=100000)
        assert bool(r32.converged) and bool(r64.converged)
        torch.testing.assert_close(r32.cost.double(), r64.cost, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r32.transport_cost.double(), r64.transport_cost, rtol=1e-3, atol=1e-5)


def test_parallel_batch_equals_parallel_passes():
    """A batch runs problems on threads; a single problem runs its passes on threads: same numbers.
    float64 700 x 300 (past one task's rows: SNS's plan pass splits it) and on 1 or 2 threads."""
    cs = torch.stack([problem(70, 90, seed=s)[0] for s in range(4)]).float()
    for method in ("sinkhorn", "sns"):
        batch = ops.sinkhorn(cs, eps=0.02, method=method, tol=1e-5, max_iter=3000)
        for i in range(4):
            one = ops.sinkhorn(cs[i], eps=0.02, method=method, tol=1e-5, max_iter=3000)
            assert int(one.n_iter) == int(batch.n_iter[i])
            torch.testing.assert_close(one.f, batch.f[i], rtol=1e-5, atol=1e-6)
    big = torch.stack([problem(700, 300, seed=s)[0] for s in range(2)])
    threads = torch.get_num_threads()
    try:
        runs = []
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            batch = ops.sinkhorn(big, eps=0.005, method="sns", tol=1e-10, max_iter=300)
            ones = [ops.sinkhorn(big[i], eps=0.005, method="sns", tol=1e-10, max_iter=300) for i in range(2)]
            runs += [(batch.n_iter, batch.f), (torch.stack([o.n_iter for o in ones]), torch.stack([o.f for o in ones]))]
    finally:
        torch.set_num_threads(threads)
    for n_iter, f in runs[1:]:
        assert torch.equal(n_iter, runs[0][0]), [r[0].tolist() for r in runs]
        assert torch.equal(f, runs[0][1])


@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_torch_operation_path_matches_the_cpu_solver(method):
    """Devices without a kernel (CUDA for SNS, for now) run the same algorithms as torch
    operations (_SinkhornCost); here both run on the CPU and must agree."""
    from fastloss.ops.sinkhorn import _SinkhornCost
    cs = torch.stack([problem(31, 26, seed=s, scale=2.0)[0] for s in range(2)])
    a = torch.full((2, 31), 1 / 31, dtype=torch.float64)
    b = torch.full((2, 26), 1 / 26, dtype=torch.float64)
    newton = (20, 3) if method == "sns" else None
    cost, plan, f, g, n_iter, err = _SinkhornCost.apply(cs, a, b, 0.01, 5000, 1e-10, newton)
    res = ops.sinkhorn(cs, eps=0.01, method=method, sparsity=3, tol=1e-10, max_iter=5000, return_plan=True,
                       warmup_iters=20)
    assert bool((err < 1e-10).all()) and bool(res.converged.all())
    torch.testing.assert_close(res.cost, cost, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.plan, plan, rtol=1e-6, atol=1e-10)
    if method == "sns":   # same algorithm, same iteration counts within a step or two
        assert (res.n_iter - n_iter).abs().max() <= 2, (res.n_iter, n_iter)


@pytest.mark.cuda
@pytest.mark.skipif(not fastloss.cuda_available(), reason="no CUDA device or CUDA build")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_solver_matches_the_cpu_solver(dtype):
    """The CUDA Sinkhorn (one launch set per iteration for the whole batch) runs the CPU
    solver's iteration: the same counts, potentials up to a constant, costs, plans and
    gradients; SNS's CUDA Newton steps as the CPU's."""
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for shape, eps in (((3, 40, 60), 0.05), ((1, 700, 300), 0.02), ((2, 9, 3000), 0.1)):
        bsz, n, m = shape
        cs = torch.stack([problem(n, m, seed=s, dtype=dtype)[0] for s in range(bsz)])
        res = []
        for dev in ("cpu", "cuda"):
            c = cs.detach().to(dev).requires_grad_(True)
            r = ops.sinkhorn(c, eps=eps, tol=tol, max_iter=3000, return_plan=True)
            r.cost.sum().backward()
            res.append((r, c.grad.cpu()))
        (cpu, gc_cpu), (gpu, gc_gpu) = res
        assert bool(gpu.converged.all()), gpu.marginal_error
        assert (gpu.n_iter.cpu() - cpu.n_iter).abs().max() <= (1 if dtype == torch.float64 else 3)
        rtol = 1e-7 if dtype == torch.float64 else 1e-4
        for name in ("cost", "transport_cost"):
            torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=rtol, atol=rtol)
        shift = (gpu.f.cpu() - cpu.f)
        assert float((shift - shift.mean(-1, keepdim=True)).abs().max()) < 1e3 * rtol
        torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, rtol=10 * rtol, atol=1e-9)
        torch.testing.assert_close(gc_gpu, gc_cpu, rtol=10 * rtol, atol=1e-9)
    # SNS: the CUDA Newton steps (sinkhorn_newton_cuda.cuh) against the CPU solver's; the
    # same iterations to about tol (within a few: rounding differs near the end)
    for eps in (0.1, 0.01):
        runs = [ops.sinkhorn(cs.to(dev), eps=eps, method="sns", tol=tol, max_iter=500) for dev in ("cpu", "cuda")]
        assert bool(runs[1].converged.all()), runs[1].marginal_error
        assert (runs[1].n_iter.cpu() - runs[0].n_iter).abs().max() <= 3, (runs[1].n_iter, runs[0].n_iter)
        torch.testing.assert_close(runs[1].cost.cpu(), runs[0].cost, rtol=10 * rtol, atol=10 * rtol)


def test_opcheck_and_compile():
    c, a, b = problem(6, 5, seed=9)
    cb, ab, bb = c[None].clone(), a[None].clone(), b[None].clone()
    for keep in (0, 2):
        torch.library.opcheck(torch.ops.fastloss.sinkhorn_solve.default,
                              (cb.clone().requires_grad_(True), ab, bb, 0.1, 500, 1e-9, 5, keep, 50))
    f, g = torch.ops.fastloss.sinkhorn_solve(cb, ab, bb, 0.1, 500, 1e-9, 5, 0, 50)[1:3]
    torch.library.opcheck(torch.ops.fastloss.sinkhorn_plan.default, (cb, ab, bb, f, g, 0.1, torch.rand(1).double()))
    torch.library.opcheck(torch.ops.fastloss.sinkhorn_plan.default, (cb, ab, bb, f, g, 0.1, None))
    fn = lambda cost, wa: ops.sinkhorn(cost, wa, b, eps=0.1, method="sns", tol=1e-9).cost  # noqa: E731
    assert_compiled_matches(fn, [c, a])
    assert_compiled_matches(fn, [c - 0.7, a])  # (negative costs: the shift traced)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_compiled_matches(lambda u, v: ops.wasserstein(u, v, eps=0.5, tol=1e-9).sum(), [x, y])


def test_sinkhorn_loss_module_is_the_debiased_divergence():
    """nn.SinkhornLoss against the float64 reference: OT_eps(x, y) - (OT_eps(x, x) + OT_eps(y, y)) / 2
    per batch item, reduced; zero (to the solver's tolerance) between a cloud and itself;
    gradients match finite differences of the reference; bad arguments."""
    import fastloss

    g = torch.Generator().manual_seed(11)
    # (clouds of radius ~1 at eps 0.3: Sinkhorn's contraction degrades as max C / eps grows)
    x = torch.randn(3, 9, 2, generator=g, dtype=torch.float64) * 0.5
    y = torch.randn(3, 7, 2, generator=g, dtype=torch.float64) * 0.35 + 0.4
    b = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.2
    b = b / b.sum(1, keepdim=True)
    eps = 0.3

    def ref_ot(u, v, wu, wv):
        return ref.ot_eps(torch.cdist(u, v) ** 2, wu, wv, eps)

    a = torch.full((9,), 1 / 9, dtype=torch.float64)
    expected = torch.stack([ref_ot(x[i], y[i], a, b[i]) - 0.5 * (ref_ot(x[i], x[i], a, a) + ref_ot(y[i], y[i], b[i], b[i]))
                            for i in range(3)])
    loss = fastloss.nn.SinkhornLoss(eps=eps, reduction="none", tol=1e-10, max_iter=20000)
    torch.testing.assert_close(loss(x, y, None, b), expected, rtol=1e-7, atol=1e-9)
    mean = fastloss.nn.SinkhornLoss(eps=eps, tol=1e-10, max_iter=20000)
    torch.testing.assert_close(mean(x, y, None, b), expected.mean(), rtol=1e-7, atol=1e-9)
    plain = fastloss.nn.SinkhornLoss(eps=eps, debias=False, reduction="sum", tol=1e-10, max_iter=20000)
    torch.testing.assert_close(plain(x, y, None, b),
                               torch.stack([ref_ot(x[i], y[i], a, b[i]) for i in range(3)]).sum(), rtol=1e-7, atol=1e-9)
    assert abs(float(mean(x, x))) < 1e-9

    xg = x[0].clone().requires_grad_(True)
    mean(xg, y[0], None, b[0]).backward()
    h = 1e-5
    for i, j in ((0, 0), (4, 1), (8, 0)):
        xp, xm = x[0].clone(), x[0].clone()
        xp[i, j] += h
        xm[i, j] -= h
        fd = (ref_ot(xp, y[0], a, b[0]) - 0.5 * (ref_ot(xp, xp, a, a))
              - ref_ot(xm, y[0], a, b[0]) + 0.5 * ref_ot(xm, xm, a, a)) / (2 * h)
        torch.testing.assert_close(xg.grad[i, j], fd, rtol=1e-5, atol=1e-8)
    expect_errors([
        (lambda: fastloss.nn.SinkhornLoss(reduction="batchmean"), "reduction must be one of"),
        (lambda: fastloss.nn.SinkhornLoss(p=3), "p must be 1 or 2"),
        (lambda: fastloss.nn.SinkhornLoss(eps=0.0), "eps must be > 0"),
        # (solver keywords checked at construction, not at the first call)
        (lambda: fastloss.nn.SinkhornLoss(tolerance=1e-3), "unexpected keyword argument(s) ['tolerance']"),
        (lambda: fastloss.nn.SinkhornLoss(blur=0.1), "p = 2 is SinkhornLoss(eps=2 * s**2) / 2"),
    ])


def test_self_transport_cost_converges_where_alternating_iterations_stall():
    """ops.self_transport_cost (the debiased loss's self terms): on a cloud with max C / eps in
    the hundreds to thousands, where the alternating iteration does not reach 1e-9 in 2000
    iterations, the symmetric update converges in tens of updates; its value is the primal
    objective <P, C> + eps KL(P || a a^T) of its own plan (strong duality), the plan's rows and
    columns sum to a, and it agrees with SNS on the same problem."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 61, 2, generator=g, dtype=torch.float64)
    a = torch.rand(2, 61, generator=g, dtype=torch.float64) + 0.1
    a = a / a.sum(1, keepdim=True)
    c = torch.cdist(x, x) ** 2
    for eps in (0.05, 0.01):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stalled = ops.sinkhorn(c, a, a, eps=eps, tol=1e-9, max_iter=2000)
        assert not bool(stalled.converged.all()), "the case should stall the alternating iteration"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no non-convergence warning
            value = ops.self_transport_cost(x, a, eps=eps, tol=1e-11, max_iter=300)
        f, n_iter, err = _symmetric_potential(c, a, eps, 300, 1e-11)
        assert n_iter < 100 and bool((err < 1e-11).all())
        plan = a[:, :, None] * a[:, None, :] * torch.exp((f[:, :, None] + f[:, None, :] - c) / eps)
        torch.testing.assert_close(plan.sum(2), a, rtol=0, atol=1e-10)
        torch.testing.assert_close(plan.sum(1), a, rtol=0, atol=1e-10)
        aa = a[:, :, None] * a[:, None, :]
        primal = (plan * c).sum((1, 2)) + eps * (torch.special.xlogy(plan, plan / aa) - plan + aa).sum((1, 2))
        torch.testing.assert_close(value, primal, rtol=1e-9, atol=1e-12)
        sns = ops.sinkhorn(c, a, a, eps=eps, method="sns", tol=1e-10, max_iter=500)
        assert bool(sns.converged.all())
        torch.testing.assert_close(value, sns.cost, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_tiny_cost_over_eps_still_iterates(method):
    """Where C / eps is tiny (eps = 1e6 on costs in [0, 1], or clouds of 1e-4 scale at the
    default eps) the starting potentials f = g = 0 already pass tol, and their value 0 had
    been returned as converged after 0 iterations: the solvers now iterate once at least. The
    value is then the primal objective <P, C> + eps KL(P || a b^T) of the reference's plan
    (about <a b^T, C> here); the self terms of the debiased loss likewise."""
    g = torch.Generator().manual_seed(3)
    c = torch.rand(2, 4, 5, generator=g, dtype=torch.float64)
    a = torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.2
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    for eps in (1e6, 1e3):
        r = ops.sinkhorn(c, a, b, eps=eps, method=method)
        assert bool((r.n_iter >= 1).all()) and bool(r.converged.all())
        want = torch.stack([ref.ot_eps(c[k], a[k], b[k], eps, iters=50) for k in range(2)])
        torch.testing.assert_close(r.cost, want, rtol=1e-6, atol=1e-9)
        assert bool((r.cost > 0.2).all())   # (about <a b^T, C>; 0 before)
    x = 1e-4 * torch.rand(1, 6, 2, generator=g, dtype=torch.float64)
    aa = torch.full((1, 6), 1 / 6, dtype=torch.float64)
    cx = torch.cdist(x, x) ** 2
    value = ops.self_transport_cost(x, aa, eps=0.05)
    plan = ref.sinkhorn_plan(cx[0], aa[0], aa[0], 0.05, iters=50)
    primal = (plan * cx[0]).sum() + 0.05 * (torch.special.xlogy(plan, plan / (aa[0, :, None] * aa[0])) - plan
                                            + aa[0, :, None] * aa[0]).sum()
    torch.testing.assert_close(value[0], primal, rtol=1e-4, atol=1e-16)
    assert float(value[0]) > 1e-10


def test_non_convergence_warning_names_a_mass_gap():
    """Masses equal within the accepted 1e-5 but not within tol (weights normalised in float32,
    solved in float64): the marginal error cannot fall below their gap; the warning says so."""
    g = torch.Generator().manual_seed(8)
    a = torch.rand(6, generator=g)
    b = torch.rand(9, generator=g)
    a, b = (a / a.sum()).double(), (b / b.sum()).double()
    b[0] += 5e-6
    c = torch.rand(6, 9, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="differ in total mass by up to 5.*normalise them in torch.float64"):
        ops.sinkhorn(c, a, b, eps=0.05, tol=1e-8, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.sinkhorn(c, a, b / b.sum(), eps=0.05, tol=1e-8, max_iter=2000)


def test_self_transport_cost_gradients_and_errors():
    """Gradients of ops.self_transport_cost against central differences of the symmetric
    solution (x, and a along zero-sum directions); one unbatched cloud equals its batch of one;
    bad arguments."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64)
    a = torch.rand(13, generator=g, dtype=torch.float64) + 0.2
    a = a / a.sum()
    eps = 0.2

    def value(xx, ww):
        return ops.self_transport_cost(xx, ww, eps=eps, tol=1e-13, max_iter=2000)

    xg, ag = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    value(xg, ag).backward()
    torch.testing.assert_close(value(x[None], a[None])[0], value(x, a), rtol=0, atol=1e-14)
    h = 1e-5
    for i, j in ((0, 0), (5, 2), (12, 1)):
        xp, xm = x.clone(), x.clone()
        xp[i, j] += h
        xm[i, j] -= h
        torch.testing.assert_close(xg.grad[i, j], (value(xp, a) - value(xm, a)) / (2 * h), rtol=1e-6, atol=1e-9)
    d = torch.randn(13, generator=g, dtype=torch.float64)
    d = d - d.mean()  # keeps the mass
    fd = (value(x, a + h * d) - value(x, a - h * d)) / (2 * h)
    torch.testing.assert_close((ag.grad * d).sum(), fd, rtol=1e-6, atol=1e-9)
    # max_iter counts updates; devices without the plan op take torch's plan in the backward
    c = torch.cdist(x, x)[None] ** 2
    f1, it1, _ = _symmetric_potential(c, a[None], eps, 1, 0.0)
    assert it1 == 1 and bool((f1 != 0).all())
    sk = importlib.import_module("fastloss.ops.sinkhorn")  # (ops.sinkhorn is the function)
    xt = x.clone().requires_grad_(True)
    real = sk.has_kernel
    sk.has_kernel = lambda t: False
    try:
        value(xt, a).backward()
    finally:
        sk.has_kernel = real
    torch.testing.assert_close(xt.grad, xg.grad, rtol=1e-12, atol=1e-14)
    expect_errors([
        (lambda: ops.self_transport_cost(x.tolist(), eps=0.1), "must be a Tensor"),
        (lambda: ops.self_transport_cost(x[:0], eps=0.1), "n >= 1"),
        (lambda: ops.self_transport_cost(x.half(), eps=0.1), "float32 or float64"),
        (lambda: ops.self_transport_cost(x * float("nan"), eps=0.1), "finite"),
        (lambda: ops.self_transport_cost(x[0], eps=0.1), "x must be"),
        (lambda: ops.self_transport_cost(x, eps=0.0), "eps must be > 0"),
        (lambda: ops.self_transport_cost(x, p=3, eps=0.1), "p must be 1 or 2"),
        (lambda: ops.self_transport_cost(x, a[:5], eps=0.1), "a must be"),
        (lambda: ops.self_transport_cost(x, -a, eps=0.1), "non-negative"),
        (lambda: ops.self_transport_cost(x, eps=0.1, max_iter=0), "max_iter"),
    ])
    with pytest.warns(RuntimeWarning, match="did not reach"):
        ops.self_transport_cost(x, eps=eps, tol=1e-12, max_iter=2)


@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_meta_tensors_give_the_result_shapes(method):
    """Meta tensors: the solver op's fake kernel gives the shapes (the value checks and the
    convergence warning, which read data, are skipped)."""
    r = ops.sinkhorn(torch.rand(3, 5, 6, device="meta"), eps=0.1, method=method, return_plan=True)
    assert (r.cost.shape, r.f.shape, r.g.shape, r.plan.shape) == ((3,), (3, 5), (3, 6), (3, 5, 6))
    assert ops.wasserstein(torch.randn(5, 2, device="meta"), torch.randn(6, 2, device="meta"),
                           eps=0.1, method=method).device.type == "meta"


@pytest.mark.parametrize("eps", [0.002, 0.01])
@pytest.mark.parametrize("n", [6, 20])
def test_sns_converges_on_small_problems(n, eps):
    """SNS on the CPU with the default sparsity keeps 1-2 entries per row of a small plan: too
    few for the Hessian, and its error had fallen like 1 / iterations (2e-5 after 5000 at
    6 x 9, eps = 0.002); the solver now keeps twice as many (up to 8x) after ten Newton steps
    that did not halve the error. (Plain Sinkhorn is no reference here: at 6 x 9, eps = 0.01,
    it is still at 1.6e-5 after 20000 iterations.) Checked: the plan's marginals, and the cost
    against the primal value of that plan, <P, C> + eps KL(P || a b^T)."""
    g = torch.Generator().manual_seed(n)
    c = torch.rand(n, n + 3, generator=g, dtype=torch.float64)
    sns = ops.sinkhorn(c, eps=eps, method="sns", tol=1e-7, max_iter=300, return_plan=True)
    assert bool(sns.converged) and int(sns.n_iter) < 100, (float(sns.marginal_error), int(sns.n_iter))
    a, b = torch.full((n,), 1 / n, dtype=torch.float64), torch.full((n + 3,), 1 / (n + 3), dtype=torch.float64)
    p = sns.plan
    torch.testing.assert_close(p.sum(1), a, rtol=0, atol=1e-7)
    torch.testing.assert_close(p.sum(0), b, rtol=0, atol=1e-7)
    kept = p > 0
    primal = (p * c).sum() + eps * (p[kept] * (p[kept] / (a[:, None] * b[None, :])[kept]).log()).sum()
    torch.testing.assert_close(sns.cost, primal, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method,dtype", [("sns", torch.float64), ("sinkhorn", torch.float32),
                                          ("sns", torch.float32)])
def test_marginal_gradients_of_sns_and_float32(method, dtype):
    """d cost / d (cost matrix, a, b) for the SNS solver and in float32, against the float64
    reference (the marginals' gradients are the dual potentials, defined up to a constant)."""
    c, a, b = problem(17, 11, seed=4)
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(True) for t in (c, a, b)]
    res = ops.sinkhorn(*leaves, eps=0.1, method=method, tol=1e-11 if dtype == torch.float64 else 1e-6,
                       max_iter=5000)
    assert bool(res.converged)
    res.cost.backward()
    refs = [t.clone().requires_grad_(True) for t in (c, a, b)]
    expected = ref.ot_eps(*refs, 0.1)
    expected.backward()
    tol = 1e-6 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(res.cost.double(), expected.detach(), rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(leaves[0].grad.double(), refs[0].grad, rtol=tol, atol=tol * 1e-2)
    for got, exp in zip((leaves[1].grad, leaves[2].grad), (refs[1].grad, refs[2].grad)):
        got = got.double()
        torch.testing.assert_close(got - got.mean(), exp - exp.mean(), rtol=tol, atol=tol * 1e-1)


def test_p1_ground_cost():
    """p = 1 (cost ||x_i - y_j||) for wasserstein, self_transport_cost and nn.SinkhornLoss
    against the float64 reference on torch.cdist, values and gradients."""
    import fastloss

    g = torch.Generator().manual_seed(9)
    x = torch.randn(9, 2, generator=g, dtype=torch.float64)
    y = torch.randn(7, 2, generator=g, dtype=torch.float64) * 0.5 + 0.3
    a = torch.full((9,), 1 / 9, dtype=torch.float64)
    b = torch.full((7,), 1 / 7, dtype=torch.float64)
    eps = 0.2

    def ref_ot(u, v, wu, wv):
        return ref.ot_eps(torch.cdist(u, v), wu, wv, eps, iters=20000)

    kw = dict(p=1, eps=eps, tol=1e-12, max_iter=20000)
    for got_fn, ref_fn in (
            (lambda u: ops.wasserstein(u, y, **kw), lambda u: ref_ot(u, y, a, b)),
            (lambda u: ops.self_transport_cost(u, **kw), lambda u: ref_ot(u, u, a, a)),
            (lambda u: fastloss.nn.SinkhornLoss(**kw)(u, y),
             lambda u: ref_ot(u, y, a, b) - 0.5 * (ref_ot(u, u, a, a) + ref_ot(y, y, b, b)))):
        xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got, want = got_fn(xg), ref_fn(xr)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-6, atol=1e-9)


def test_sns_stops_where_float32_rounding_stalls_the_error(cpu_isa):
    """Float32 SNS at C / eps of several hundred stalls near 2e-6 (the plan's rounding): it
    stops after ten Newton steps with its densest Hessian that end no lower (70-90 steps here,
    not max_iter: 4 x 300-point clouds had taken 1000 steps, 59 s), unconverged, and says
    why; its value is the float64 solve's (which converges to 1e-9) to 1e-6."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 120, 3, generator=g), torch.randn(2, 100, 3, generator=g) + 0.5
    cost = torch.cdist(x, y) ** 2
    with pytest.warns(RuntimeWarning, match="stopped before max_iter.*float32 rounding"):
        r32 = ops.sinkhorn(cost, eps=0.05, method="sns", tol=1e-9, max_iter=1000)
    assert bool((r32.n_iter < 200).all()) and not bool(r32.converged.any()), r32.n_iter
    r64 = ops.sinkhorn(cost.double(), eps=0.05, method="sns", tol=1e-9, max_iter=1000)
    assert bool(r64.converged.all()) and bool((r64.n_iter < 100).all()), r64.n_iter
    torch.testing.assert_close(r32.cost.double(), r64.cost, rtol=1e-6, atol=1e-7)
