"""Entropic optimal transport: log-domain Sinkhorn iterations, and Sinkhorn-Newton-Sparse.

``sinkhorn(cost, a, b, eps)`` solves, for ``cost`` ``[n, m]`` or a batch ``[B, n, m]`` and
marginals ``a`` ``[n]`` / ``b`` ``[m]`` (uniform when omitted),

.. math:: \\mathrm{OT}_\\epsilon = \\min_{P 1 = a,\\ P^T 1 = b} \\langle P, C \\rangle
          + \\epsilon\\,\\mathrm{KL}(P \\,\\|\\, a b^T)

(``KL`` the generalised one, ``sum P log(P / ab) - sum P + sum ab``: non-negative for any
total mass, the plain KL for normalised marginals)

through the dual potentials ``f``, ``g`` with ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``,
updated in the log domain (``f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)`` and likewise for
``g``), so that no exponential over- or underflows at small ``eps`` (tested down to
``1e-4`` times the cost scale). It stops when the row-marginal error ``||P 1 - a||_1`` falls
under ``tol`` (the columns are exact after each ``g`` update) or after ``max_iter`` iterations;
the result says how many were taken and whether each problem converged (and a warning is
emitted when one did not, unless ``warn=False``). ``method="sns"`` (Tang et al., ICLR 2024)
warms up with Sinkhorn iterations, then takes Newton steps on the dual with a sparsified
Hessian and stops on the row and column errors together (its ``marginal_error`` is their sum).

Gradients (without differentiating through the iterations, by the envelope theorem): the
regularized cost has gradient ``P`` with respect to ``cost`` and the centred potentials
``f - mean(f)``, ``g - mean(g)`` with respect to ``a`` and ``b``. Marginals must be
non-negative with the same total mass (an error otherwise: nothing is renormalised
silently). float32 and float64. On the CPU both methods run in the C++ solver
(csrc/sinkhorn/: AVX2 / AVX-512 log-sum-exp passes, the plan formed once per Newton step, a
sparse Hessian-vector product inside conjugate gradient) as the custom op
``fastloss::sinkhorn_solve``, whose backward recomputes the plan from the potentials instead of
keeping it. On CUDA tensors both methods run the same op on the CUDA solver
(csrc/sinkhorn/sinkhorn_cuda.cu: the whole batch in one set of launches per iteration, fused
log-sum-exp row and column passes over the cost; sinkhorn_newton_cuda.cuh: SNS's Newton steps,
the plan, its threshold, the kept entries as CSR and CSC, conjugate gradient and the line
search as batched kernels); other devices run the same algorithms as torch operations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._checks import as_int
from ._devices import has_kernel
from ._dtypes import autocast_dtype, runs_without_autocast
from ._autograd import once_differentiable

_CG_ITERS = 500  # conjugate-gradient iterations per Newton step, at most (rarely reached)


@dataclass
class SinkhornResult:
    cost: Tensor               # [B] (or []) the regularized OT cost <P, C> + eps KL, differentiable (gradient P)
    transport_cost: Tensor     # <P, C> (POT's ot.sinkhorn2), not differentiable
    f: Tensor                  # [B, n] dual potentials
    g: Tensor                  # [B, m]
    n_iter: Tensor             # [B] iterations taken
    marginal_error: Tensor     # [B] ||P 1 - a||_1 at the end
    converged: Tensor          # [B] bool
    plan: Optional[Tensor] = None


def _iterate(c, log_a, log_b, eps, max_iter, tol, check_every=10):
    """Log-domain Sinkhorn on [B, n, m] (no autograd). -> (f, g, iterations, errors)"""
    bsz, n, m = c.shape
    f = torch.zeros(bsz, n, dtype=c.dtype, device=c.device)
    g = torch.zeros(bsz, m, dtype=c.dtype, device=c.device)
    n_iter = torch.zeros(bsz, dtype=torch.int64, device=c.device)
    err = torch.full((bsz,), float("inf"), dtype=c.dtype, device=c.device)
    active = torch.ones(bsz, dtype=torch.bool, device=c.device)
    a = log_a.exp()
    for it in range(1, max_iter + 1):
        f_new = -eps * torch.logsumexp((g[:, None, :] - c) / eps + log_b[:, None, :], dim=2)
        f = torch.where(active[:, None], f_new, f)
        g_new = -eps * torch.logsumexp((f[:, :, None] - c) / eps + log_a[:, :, None], dim=1)
        g = torch.where(active[:, None], g_new, g)
        n_iter += active.long()
        if it % check_every == 0 or it == max_iter:
            log_p = (f[:, :, None] + g[:, None, :] - c) / eps + log_a[:, :, None] + log_b[:, None, :]
            err = torch.where(active, (log_p.exp().sum(2) - a).abs().sum(1), err)
            active = active & ~(err < tol)
            if not bool(active.any()):
                break
    return f, g, n_iter, err


def _log_plan(c, f, g, log_a, log_b, eps):
    return (f[:, :, None] + g[:, None, :] - c) / eps + log_a[:, :, None] + log_b[:, None, :]


def _lyapunov(c, f, g, a, b, log_a, log_b, eps):
    """The concave dual <a, f> + <b, g> - eps sum P (maximised at the solution), [B]."""
    return (a * f).sum(1) + (b * g).sum(1) - eps * _log_plan(c, f, g, log_a, log_b, eps).exp().sum((1, 2))


def _newton_sparse(c, log_a, log_b, eps, max_iter, tol, warmup_iters, keep, cg_iters=_CG_ITERS):
    """Sinkhorn-Newton-Sparse (Tang et al., ICLR 2024) in torch operations (the CPU runs the same
    algorithm in csrc/sinkhorn/): Sinkhorn warm-up, then Newton steps on the dual whose Hessian
    keeps, off its diagonal, the keep * n largest entries of the plan, solved by Jacobi-
    preconditioned conjugate gradient, with a backtracking line search on the dual. Batched
    with per-problem masks. -> (f, g, iterations, errors)"""
    bsz, n, m = c.shape
    a, b = log_a.exp(), log_b.exp()
    f, g, n_iter, err = _iterate(c, log_a, log_b, eps, max(1, warmup_iters), 0.0, check_every=max(1, warmup_iters))
    f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    active = torch.ones(bsz, dtype=torch.bool, device=c.device)
    for _ in range(max_iter - int(n_iter.max())):
        p = _log_plan(c, f, g, log_a, log_b, eps).exp()
        r, s_ = p.sum(2), p.sum(1)
        err = (r - a).abs().sum(1) + (s_ - b).abs().sum(1)
        active = active & ~(err < tol)
        if not bool(active.any()):
            break
        grad_f, grad_g = a - r, b - s_
        # sparsified plan: its keep * n largest entries (one threshold per problem, as in the paper)
        budget = min(keep * n, n * m)
        thresh = p.flatten(1).topk(budget, dim=1).values[:, -1:, None]
        ps = torch.where((p >= thresh) & (p > 0), p, torch.zeros_like(p))
        reg = 1e-10 + 1e-6 * r.amax(1, keepdim=True)   # (1, -1) is a null direction of H

        def hvp(vf, vg):
            return ((r + reg) * vf + torch.bmm(ps, vg[:, :, None])[:, :, 0]) / eps, \
                   ((s_ + reg) * vg + torch.bmm(ps.transpose(1, 2), vf[:, :, None])[:, :, 0]) / eps

        # conjugate gradient on H [df, dg] = [grad_f, grad_g], batched, Jacobi-preconditioned,
        # to the relative residual eta = min(0.1, sqrt(||grad||)) (inexact Newton)
        jf, jg = eps / (r + reg), eps / (s_ + reg)
        xf, xg = torch.zeros_like(f), torch.zeros_like(g)
        rf, rg = grad_f.clone(), grad_g.clone()
        pf, pg = jf * rf, jg * rg
        rz = (rf * pf).sum(1) + (rg * pg).sum(1)
        gnorm = grad_f.square().sum(1) + grad_g.square().sum(1)
        eta2 = gnorm.sqrt().clamp(max=0.01)
        live_cg = torch.ones_like(active)
        for _cg in range(cg_iters):
            hf, hg = hvp(pf, pg)
            php = (pf * hf).sum(1) + (pg * hg).sum(1)
            live_cg = live_cg & (php > 0)
            alpha = torch.where(live_cg, rz / php.clamp_min(1e-300), torch.zeros_like(rz))[:, None]
            xf, xg = xf + alpha * pf, xg + alpha * pg
            rf, rg = rf - alpha * hf, rg - alpha * hg
            live_cg = live_cg & ((rf * rf).sum(1) + (rg * rg).sum(1) > eta2 * gnorm + 1e-300)
            if not bool(live_cg.any()):
                break
            zf, zg = jf * rf, jg * rg
            rz_new = (rf * zf).sum(1) + (rg * zg).sum(1)
            beta = (rz_new / rz.clamp_min(1e-300))[:, None]
            pf, pg = zf + beta * pf, zg + beta * pg
            rz = rz_new
        # backtracking line search on the (concave) dual
        base = _lyapunov(c, f, g, a, b, log_a, log_b, eps)
        slope = (grad_f * xf).sum(1) + (grad_g * xg).sum(1)
        t = torch.ones(bsz, dtype=c.dtype, device=c.device)
        for _ls in range(30):
            cand = _lyapunov(c, f + t[:, None] * xf, g + t[:, None] * xg, a, b, log_a, log_b, eps)
            # Armijo, and a strict increase: a step too small to change the dual in floating
            # point counts as a failure (the Sinkhorn fallback below then makes progress)
            ok = (cand > base) & (cand >= base + 1e-4 * t * slope)
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t * 0.5)
        step = (active & ok)[:, None]
        f = torch.where(step, f + t[:, None] * xf, f)
        g = torch.where(step, g + t[:, None] * xg, g)
        # then one Sinkhorn iteration (cheap next to the Newton step): each iteration makes at
        # least Sinkhorn's progress, also where the sparse Hessian is a poor model
        live = active[:, None]
        f_s = -eps * torch.logsumexp((g[:, None, :] - c) / eps + log_b[:, None, :], dim=2)
        f = torch.where(live, f_s, f)
        g_s = -eps * torch.logsumexp((f[:, :, None] - c) / eps + log_a[:, :, None], dim=1)
        g = torch.where(live, g_s, g)
        n_iter += active.long()
    # the error reported is the one the loop tests: rows and columns together
    p = _log_plan(c, f, g, log_a, log_b, eps).exp()
    err = (p.sum(2) - a).abs().sum(1) + (p.sum(1) - b).abs().sum(1)
    return f, g, n_iter, err


class _SinkhornCost(torch.autograd.Function):
    @staticmethod
    @runs_without_autocast  # (the Newton solver's bmm in the cost's dtype)
    def forward(ctx, c, a, b, eps, max_iter, tol, newton):
        log_a = torch.log(a)
        log_b = torch.log(b)
        if newton is None:
            f, g, n_iter, err = _iterate(c, log_a, log_b, eps, max_iter, tol)
        else:
            f, g, n_iter, err = _newton_sparse(c, log_a, log_b, eps, max_iter, tol, *newton)
        # zero-mass entries have log = -inf; their potentials are irrelevant: keep them finite
        f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        log_p = (f[:, :, None] + g[:, None, :] - c) / eps + log_a[:, :, None] + log_b[:, None, :]
        plan = log_p.exp()
        cost = (a * f).sum(1) + (b * g).sum(1)
        ctx.save_for_backward(plan, f, g)
        ctx.mark_non_differentiable(plan, f, g, n_iter, err)
        return cost, plan, f, g, n_iter, err

    @staticmethod
    @once_differentiable("sinkhorn / wasserstein")
    def backward(ctx, grad_cost, _gp, _gf, _gg, _gn, _ge):
        plan, f, g = ctx.saved_tensors
        gc = grad_cost[:, None, None] * plan if ctx.needs_input_grad[0] else None
        ga = grad_cost[:, None] * (f - f.mean(1, keepdim=True)) if ctx.needs_input_grad[1] else None
        gb = grad_cost[:, None] * (g - g.mean(1, keepdim=True)) if ctx.needs_input_grad[2] else None
        return gc, ga, gb, None, None, None, None


# --- the custom ops (csrc/sinkhorn/sinkhorn_op.cpp; CPU and CUDA): shapes and autograd -------------------

@torch.library.register_fake("fastloss::sinkhorn_solve")
def _fake_solve(cost, a, b, eps, max_iter, tol, warmup_iters, keep, cg_iters):
    bsz, n, m = cost.shape
    vec = cost.new_empty((bsz,))
    return (vec, cost.new_empty((bsz, n)), cost.new_empty((bsz, m)),
            cost.new_empty((bsz,), dtype=torch.int64), cost.new_empty((bsz,)), cost.new_empty((bsz,)))


@torch.library.register_fake("fastloss::sinkhorn_plan")
def _fake_plan(cost, a, b, f, g, eps, scale):
    return cost.new_empty(cost.shape)


def _setup_solve(ctx, inputs, output):
    cost, a, b, eps = inputs[:4]
    _value, f, g, n_iter, err, transport = output
    ctx.save_for_backward(cost, a, b, f, g)
    ctx.eps = eps
    ctx.mark_non_differentiable(f, g, n_iter, err, transport)


@once_differentiable("sinkhorn / wasserstein")
def _backward_solve(ctx, grad_value, *_unused):
    # envelope theorem: d value / d cost = P (recomputed from the potentials, never stored),
    # d value / d a = f and d value / d b = g, centred (the potentials are defined up to a constant)
    cost, a, b, f, g = ctx.saved_tensors
    gc = ga = gb = None
    if ctx.needs_input_grad[0]:
        gc = torch.ops.fastloss.sinkhorn_plan(cost, a, b, f, g, ctx.eps, grad_value)
    if ctx.needs_input_grad[1]:
        ga = grad_value[:, None] * (f - f.mean(1, keepdim=True))
    if ctx.needs_input_grad[2]:
        gb = grad_value[:, None] * (g - g.mean(1, keepdim=True))
    return gc, ga, gb, None, None, None, None, None, None


torch.library.register_autograd("fastloss::sinkhorn_solve", _backward_solve, setup_context=_setup_solve)


def _marginal(x, size, bsz, name, like, check_values=True, fn="sinkhorn"):
    if x is None:
        return torch.full((bsz, size), 1.0 / size, dtype=like.dtype, device=like.device)
    if not isinstance(x, Tensor) or x.shape[-1] != size or x.dim() not in (1, 2) or (
            x.dim() == 2 and x.shape[0] != bsz):
        raise ValueError(f"{fn}: {name} must be [{size}] or [{bsz}, {size}], got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    x = x.to(like.dtype)
    if check_values and (not bool(torch.isfinite(x).all()) or bool((x < 0).any())):
        raise ValueError(f"{fn}: {name} must be finite and non-negative")
    return x.expand(bsz, size) if x.dim() == 1 else x


def _check_eps_iters(fn, eps, max_iter) -> int:
    """max_iter, checked with eps, as an int."""
    max_iter = as_int(max_iter)
    if not eps > 0:
        raise ValueError(f"{fn}: eps must be > 0, got {eps}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"{fn}: max_iter must be an int >= 1, got {max_iter!r}")
    return max_iter


def sinkhorn(cost: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None, *,
             eps: float, method: str = "sinkhorn", max_iter: int = 1000, tol: float = 1e-6,
             warmup_iters: int = 10, sparsity: Optional[float] = 0.1,
             return_plan: bool = False, warn: bool = True) -> SinkhornResult:
    """Entropic OT between ``a`` and ``b`` for ``cost`` (see the module docstring).

    Args:
        cost: ``[n, m]`` or ``[B, n, m]``, finite, float32 or float64; negative entries are
            allowed (a problem whose cost has one is solved shifted to a minimum of 0: the value
            and ``transport_cost`` move by the shift times the mass, ``f`` by the shift, and
            are moved back).
        a, b: marginals ``[n]`` / ``[m]`` (or ``[B, n]`` / ``[B, m]``); uniform when None.
        eps: the entropic regularization, > 0.
        method: ``"sinkhorn"``, or ``"sns"``: ``warmup_iters`` Sinkhorn iterations, then Newton
            steps on the dual whose Hessian keeps, off its diagonal, the largest entries of the
            plan: ``sparsity`` times its ``n m`` entries (a float fraction), or ``sparsity`` per
            row on average (an int count), under one threshold for the whole plan (as in the
            paper; rows with broad plans keep more). Each direction is solved by Jacobi-
            preconditioned conjugate gradient to a relative residual min(0.1, sqrt(||grad||)),
            then a backtracking line search on the dual, then one Sinkhorn iteration (so that an
            iteration never makes less progress than Sinkhorn's). The default 10 warm-up
            iterations (not 20) took fewer iterations on every problem and eps of
            bench/bench_sinkhorn.py at about the same time (measured at commit 3d0e1d6+).
        max_iter, tol: at most ``max_iter`` iterations (Sinkhorn or Newton steps, warm-up
            included); stop when the marginal error falls under ``tol`` (SNS: rows and columns).
            SNS also stops, unconverged, where ten Newton steps with its densest Hessian end
            no lower than they began: the error has reached the plan's rounding floor (in
            float32 at ``C / eps`` of a few hundred, around 1e-6 to 1e-5), which more steps
            do not pass.
        return_plan: also return the plan ``P`` (POT's ``ot.sinkhorn`` returns it).

    POT's ``ot.sinkhorn2(a, b, M, reg)`` is ``transport_cost`` here (``<P, C>``, without
    gradient); ``cost`` adds ``eps KL(P || a b^T)`` and is what to differentiate (its gradient
    with respect to ``C`` is ``P``). ``eps`` is POT's ``reg``.
    """
    if method not in ("sinkhorn", "sns"):
        raise ValueError(f"sinkhorn: method must be 'sinkhorn' or 'sns', got {method!r}")
    if not isinstance(cost, Tensor) or cost.dim() not in (2, 3) or cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sinkhorn: cost must be a float32/float64 [n, m] or [B, n, m] tensor, got "
                         f"{getattr(cost, 'dtype', type(cost))} {tuple(getattr(cost, 'shape', ()))}")
    max_iter = _check_eps_iters("sinkhorn", eps, max_iter)
    single = cost.dim() == 2
    c = cost[None] if single else cost
    # the value checks read the data: done eagerly, skipped inside torch.compile graphs (and on
    # meta tensors, which have none)
    check_values = not torch.compiler.is_compiling() and not cost.is_meta
    if check_values and not bool(torch.isfinite(c).all()):
        raise ValueError("sinkhorn: cost must be finite (+inf for forbidden pairs is not supported)")
    bsz, n, m = c.shape
    if n == 0 or m == 0:
        raise ValueError(f"sinkhorn: cost must have at least one row and one column, got {tuple(cost.shape)}")
    aa = _marginal(a, n, bsz, "a", c, check_values)
    bb = _marginal(b, m, bsz, "b", c, check_values)
    mass_a, mass_b = aa.sum(1), bb.sum(1)
    if check_values and (bool(((mass_a - mass_b).abs() > 1e-5 * torch.maximum(mass_a, mass_b)).any())
                         or bool((mass_a <= 0).any())):
        raise ValueError(f"sinkhorn: a and b must have the same positive total mass, got "
                         f"{mass_a.tolist()} and {mass_b.tolist()} (normalise them first)")
    # A cost with negative entries is solved shifted to a minimum of 0: C - s moves neither the
    # plan nor the marginals (the value and <P, C> move by s * mass, f by s, put back below),
    # and in float32 it keeps the potentials at the scale of the cost's spread (unshifted, an
    # offset of -3 had taken SNS from 15 steps to a stalled 70). Non-negative costs go as they
    # are (no copy); traced calls, which cannot look at the values, always shift (by 0 where
    # the cost is non-negative).
    shift = None
    if c.numel() and (not check_values or bool((c < 0).any())):
        shift = c.detach().amin((1, 2)).clamp(max=0)
        c = c - shift[:, None, None]
    newton = None
    if method == "sns":
        if isinstance(sparsity, bool) or not (
                (isinstance(sparsity, int) and sparsity >= 1)
                or (isinstance(sparsity, float) and 0 < sparsity <= 1)):
            raise ValueError(f"sinkhorn: sparsity must be a fraction in (0, 1] (a float) or a "
                             f"count >= 1 (an int) of entries kept per row, got {sparsity!r}")
        keep = sparsity if isinstance(sparsity, int) else max(1, int(math.ceil(sparsity * m)))
        newton = (int(warmup_iters), min(keep, m))
    if c.device.type in ("cpu", "meta") or has_kernel(c):  # (meta: the fake kernel)
        keep = 0 if newton is None else newton[1]
        warm = 0 if newton is None else newton[0]
        total, f, g, n_iter, err, transport = torch.ops.fastloss.sinkhorn_solve(
            c, aa, bb, float(eps), max_iter, float(tol), warm, keep, _CG_ITERS)
        plan = torch.ops.fastloss.sinkhorn_plan(c.detach(), aa.detach(), bb.detach(), f, g, float(eps),
                                                None) if return_plan else None
    else:
        total, plan, f, g, n_iter, err = _SinkhornCost.apply(c, aa, bb, float(eps), max_iter, float(tol), newton)
        transport = (plan * c.detach()).sum((1, 2))
    total = total + _kl_mass_term(eps, mass_a, mass_b)
    if shift is not None:  # (the centred potentials stay a's gradient: the term is detached)
        total = total + (shift * mass_a).detach()
        transport = transport + shift * mass_b.detach()  # (the plan's mass after its g update)
        f = f + shift[:, None]
    converged = err < tol
    if warn and check_values and not bool(converged.all()):
        # (masses accepted as equal may still differ by more than tol, which the marginal
        # error then cannot go below: weights normalised in float32 and solved in float64)
        gap = (mass_a - mass_b).abs()[~converged]
        hint = (f"; a and b differ in total mass by up to {float(gap.max()):.3g}, a floor for the marginal "
                f"error: normalise them in {c.dtype}" if bool((gap >= 0.5 * tol).any()) else "")
        # (SNS stops a problem whose error has stalled with its densest Hessian: csrc/sinkhorn)
        stalled = int(((~converged) & (n_iter < max_iter)).sum())
        if stalled:
            floor = ("the plan's float32 rounding, likely: solve in float64 or set tol above it"
                     if c.dtype == torch.float32 else "set tol above it")
            hint += (f"; {stalled} stopped before max_iter, their error no lower after ten Newton "
                     f"steps with the densest Hessian ({floor})")
        warnings.warn(f"sinkhorn: {int((~converged).sum())} of {bsz} problem(s) did not reach "
                      f"tol={tol} in {max_iter} iterations (marginal error up to {float(err.max()):.3g}){hint}",
                      RuntimeWarning, stacklevel=2)
    squeeze = (lambda t: t[0]) if single else (lambda t: t)
    return SinkhornResult(squeeze(total), squeeze(transport), squeeze(f), squeeze(g), squeeze(n_iter),
                          squeeze(err), squeeze(converged), squeeze(plan) if return_plan else None)


def _kl_mass_term(eps, mass_a, mass_b):
    """eps (sum a b^T - sum P) = eps (m_a m_b - m_a): what the generalised KL adds to the dual
    value <a, f> + <b, g> (which is the plain KL's: negative costs for masses above 1, -6.1
    where the generalised form gives 38.9 at mass 10); 0 for normalised marginals. Constant
    along equal-mass changes of a and b, so left out of their gradients (the centred
    potentials)."""
    return (eps * (mass_a * mass_b - mass_a)).detach()


def _symmetric_potential(c, a, eps, max_iter, tol):
    """The potential f = g of the symmetric problem OT_eps(a, a) for a symmetric cost ``c``
    ``[B, n, n]``, by the averaged update f <- (f + T f) / 2, T f_i = -eps log sum_j a_j
    exp((f_j - c_ij) / eps) (Feydy et al., 2019). The alternating Sinkhorn iteration on such a
    problem stalls once max c / eps is large (a 300-point cloud with max c = 45: 20000
    iterations without reaching 1e-9 from eps = 0.1 down, against 22-25 averaged updates,
    measured at commit 6ee84bb+). -> (f, iterations, row-marginal error)"""
    log_a = a.log()
    f = torch.zeros_like(a)
    for it in range(max_iter + 1):  # it updates done
        tf = -eps * torch.logsumexp(log_a[:, None, :] + (f[:, None, :] - c) / eps, dim=2)
        # the rows of the plan of (f, f) sum to a_i exp((f_i - T f_i) / eps)
        err = torch.where(a > 0, a * torch.expm1((f - tf) / eps), torch.zeros_like(a)).abs().sum(1)
        # (one update at least: f = 0 passes any tol once c / eps is tiny, and its value 0 is
        # then off by about <a a^T, c>)
        if it == max_iter or (it > 0 and bool((err < tol).all())):
            break  # err is f's
        f = 0.5 * (f + tf)
    return f, it, err


class _SymmetricCost(torch.autograd.Function):
    """OT_eps(a, a) = 2 <a, f> for a symmetric cost; gradients by the envelope theorem, as the
    solver's: the plan for the cost, 2 (f - mean f) for ``a`` (it is both marginals)."""

    @staticmethod
    def forward(ctx, c, a, eps, max_iter, tol):
        f, n_iter, err = _symmetric_potential(c, a, eps, max_iter, tol)
        ctx.save_for_backward(c, a, f)
        ctx.eps = eps
        iters = torch.full_like(err, n_iter, dtype=torch.int64)
        ctx.mark_non_differentiable(err, iters)
        return 2.0 * (a * f).sum(1), err, iters

    @staticmethod
    @once_differentiable("self_transport_cost")
    def backward(ctx, grad_value, _ge, _gn):
        c, a, f = ctx.saved_tensors
        gc = ga = None
        if ctx.needs_input_grad[0]:
            if has_kernel(c):
                gc = torch.ops.fastloss.sinkhorn_plan(c.contiguous(), a.contiguous(), a.contiguous(), f, f,
                                                      ctx.eps, grad_value.contiguous())
            else:  # devices without the plan op
                gc = grad_value[:, None, None] * _log_plan(c, f, f, a.log(), a.log(), ctx.eps).exp()
        if ctx.needs_input_grad[1]:
            ga = 2.0 * grad_value[:, None] * (f - f.mean(1, keepdim=True))
        return gc, ga, None, None, None


