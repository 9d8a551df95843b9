"""Benchmark of the fused linear + cross-entropy: forward + backward time and peak extra memory.

One call = ``loss = f(hidden [N, D], weight [V, D], target [N])`` (reduction mean) and
``torch.autograd.grad(loss, (hidden, weight))``. Variants, same inputs, same run:
  * ``fastloss``: ``fastloss.ops.linear_cross_entropy`` (blocks of tokens, see its module);
  * ``fastloss_low_memory``: the same with ``low_memory=True`` (tiles of the vocabulary);
  * ``fastloss_low_memory_filter``: low_memory with ``filter_eps="auto"`` (Cut Cross-Entropy's
    gradient filtering): these random inputs' softmax is flat, so it shows the filter's cost
    (a tile read per test) more than its gain, which needs peaked rows;
  * ``fastloss_low_memory_fused_stats`` (CUDA): low_memory with the forward's statistics from
    the tensor-core kernel (FASTLOSS_LINEAR_CE_STATS=fused) instead of cuBLAS tiles + one
    kernel pass each: both in one run;
  * ``eager``: ``F.cross_entropy(F.linear(hidden, weight), target)``, the baseline;
  * ``torch_lce``: ``F.linear_cross_entropy`` (torch's reference path);
  * ``torch_chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``;
  * ``torch_compile``: ``torch.compile`` of the eager form (first call compiles: warm-up);
  * ``liger_kernel`` (LigerFusedLinearCrossEntropyLoss) and ``cut_cross_entropy``
    (``cut_cross_entropy.linear_cross_entropy``) where they import and a GPU is present.

Floor: ``6 N D V`` flops (the logits GEMM and the two gradient GEMMs) at the rate of torch's
own square GEMM measured in the same run (``matmul_peak``); the logits themselves need not
touch memory at all. Peak extra memory includes the gradients every variant returns
(``(N + V) * D`` elements).

Usage: python bench/bench_linear_losses.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastloss  # noqa: E402

# (N, D, V, dtype). CPU: the GPU shapes (N >= 8192, D >= 2048) take minutes per GEMM
# on 2 cores, so the CPU run uses the issue's own 2-core measurement shape (4096 x 256 x
# 131072) and two smaller ones.
SHAPES = {
    "cpu": [(1024, 256, 32000, torch.float32), (1024, 256, 32000, torch.bfloat16),
            (2048, 1024, 32000, torch.float32), (4096, 256, 131072, torch.float32)],
    "cuda": [(8192, 4096, 32000, torch.bfloat16), (8192, 4096, 128256, torch.bfloat16),
             (16384, 2048, 262144, torch.bfloat16), (32768, 4096, 128256, torch.bfloat16)],
}
QUICK = [(256, 64, 4096, torch.float32), (256, 64, 4096, torch.bfloat16)]
MEASURE_KW = {
    "cpu": dict(warmup=1, target_s=0.6, min_repeats=2, max_repeats=10, max_measure_s=40.0,
                slow_call_s=45.0),
    "cuda": dict(warmup=2, target_s=0.3, min_repeats=5, max_repeats=100, max_measure_s=5.0),
}
COLORS = {"fastloss_low_memory": "#17becf", "fastloss_low_memory_filter": "#bcbd22", "fastloss_low_memory_fused_stats": "#9edae5", "eager": "#7f7f7f", "torch_lce": "#ff7f0e", "torch_chunked": "#d62728",
          "torch_compile": "#9467bd", "cut_cross_entropy": "#8c564b"}


def peers(cuda: bool):
    """{variant: callable or reason string} for the peer libraries."""
    out = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        mod = LigerFusedLinearCrossEntropyLoss()
        out["liger_kernel"] = (lambda h, w, t: mod(w, h, t)) if cuda else \
            "unavailable: liger-kernel is Triton/GPU only"
    except Exception as e:  # ImportError, or Triton failing to load
        out["liger_kernel"] = f"missing: liger_kernel not importable ({type(e).__name__}: {e})"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        out["cut_cross_entropy"] = (lambda h, w, t: cce(h, w, t)) if cuda else \
            "unavailable: cut-cross-entropy is Triton/GPU only"
    except Exception as e:
        out["cut_cross_entropy"] = f"missing: cut_cross_entropy not importable ({type(e).__name__}: {e})"
    return out


def eager(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def low_memory_fused_stats(h, w, t):
    """low_memory=True with the statistics from the tensor-core kernel (FASTLOSS_LINEAR_CE_STATS,
    read per call by the op; the forward computes them)."""
    os.environ["FASTLOSS_LINEAR_CE_STATS"] = "fused"
    try:
        return fastloss.ops.linear_cross_entropy(h, w, t, low_memory=True)
    finally:
        del os.environ["FASTLOSS_LINEAR_CE_STATS"]


def variants(cuda: bool):
    chunked = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    out = {
        "fastloss": lambda h, w, t: fastloss.ops.linear_cross_entropy(h, w, t),
        "fastloss_low_memory": lambda h, w, t: fastloss.ops.linear_cross_entropy(h, w, t, low_memory=True),
        "fastloss_low_memory_filter": lambda h, w, t: fastloss.ops.linear_cross_entropy(
            h, w, t, low_memory=True, filter_eps="auto"),
        "fastloss_low_memory_fused_stats": low_memory_fused_stats if cuda
        else "unavailable: the tensor-core statistics kernel is CUDA only",
        "eager": eager,
        "torch_lce": (lambda h, w, t: F.linear_cross_entropy(h, w, t))
        if hasattr(F, "linear_cross_entropy") else "missing: torch has no F.linear_cross_entropy",
        "torch_chunked": (lambda h, w, t: F.linear_cross_entropy(h, w, t, options=chunked))
        if chunked is not None else "missing: torch has no LinearCrossEntropyOptions",
        "torch_compile": torch.compile(eager),
    }
    out.update(peers(cuda))
    return out


def columns():
    f = harness._f
    return [
        ("shape NxDxV", lambda r: "x".join(map(str, r["shape"]))),
        ("dtype", lambda r: r["dtype"]),
        ("variant", lambda r: r["variant"]),
        ("median ms", lambda r: f(r.get("median_ms"), ".1f")),
        ("n", lambda r: str(r.get("samples", "-"))),
        ("TFLOP/s", lambda r: f(r.get("achieved_TFLOPs"), ".3f")),
        ("%flop floor", lambda r: f(r.get("fraction_of_flop_floor") and 100 * r["fraction_of_flop_floor"], ".0f")),
        ("peak mem", lambda r: harness.fmt_bytes(r.get("peak_extra_mem_bytes"))),
        ("vs eager", lambda r: f(r.get("speedup_vs", {}).get("eager"), ".2f", "x")),
        ("vs chunked", lambda r: f(r.get("speedup_vs", {}).get("torch_chunked"), ".2f", "x")),
        ("mem / chunked's", lambda r: f(1 / r["mem_ratio_vs"]["torch_chunked"] if r.get(
            "mem_ratio_vs", {}).get("torch_chunked") else None, ".2f", "x")),
        ("status", lambda r: r["status"] if r["status"] == "ok" else r.get("reason", "")[:60]),
    ]


def main(argv=None):
    ap = harness.base_parser(__doc__)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    device, cuda = args.device, args.device == "cuda"
    name = args.name or f"linear_losses_{device}" + ("_quick" if args.quick else "")
    shapes = QUICK if args.quick else SHAPES[device]

    t_start = time.perf_counter()
    peaks = {dt: harness.measure_matmul_peak(device, dt)
             for dt in sorted({s[3] for s in shapes}, key=str)}
    notes = [
        "time = loss (reduction='mean') + torch.autograd.grad(loss, (hidden, weight)); median",
        "floor_flops = 6*N*D*V (three GEMMs); fraction_of_flop_floor = achieved / matmul_peak "
        "of the dtype (torch.mm of square operands, same run)",
        "peak_extra_mem_bytes includes the (N + V) * D gradients; "
        + ("CUDA: max_memory_allocated - memory_allocated before the call" if cuda else
           "CPU: process peak RSS (VmHWM after clear_refs=5) - RSS before the call"),
        "torch_compile: its first (compiling) call is the warm-up, not a sample",
    ]
    res = harness.Results(name, device, args.out, notes=notes)
    res.env["matmul_peak"] = {str(k).replace("torch.", ""): v for k, v in peaks.items()}
    res.title = "fastloss linear_cross_entropy, forward + backward"
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch "
          f"{res.env['torch']}, commit {res.env['git_commit']}")
    for dt, p in peaks.items():
        print(f"# matmul peak {dt}: {1e3 * p['best_TFLOPs']:.0f} GFLOP/s")
    cols = columns()
    print(" | ".join(c for c, _ in cols), flush=True)

    fns = variants(cuda)
    for (n, d, v, dtype) in shapes:
        gen = torch.Generator(device=device).manual_seed(n + d + v)
        mk = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
        sets = [(mk(n, d).to(dtype).requires_grad_(True),
                 (mk(v, d) / d ** 0.5).to(dtype).requires_grad_(True),
                 torch.randint(0, v, (n,), device=device, generator=gen))]
        flops = 6.0 * n * d * v
        group = f"lce|{n}x{d}x{v}|{dtype}"
        label = f"{n}x{d}x{v} {str(dtype).replace('torch.', '')}"
        for variant, fn in fns.items():
            base = dict(op="linear_cross_entropy", variant=variant, group=group, label=label,
                        shape=[n, d, v], dtype=dtype, floor_flops=flops)
            if isinstance(fn, str):
                harness.skipped_row(res, fn, base, cols)
                continue

            def call(inp, fn=fn):
                loss = fn(*inp)
                torch.autograd.grad(loss, inp[:2])
                return loss.detach()
            gc.collect()
            try:
                timing = harness.measure(call, sets, device, **MEASURE_KW[device])
            except Exception as e:  # report, do not lose the run
                row = res.add(status="error", reason=f"error: {type(e).__name__}: {e}", **base)
            else:
                tflops = flops / (timing["median_ms"] / 1e3) / 1e12
                row = res.add(timing=timing, achieved_TFLOPs=tflops,
                              fraction_of_flop_floor=tflops / peaks[dtype]["best_TFLOPs"], **base)
            print(" | ".join(get(row) for _, get in cols), flush=True)
            res.write_json(partial=True)
        del sets
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    harness.finish_run(res, cols, baseline="eager", colors=COLORS, t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
