"""Benchmark of the logit-distillation losses: forward + backward time and peak extra memory.

Variants, same inputs, same run: ``fastloss`` (``fastloss.ops.kd_loss``), ``eager_reference``
(``fastloss.reference.distill.kd_loss`` in the input dtype: softmaxes and logs as one would
write them) and, for the forward KL, ``torch`` (``F.kl_div(F.log_softmax(s / T),
F.log_softmax(t / T), log_target=True, reduction="batchmean") * T^2``). One call = loss
(reduction mean) + ``torch.autograd.grad(loss, student)``. Floor: the forward reads both
logits, the backward reads them again and writes the gradient: 5 N C e bytes, against the
copy bandwidth measured in the same run.

The order-based losses, same run, each against an ``eager_reference`` written as its paper's
code does: ``topk_kl_loss`` (k = 1000, or 100 when C = 1000) against OSTQuant's form (``topk`` of
the teacher, ``F.kl_div(log_softmax(s).gather, softmax(t).gather, "batchmean")``), and
``pld_loss`` against the PLD paper's pipeline (sort the teacher with the target moved to the
front, suffix ``logcumsumexp`` of the gathered student logits, weights ``softmax(t / T)``). Floor: read both logits, write the gradient: 3 N C e bytes.

Usage: python bench/bench_distill.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastloss  # noqa: E402
from fastloss.reference import distill as R  # noqa: E402

SHAPES = [(4096, 1000), (1024, 32000), (256, 128256)]
QUICK = [(64, 1000)]
KINDS = ["forward_kl", "reverse_kl", "jsd"]
MEASURE_KW = dict(warmup=3, target_s=1.0, min_repeats=3, max_repeats=20, max_measure_s=20.0)


def topk_kl_eager(s, t, k):
    """OSTQuant's KL-Top as its training code writes it (T = 1)."""
    idx = t.topk(k, -1).indices
    return F.kl_div(F.log_softmax(s, -1).gather(1, idx), F.softmax(t, -1).gather(1, idx),
                    reduction="batchmean")


def pld_eager(s, t, y, T=1.0):
    """The PLD paper's pipeline: ascending teacher order with the target moved to the end, then
    a running log-sum-exp of the student logits in that order (the suffixes of the ranking)."""
    order = torch.sort(t.scatter(1, y[:, None], float("inf")), -1).indices
    w = torch.softmax(t / T, -1).gather(1, order)
    so = s.gather(1, order)
    return (w * (torch.logcumsumexp(so, -1) - so)).sum(-1).mean()


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    device = args.device
    name = f"distill_{device}" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    bw = harness.measure_bandwidth(device)
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=[
        "time = kd_loss(student, teacher, T=2, kind) (reduction mean) + autograd.grad(loss, student); median",
        "floor bytes = 3*N*C*e (read both logits once, write the gradient once) for every loss; "
        "before 2026-11-29 the kd rows used 5*N*C*e (a forward reading both logits and a backward "
        "reading them again), the design of the CUDA kernels",
        "CUDA: kd_loss, topk_kl_loss and pld_loss run fastloss's CUDA kernels "
        "(csrc/distill/kd_cuda.cu; pld sorts the teacher's order with torch first)"])
    res.title = "fastloss distillation losses, forward + backward"
    cols = [("case", lambda r: r["label"])] + [c for c in harness.default_columns()
                                                if c[0] not in ("op", "shape", "dtype", "vs torch")]
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch "
          f"{res.env['torch']}, commit {res.env['git_commit']}, copy {bw['best_GBps']:.1f} GB/s")
    print(" | ".join(c for c, _ in cols), flush=True)
    T = 2.0
    for (n, c) in QUICK if args.quick else SHAPES:
        gen = torch.Generator(device=device).manual_seed(n + c)
        s = (torch.randn(n, c, device=device, generator=gen) * 3).requires_grad_(True)
        t = torch.randn(n, c, device=device, generator=gen) * 3
        for kind in KINDS:
            variants = {"fastloss": lambda kind=kind: fastloss.ops.kd_loss(s, t, T, kind),
                        "eager_reference": lambda kind=kind: R.kd_loss(s, t, T, kind, compute_dtype=None)}
            if kind == "forward_kl":
                variants["torch"] = lambda: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                                                     log_target=True, reduction="batchmean") * T * T
            for variant, fn in variants.items():
                def call(_inp, fn=fn):
                    loss = fn()
                    torch.autograd.grad(loss, s)
                    return loss.detach()
                base = dict(op=f"kd_loss[{kind}]", variant=variant, group=f"{kind}|{n}x{c}",
                            label=f"{kind} {n}x{c}", shape=[n, c], dtype=torch.float32,
                            floor_bytes={"min": 3 * n * c * 4})
                harness.measure_row(res, call, device, base, cols, MEASURE_KW)
        y = torch.randint(0, c, (n,), device=device, generator=gen)
        k = 100 if c <= 1000 else 1000
        order_cases = {
            f"topk_kl[k={k}]": {"fastloss": lambda: fastloss.ops.topk_kl_loss(s, t, k),
                                "eager_reference": lambda: topk_kl_eager(s, t, k)},
            "pld": {"fastloss": lambda: fastloss.ops.pld_loss(s, t, y),
                    "eager_reference": lambda: pld_eager(s, t, y)},
        }
        for op, variants in order_cases.items():
            for variant, fn in variants.items():
                def call(_inp, fn=fn):
                    loss = fn()
                    torch.autograd.grad(loss, s)
                    return loss.detach()
                base = dict(op=op, variant=variant, group=f"{op}|{n}x{c}", label=f"{op} {n}x{c}",
                            shape=[n, c], dtype=torch.float32, floor_bytes={"min": 3 * n * c * 4})
                harness.measure_row(res, call, device, base, cols, MEASURE_KW)
    harness.finish_run(res, cols, t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