def self_transport_cost(x: Tensor, a: Optional[Tensor] = None, *, p: int = 2, eps: float,
                        max_iter: int = 1000, tol: float = 1e-6, warn: bool = True) -> Tensor:
    """OT_eps(x, x) with weights ``a`` on both sides (the self terms of the Sinkhorn divergence)
    for a point cloud ``x`` ``[B, n, d]`` (or ``[n, d]``) and cost ``||x_i - x_j||^p``, solved by
    the symmetric averaged update (see :func:`_symmetric_potential`), which converges in tens of
    iterations where alternating Sinkhorn iterations on the same problem stall. Differentiable
    in ``x`` and ``a``; warns when ``tol`` is not reached in ``max_iter`` updates."""
    if not isinstance(x, Tensor):
        raise TypeError(f"self_transport_cost: x must be a Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3) or x.shape[-2] == 0:
        raise ValueError(f"self_transport_cost: x must be [n, d] or [B, n, d] with n >= 1, got "
                         f"{tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"self_transport_cost: x must be float32 or float64, got {x.dtype}")
    if p not in (1, 2):
        raise ValueError(f"self_transport_cost: p must be 1 or 2, got {p}")
    max_iter = _check_eps_iters("self_transport_cost", eps, max_iter)
    single = x.dim() == 2
    xb = x[None] if single else x
    d = torch.cdist(xb, xb)
    c = d * d if p == 2 else d
    check_values = not torch.compiler.is_compiling()
    if check_values and not bool(torch.isfinite(c).all()):
        raise ValueError("self_transport_cost: x must be finite")
    aa = _marginal(a, c.shape[1], c.shape[0], "a", c, check_values, "self_transport_cost")
    if check_values and bool((aa.sum(1) <= 0).any()):
        raise ValueError("self_transport_cost: a must have a positive total mass")
    value, err, _ = _SymmetricCost.apply(c, aa, float(eps), max_iter, float(tol))
    value = value + _kl_mass_term(eps, aa.sum(1), aa.sum(1))
    if warn and check_values and not bool((err < tol).all()):
        warnings.warn(f"self_transport_cost: {int((~(err < tol)).sum())} of {c.shape[0]} problem(s) "
                      f"did not reach tol={tol} in {max_iter} updates (marginal error up to "
                      f"{float(err.max()):.3g})", RuntimeWarning, stacklevel=2)
    return value[0] if single else value


def wasserstein(x: Tensor, y: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None, *,
                p: int = 2, eps: float, **kwargs) -> Tensor:
    """Entropic OT cost between point clouds ``x`` ``[B, n, d]`` (or ``[n, d]``) and ``y``
    ``[B, m, d]`` with ground cost ``||x_i - y_j||^p``; differentiable in ``x`` and ``y``."""
    if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or x.dim() not in (2, 3):
        raise ValueError(f"wasserstein: x and y must be [n, d] and [m, d] (or batched), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if p not in (1, 2):
        raise ValueError(f"wasserstein: p must be 1 or 2, got {p}")
    # (the solver's dtypes; under autocast torch.cdist, a float32 op there, takes 16-bit clouds
    # to a float32 cost itself)
    lower = (torch.float16, torch.bfloat16, torch.float32) if autocast_dtype(x) is not None else ()
    if not (x.dtype == y.dtype and x.dtype in (torch.float32, torch.float64)
            or x.dtype in lower and y.dtype in lower):
        raise ValueError(f"wasserstein: x and y must both be float32 or both float64 (16-bit too under "
                         f"autocast), got {x.dtype} and {y.dtype}")
    d = torch.cdist(x, y)
    c = d * d if p == 2 else d
    return sinkhorn(c, a, b, eps=eps, **kwargs).cost

