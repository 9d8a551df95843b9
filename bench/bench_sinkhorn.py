"""Benchmark of entropic OT: Sinkhorn-Newton-Sparse vs Sinkhorn (and POT) to the same tolerance.

Problems (costs scaled to max 1, uniform or density marginals, float64, CPU):
  * ``assignment``: a random 200 x 200 cost matrix, uniform marginals;
  * ``digits_W1`` / ``digits_W2``: two scikit-learn 8 x 8 digit images as densities on the pixel
    grid, Euclidean / squared-Euclidean ground cost;
  * ``density_1d``: two Gaussian mixtures discretised on 400 points of [0, 1], squared cost.
For each problem and eps: iterations and time of ``fastloss.ops.sinkhorn`` with
``method="sinkhorn"`` and ``method="sns"`` (sparsity 0.1) until the marginal error is under
``tol`` (1e-8), and POT's ``ot.sinkhorn(method="sinkhorn_log")`` with the same stop threshold
where POT is installed (its error is measured on the columns, ours on the rows, or on both for
SNS); each row records the iterations taken and whether it converged within the cap.

Usage: python bench/bench_sinkhorn.py [--quick] [--out DIR]
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
    return out


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


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    if args.device != "cpu":  # (scripts/bench.sh passes --device to every family)
        print("# bench_sinkhorn: CPU only for now (torch operations, no CUDA kernels)")
        return 0
    name = "sinkhorn_cpu" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    res = harness.Results(name, "cpu", args.out, notes=[
        f"time to marginal error < {TOL} (our Sinkhorn: rows; SNS: rows + columns; POT: its own "
        f"column error), at most {MAX_ITER} iterations; median of 3 runs",
        "costs scaled to max 1; eps relative to that scale; float64; SNS sparsity 0.1, 20 warm-up iterations"])
    res.title = "fastloss sinkhorn: SNS vs Sinkhorn vs POT"
    cols = [("case", lambda r: r["label"]), ("variant", lambda r: r["variant"]),
            ("median ms", lambda r: harness._f(r.get("median_ms"), ".1f")),
            ("iterations", lambda r: str(r.get("iterations", "-"))),
            ("converged", lambda r: str(r.get("converged", "-"))),
            ("vs sinkhorn", lambda r: harness._f(r.get("speedup_vs", {}).get("fastloss_sinkhorn"), ".1f", "x")),
            ("status", lambda r: r["status"] if r["status"] == "ok" else r.get("reason", "")[:60])]
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch {res.env['torch']}, "
          f"commit {res.env['git_commit']}")
    print(" | ".join(c for c, _ in cols), flush=True)
    pot = pot_solver()
    for pname, prob in problems(args.quick).items():
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
            for variant, fn in runs.items():
                if isinstance(fn, str):
                    row = res.add(variant=variant, status=fn.split(":")[0], reason=fn, **base)
                    print(" | ".join(get(row) for _, get in cols), flush=True)
                    continue
                out = fn()
                iters, conv = ((int(out.n_iter), bool(out.converged)) if variant.startswith("fastloss") else out)
                timing = harness.measure(lambda _i, fn=fn: fn(), [None], "cpu", warmup=1, target_s=0.1,
                                         min_repeats=3, max_repeats=3, max_measure_s=60.0, memory=False)
                row = res.add(variant=variant, timing=timing, iterations=iters, converged=conv, **base)
                print(" | ".join(get(row) for _, get in cols), flush=True)
                res.write_json(partial=True)
    harness.finish_run(res, cols, baseline="fastloss_sinkhorn", t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
