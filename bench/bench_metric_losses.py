"""Benchmark of the metric-driven losses: the self-adjusting Dice loss and AnyLoss.

Variants, same inputs, same run: ``fastloss`` (``fastloss.ops.dice_loss`` / ``anyloss``: the
CPU kernels of ``csrc/metric_losses``) and ``eager_reference`` (the same formula in eager
PyTorch, as one would write it from the papers: softmax or sigmoid, one-hot targets, the decayed
probability ``(1 - p)^alpha p`` and the Dice ratio per element; AnyLoss's sigmoid
amplification and four cell sums). One call = loss (reduction mean) + ``torch.autograd.grad(loss,
logits)``. Dice uses alpha = 0.1 (the paper tunes alpha in {0.1, 0.01, 0.001}), gamma = 1;
AnyLoss uses the F1 metric with L = 73 (the paper's).

Floors: the forward reads the logits (and the float32 targets of the sigmoid forms), the
backward reads them again and writes the gradient: 3 N C e bytes for the softmax form, and
N K (3 e + 8) for the sigmoid forms and AnyLoss, against the copy bandwidth measured in the
same run.

Usage: python bench/bench_metric_losses.py [--device cpu|cuda] [--quick] [--out DIR]
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

# (form, N, C): "softmax" = logits [N, C] with integer targets, "sigmoid" = [N, C] multi-label
# (C = 1: N binary examples), "anyloss" = scores [N, C] with binary targets
SHAPES = [("softmax", 16384, 100), ("softmax", 4096, 1000), ("softmax", 1024, 32000),
          ("sigmoid", 1 << 20, 1), ("sigmoid", 16384, 128), ("sigmoid", 4096, 1000),
          ("anyloss", 1 << 20, 1), ("anyloss", 16384, 128), ("anyloss", 4096, 1000)]
QUICK = [("softmax", 64, 100), ("sigmoid", 4096, 1), ("sigmoid", 64, 40), ("anyloss", 4096, 1),
         ("anyloss", 64, 40)]
ALPHA, GAMMA, L = 0.1, 1.0, 73.0
MEASURE_KW = dict(warmup=3, target_s=1.0, min_repeats=3, max_repeats=20, max_measure_s=20.0)


def dice_eager(x, y, alpha=ALPHA, gamma=GAMMA):
    """Self-adjusting Dice, per example summed over classes, as the paper writes it."""
    if y.shape == x.shape:
        p, t = torch.sigmoid(x), y
    else:
        p = torch.softmax(x, -1)
        t = F.one_hot(y, x.shape[-1]).to(p.dtype)
    pt = (1 - p) ** alpha * p
    terms = 1 - (2 * pt * t + gamma) / (pt + t + gamma)
    return (terms.sum(-1) if x.dim() == 2 else terms).mean()


def anyloss_eager(s, y, L=L):
    """AnyLoss's F1 over the amplified sigmoid probabilities, one confusion matrix per column."""
    a = torch.sigmoid(L * (torch.sigmoid(s) - 0.5))
    tp, fn_, fp = (y * a).sum(0), (y * (1 - a)).sum(0), ((1 - y) * a).sum(0)
    return (1 - 2 * tp / (2 * tp + fn_ + fp)).mean()


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    device = args.device
    name = f"metric_losses_{device}" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    bw = harness.measure_bandwidth(device)
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=[
        "time = loss (reduction mean) + autograd.grad(loss, logits); median",
        f"dice_loss: alpha {ALPHA}, gamma {GAMMA}; anyloss: metric f1, L {L}",
        "floor bytes: softmax 3*N*C*e; sigmoid and anyloss N*C*(3*e + 8) (float32 targets read twice)",
        "CUDA tensors run fastloss's CUDA kernels (csrc/metric_losses/metric_losses_cuda.cu)"])
    res.title = "fastloss metric-driven losses, forward + backward"
    cols = [("case", lambda r: r["label"])] + [c for c in harness.default_columns()
                                                if c[0] not in ("op", "shape", "dtype", "vs torch")]
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch "
          f"{res.env['torch']}, commit {res.env['git_commit']}, copy {bw['best_GBps']:.1f} GB/s")
    print(" | ".join(c for c, _ in cols), flush=True)
    for form, n, c in QUICK if args.quick else SHAPES:
        gen = torch.Generator(device=device).manual_seed(n + c)
        shape = (n,) if c == 1 else (n, c)
        x = (torch.randn(shape, device=device, generator=gen) * 2).requires_grad_(True)
        if form == "softmax":
            y = torch.randint(0, c, (n,), device=device, generator=gen)
        else:
            y = (torch.rand(shape, device=device, generator=gen) < 0.3).float()
        if form == "anyloss":
            op, floor = "anyloss[f1]", n * c * 20
            variants = {"fastloss": lambda: fastloss.ops.anyloss(x, y, "f1", L=L),
                        "eager_reference": lambda: anyloss_eager(x, y)}
        else:
            op, floor = f"dice_loss[{form}]", (3 * n * c * 4 if form == "softmax" else n * c * 20)
            variants = {"fastloss": lambda: fastloss.ops.dice_loss(x, y, ALPHA, GAMMA),
                        "eager_reference": lambda: dice_eager(x, y)}
        label = f"{op} {n}x{c}"
        for variant, fn in variants.items():
            def call(_inp, fn=fn):
                loss = fn()
                torch.autograd.grad(loss, x)
                return loss.detach()
            base = dict(op=op, variant=variant, group=f"{op}|{n}x{c}", label=label, shape=[n, c],
                        dtype=torch.float32, floor_bytes={"min": floor})
            harness.measure_row(res, call, device, base, cols, MEASURE_KW)
    harness.finish_run(res, cols, t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
