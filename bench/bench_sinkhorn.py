"""Benchmark of entropic OT: Sinkhorn-Newton-Sparse vs Sinkhorn (and POT) to the same tolerance.

Problems (costs scaled to max 1, uniform or density marginals, float64, CPU):
  * ``assignment``: a random 200 x 200 cost matrix, uniform marginals;
  * ``digits_W1`` / ``digits_W2``: two scikit-learn 8 x 8 digit images as densities on the pixel
    grid, Euclidean / squared-Euclidean ground cost;
  * ``density_1d``: two Gaussian mixtures discretised on 400 points of [0, 1], squared cost;
  * ``density_2d``: two Gaussian mixtures on a 24 x 24 grid of [0, 1]^2 (576 points), squared cost.
For each problem and eps: iterations and time of ``fastloss.ops.sinkhorn`` with
``method="sinkhorn"`` and ``method="sns"`` (sparsity 0.1) until the marginal error is under
``tol`` (1e-8), and POT's ``ot.sinkhorn(method="sinkhorn_log")`` with the same stop threshold
where POT is installed (its error is measured on the columns, ours on the rows, or on both for
SNS); each row records the iterations taken and whether it converged within the cap. On the
squared-cost problems, GeomLoss's ``SamplesLoss("sinkhorn", debias=False)`` (tensorized,
eps-scaling 0.9) where installed: it has no tolerance, so its row records the marginal error
its potentials reach (rows + columns) instead of an iteration count. Per problem also POT's
exact solver (``ot.emd2``, network simplex): its time, and the gap of each of our solutions'
transport cost ``<P, C>`` to the exact cost (it shrinks with eps).

With ``--device cuda``: large batched problems instead (random costs in [0, 1], uniform
marginals, float32 and float64, to a marginal error of 1e-5 / 1e-8), timing the CUDA Sinkhorn
solver and SNS (its CUDA Newton steps) against the same iteration as torch operations (the
eager path, ``_SinkhornCost``) and POT's ``sinkhorn_log`` on the torch backend; each row records the iterations, and the floor of
one iteration is two reads of the cost (the row and the column passes).

Usage: python bench/bench_sinkhorn.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastloss  # noqa: E402

EPS = [0.05, 0.01, 0.002]
TOL = 1e-8
MAX_ITER = 20000


def problems(quick: bool):
    g = torch.Generator().manual_seed(0)
    out = {}
    n = 40 if quick else 200
    out["assignment"] = (torch.rand(n, n, generator=g, dtype=torch.float64), None, None)
    try:
        from sklearn.datasets import load_digits
        images = torch.tensor(load_digits().images, dtype=torch.float64).reshape(-1, 64)
        a, b = images[0] + 1e-3, images[7] + 1e-3
        a, b = a / a.sum(), b / b.sum()
        yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        pts = torch.stack([yy.flatten(), xx.flatten()], 1).double()
        d = torch.cdist(pts, pts)
        out["digits_W1"] = (d / d.max(), a, b)
        out["digits_W2"] = (d ** 2 / (d ** 2).max(), a, b)
    except Exception as e:  # scikit-learn missing
        out["digits"] = f"missing: scikit-learn digits not loadable ({type(e).__name__}: {e})"
    m = 80 if quick else 400
    x = torch.linspace(0, 1, m, dtype=torch.float64)
    mix = lambda c1, c2: torch.exp(-((x - c1) / 0.05) ** 2) + 0.5 * torch.exp(-((x - c2) / 0.1) ** 2) + 1e-6  # noqa: E731
    a, b = mix(0.2, 0.7), mix(0.4, 0.9)
    out["density_1d"] = ((x[:, None] - x[None, :]) ** 2, a / a.sum(), b / b.sum())
    k = 10 if quick else 24
    t = torch.linspace(0, 1, k, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    bump = lambda c, w: torch.exp(-((pts - torch.tensor(c, dtype=torch.float64)) ** 2).sum(1) / w ** 2)  # noqa: E731
    a = bump((0.3, 0.3), 0.1) + 0.6 * bump((0.7, 0.4), 0.15) + 1e-6
    b = bump((0.5, 0.7), 0.12) + 0.4 * bump((0.2, 0.8), 0.1) + 1e-6
    out["density_2d"] = (torch.cdist(pts, pts) ** 2 / 2.0, a / a.sum(), b / b.sum())
    return out


# the point clouds behind the squared-cost problems (for GeomLoss, whose p = 2 cost is
# |x - y|^2 / 2: the points are scaled so that it equals our normalised cost)
def _points(name, quick):
    import math
    if name == "density_1d":
        m = 80 if quick else 400
        return torch.linspace(0, 1, m, dtype=torch.float64)[:, None] * math.sqrt(2.0)
    if name == "density_2d":
        k = 10 if quick else 24
        t = torch.linspace(0, 1, k, dtype=torch.float64)
        return torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)   # max |x-y|^2 / 2 = 1
    if name == "digits_W2":
        yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        pts = torch.stack([yy.flatten(), xx.flatten()], 1).double()
        return pts * math.sqrt(2.0 / 98.0)   # the squared distance is scaled to max 1 (98)
    return None


def geomloss_solver():
    try:
        from geomloss import SamplesLoss
    except Exception as e:
        return f"missing: geomloss not importable ({type(e).__name__}: {e})"

    def solve(c, a, b, eps, pts):
        loss = SamplesLoss("sinkhorn", p=2, blur=eps ** 0.5, scaling=0.9, debias=False, potentials=True,
                           backend="tensorized")
        f, g = loss(a[None], pts[None], b[None], pts[None])
        return f[0], g[0]
    return solve


def pot_solver():
    try:
        import ot
    except Exception as e:
        return f"missing: POT not importable ({type(e).__name__}: {e})"

    def solve(c, a, b, eps):
        n, m = c.shape
        a = a if a is not None else torch.full((n,), 1 / n, dtype=c.dtype)
        b = b if b is not None else torch.full((m,), 1 / m, dtype=c.dtype)
        plan, log = ot.sinkhorn(a.numpy(), b.numpy(), c.numpy(), eps, method="sinkhorn_log",
                                numItermax=MAX_ITER, stopThr=TOL, log=True)
        return int(log.get("niter", -1)) + 1, bool(log["err"][-1] < TOL) if log.get("err") else None
    return solve


def pot_exact_solver():
    """POT's exact network-simplex solver (``ot.emd2``): the unregularized OT cost."""
    try:
        import ot
    except Exception as e:
        return f"missing: POT not importable ({type(e).__name__}: {e})"

    def solve(c, a, b):
        n, m = c.shape
        a = a if a is not None else torch.full((n,), 1 / n, dtype=c.dtype)
        b = b if b is not None else torch.full((m,), 1 / m, dtype=c.dtype)
        return float(ot.emd2(a.numpy(), b.numpy(), c.numpy(), numItermax=10_000_000))
    return solve


