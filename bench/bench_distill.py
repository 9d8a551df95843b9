"""Benchmark of the logit-distillation loss: forward + backward time and peak extra memory.

Variants, same inputs, same run: ``fastloss`` (``fastloss.ops.kd_loss``), ``eager_reference``
(``fastloss.reference.distill.kd_loss`` in the input dtype: softmaxes and logs as one would
write them) and, for the forward KL, ``torch`` (``F.kl_div(F.log_softmax(s / T),
F.log_softmax(t / T), log_target=True, reduction="batchmean") * T^2``). One call = loss
(reduction mean) + ``torch.autograd.grad(loss, student)``. Floor: the forward reads both
logits, the backward reads them again and writes the gradient: 5 N C e bytes, against the
copy bandwidth measured in the same run.

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


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    device = args.device
    name = f"distill_{device}" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    bw = harness.measure_bandwidth(device)
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=[
        "time = kd_loss(student, teacher, T=2, kind) (reduction mean) + autograd.grad(loss, student); median",
        "floor bytes = 5*N*C*e (forward reads both logits; backward reads both and writes the gradient)",
        "CUDA tensors run the torch formula in fastloss too (no CUDA kernel yet)"])
    res.title = "fastloss kd_loss, forward + backward"
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
                            floor_bytes={"min": 5 * n * c * 4})
                harness.measure_row(res, call, device, base, cols, MEASURE_KW)
    harness.finish_run(res, cols, t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