# (batch, n, m, dtype, eps, tol) of the device benchmark
DEVICE_PROBLEMS = [(16, 1024, 1024, torch.float32, 0.05, 1e-5), (1, 4096, 4096, torch.float32, 0.05, 1e-5),
                   (1, 4096, 4096, torch.float32, 0.01, 1e-5), (4, 2048, 2048, torch.float64, 0.01, 1e-8),
                   (4, 2048, 2048, torch.float64, 0.002, 1e-8)]
DEVICE_QUICK = [(2, 64, 48, torch.float32, 0.1, 1e-5), (1, 40, 70, torch.float64, 0.05, 1e-8)]


def device_main(args, device):
    """Sinkhorn on `device`: fastloss's solver (Sinkhorn and SNS) vs the torch-operation
    iteration vs POT."""
    from fastloss.ops.sinkhorn import _SinkhornCost
    name = f"sinkhorn_{device}" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    bw = harness.measure_bandwidth(device)
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=[
        "time to row-marginal error < tol (POT: its column error, same threshold); random costs "
        "in [0, 1], uniform marginals; floor: iterations x 2 reads of the cost at the measured "
        "bandwidth"])
    res.title = f"fastloss sinkhorn on {device}: CUDA solver vs torch operations vs POT"
    cols = [("case", lambda r: r["label"]), ("variant", lambda r: r["variant"]),
            ("median ms", lambda r: harness._f(r.get("median_ms"), ".2f")),
            ("iterations", lambda r: str(r.get("iterations", "-"))),
            ("of floor", lambda r: harness._f(r.get("fraction_of_floor"), ".2f")),
            ("vs torch ops", lambda r: harness._f(r.get("speedup_vs", {}).get("torch_ops_sinkhorn"), ".1f", "x")),
            ("status", lambda r: r["status"] if r["status"] == "ok" else r.get("reason", "")[:60])]
    print(f"# {name}: {res.env['device_name']}, torch {res.env['torch']}, commit {res.env['git_commit']}")
    print(" | ".join(c for c, _ in cols), flush=True)
    try:
        import ot
    except Exception as e:
        ot = f"missing: POT not importable ({type(e).__name__}: {e})"
    for bsz, n, m, dtype, eps, tol in (DEVICE_QUICK if args.quick else DEVICE_PROBLEMS):
        gen = torch.Generator(device=device).manual_seed(n + m)
        c = torch.rand(bsz, n, m, generator=gen, device=device, dtype=dtype)
        a = torch.full((bsz, n), 1 / n, device=device, dtype=dtype)
        b = torch.full((bsz, m), 1 / m, device=device, dtype=dtype)
        label = f"{bsz}x{n}x{m} {str(dtype)[6:]} eps={eps}"
        base = dict(op="sinkhorn", group=label, label=label, shape=[bsz, n, m], dtype=dtype, eps=eps, tol=tol)
        ours = fastloss.ops.sinkhorn(c, a, b, eps=eps, tol=tol, max_iter=MAX_ITER, warn=False)
        iters = int(ours.n_iter.max())

        def torch_ops():
            return _SinkhornCost.apply(c, a, b, eps, MAX_ITER, tol, None)

        def pot(log=False):
            return [ot.sinkhorn(a[k], b[k], c[k], eps, method="sinkhorn_log", numItermax=MAX_ITER,
                                stopThr=tol, log=log) for k in range(bsz)]

        def sns():
            return fastloss.ops.sinkhorn(c, a, b, eps=eps, method="sns", tol=tol, max_iter=MAX_ITER, warn=False)

        runs = {"fastloss_sinkhorn": lambda: fastloss.ops.sinkhorn(c, a, b, eps=eps, tol=tol, max_iter=MAX_ITER,
                                                                   warn=False),
                "fastloss_sns": sns,
                "torch_ops_sinkhorn": torch_ops, "pot_sinkhorn_log": pot if not isinstance(ot, str) else ot}
        floor = {"cost_twice_per_iteration": 2 * c.numel() * c.element_size() * iters}
        for variant, fn in runs.items():
            if isinstance(fn, str):
                harness.skipped_row(res, fn, dict(base, variant=variant), cols)
                continue
            extra = dict(iterations=iters, converged=bool(ours.converged.all()))
            if variant == "torch_ops_sinkhorn":  # checks every 10 iterations
                extra["iterations"] = int(torch_ops()[4].max())
            if variant == "fastloss_sns":  # stops on rows + columns
                first = sns()
                extra = dict(iterations=int(first.n_iter.max()), converged=bool(first.converged.all()))
            if variant == "pot_sinkhorn_log":
                extra = dict(iterations=max(int(log.get("niter", -1)) + 1 for _, log in pot(log=True)))
            harness.measure_row(res, lambda _i, fn=fn: fn(), device, dict(base, variant=variant, **extra), cols,
                                dict(warmup=1, target_s=0.5, min_repeats=3, max_repeats=10, max_measure_s=20.0,
                                     memory=False),
                                derived=(lambda _t: {"floor_bytes": floor}) if variant == "fastloss_sinkhorn" else None)
    harness.finish_run(res, cols, baseline="torch_ops_sinkhorn", t_start=t_start)
    return 0


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    if args.device != "cpu":
        return device_main(args, args.device)
    name = "sinkhorn_cpu" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    res = harness.Results(name, "cpu", args.out, notes=[
        f"time to marginal error < {TOL} (our Sinkhorn: rows; SNS: rows + columns; POT: its own "
        f"column error), at most {MAX_ITER} iterations; median of 3 runs",
        "costs scaled to max 1; eps relative to that scale; float64; SNS sparsity 0.1, 10 warm-up iterations (the default)"])
    res.title = "fastloss sinkhorn: SNS vs Sinkhorn vs POT"
    cols = [("case", lambda r: r["label"]), ("variant", lambda r: r["variant"]),
            ("median ms", lambda r: harness._f(r.get("median_ms"), ".1f")),
            ("iterations", lambda r: str(r.get("iterations", "-"))),
            ("converged", lambda r: str(r.get("converged", "-"))
             + (f" (error {r['marginal_error']:.1e})" if "marginal_error" in r else "")),
            ("vs sinkhorn", lambda r: harness._f(r.get("speedup_vs", {}).get("fastloss_sinkhorn"), ".1f", "x")),
            ("<P,C> - exact", lambda r: harness._f(r.get("gap_to_exact"), ".2e")),
            ("status", lambda r: r["status"] if r["status"] == "ok" else r.get("reason", "")[:60])]
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch {res.env['torch']}, "
          f"commit {res.env['git_commit']}")
    print(" | ".join(c for c, _ in cols), flush=True)
    pot = pot_solver()
    exact = pot_exact_solver()
    geom = geomloss_solver()
    for pname, prob in problems(args.quick).items():
        exact_cost = None
        if not isinstance(prob, str):
            # the exact LP cost (POT's network simplex): the entropic solutions' <P, C> tends to it
            # as eps shrinks; its time is that of an exact solve of the same problem
            base = dict(op="sinkhorn", group=f"{pname}|exact", label=f"{pname} exact (unregularized)",
                        dtype=torch.float64, eps=0.0, shape=list(prob[0].shape))
            if isinstance(exact, str):
                harness.skipped_row(res, exact, dict(base, variant="pot_emd"), cols)
            else:
                c, a, b = prob
                exact_cost = exact(c, a, b)
                timing = harness.measure(lambda _i: exact(c, a, b), [None], "cpu", warmup=1, target_s=0.1,
                                         min_repeats=3, max_repeats=3, max_measure_s=60.0, memory=False)
                row = res.add(variant="pot_emd", timing=timing, iterations="-", converged=True,
                              exact_cost=exact_cost, **base)
                print(" | ".join(get(row) for _, get in cols), flush=True)
        for eps in EPS:
            group, label = f"{pname}|eps{eps}", f"{pname} eps={eps}"
            base = dict(op="sinkhorn", group=group, label=label, dtype=torch.float64, eps=eps)
            if isinstance(prob, str):
                print(" | ".join(get(res.add(variant="all", shape=[], status="missing", reason=prob, **base))
                                 for _, get in cols))
                continue
            c, a, b = prob
            base["shape"] = list(c.shape)
            runs = {"fastloss_sinkhorn": lambda: fastloss.ops.sinkhorn(c, a, b, eps=eps, tol=TOL, max_iter=MAX_ITER, warn=False),
                    "fastloss_sns": lambda: fastloss.ops.sinkhorn(c, a, b, eps=eps, method="sns", tol=TOL,
                                                                  max_iter=MAX_ITER, sparsity=0.1, warn=False),
                    "pot_sinkhorn_log": (lambda: pot(c, a, b, eps)) if callable(pot) else pot}
            pts = _points(pname, args.quick)
            if pts is not None:
                runs["geomloss_eps_scaling"] = (lambda: geom(c, a, b, eps, pts)) if callable(geom) else geom
            for variant, fn in runs.items():
                if isinstance(fn, str):
                    harness.skipped_row(res, fn, dict(base, variant=variant), cols)
                    continue
                out = fn()
                extra = {}
                if variant.startswith("fastloss"):
                    iters, conv = int(out.n_iter), bool(out.converged)
                    if exact_cost is not None:
                        extra = {"transport_cost": float(out.transport_cost),
                                 "gap_to_exact": float(out.transport_cost) - exact_cost}
                elif variant.startswith("geomloss"):
                    f, g = out
                    plan = a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - c) / eps)
                    err = float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum())
                    iters, conv, extra = "-", err < TOL, {"marginal_error": err}
                else:
                    iters, conv = out
                timing = harness.measure(lambda _i, fn=fn: fn(), [None], "cpu", warmup=1, target_s=0.1,
                                         min_repeats=3, max_repeats=3, max_measure_s=60.0, memory=False)
                row = res.add(variant=variant, timing=timing, iterations=iters, converged=conv, **extra, **base)
                print(" | ".join(get(row) for _, get in cols), flush=True)
                res.write_json(partial=True)
    harness.finish_run(res, cols, baseline="fastloss_sinkhorn", t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
