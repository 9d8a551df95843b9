"""Benchmark of the fused classification losses: forward + backward time and peak extra memory.

Each fastloss loss (``reduction="mean"``) is compared, on the same inputs and in the same run,
with
  * ``eager_reference``: ``fastloss.reference.<loss>(..., compute_dtype=None)``, the loss
    written with plain vectorized eager torch ops in the input dtype (what a user would write);
  * ``torch``: ``torch.nn.functional.cross_entropy`` where the loss is plain cross-entropy;
  * ``liger_kernel``: liger-kernel's cross-entropy (Triton, GPU only) when it can be imported.

``--kernels`` adds ``fastloss_kernels``: the forward and backward kernel ops alone (no
autograd, no reduction), replayed as CUDA graphs on a GPU: the kernels' own time.

One call = loss forward + ``torch.autograd.grad(loss, logits)`` (a fresh gradient; dropped outside the
timed region after each call). Floors, per call, with e = bytes per logit:
  * ``floor_bytes_kernels`` = 3*N*C*e: forward reads the logits once, backward reads them once
    more and writes the gradient once (what a two-kernel fwd/bwd must move);
  * ``floor_bytes_min`` = 2*N*C*e: the issue's "read once, write once".
Both are reported against the measured copy bandwidth (see bench/README.md).

Usage: python bench/bench_losses.py [--device cpu|cuda] [--quick] [--shapes NxC,...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastloss  # noqa: E402
import fastloss.reference as R  # noqa: E402

GiB = 2**30

# op configurations: (key, op, options label, fastloss call, eager reference call,
#                     torch call or None, liger kwargs or None)
CONFIGS = [
    ("cross_entropy", "cross_entropy", "",
     lambda x, t, **kw: fastloss.ops.cross_entropy(x, t, **kw),
     lambda x, t: R.cross_entropy(x, t, compute_dtype=None),
     lambda x, t: F.cross_entropy(x, t),
     {}),
    ("cross_entropy_ls_softcap", "cross_entropy", "label_smoothing=0.1, softcap=30",
     lambda x, t, **kw: fastloss.ops.cross_entropy(x, t, label_smoothing=0.1, softcap=30.0, **kw),
     lambda x, t: R.cross_entropy(x, t, label_smoothing=0.1, softcap=30.0, compute_dtype=None),
     None,  # F.cross_entropy has no softcap
     {"label_smoothing": 0.1, "softcap": 30.0}),
    ("comp_sum_loss", "comp_sum_loss", "tau=1.5",
     lambda x, t, **kw: fastloss.ops.comp_sum_loss(x, t, tau=1.5, **kw),
     lambda x, t: R.comp_sum_loss(x, t, tau=1.5, compute_dtype=None),
     None, None),
    ("ldr_loss", "ldr_loss", "lam=1, margin=1",
     lambda x, t, **kw: fastloss.ops.ldr_loss(x, t, lam=1.0, margin=1.0, **kw),
     lambda x, t: R.ldr_loss(x, t, lam=1.0, margin=1.0, compute_dtype=None),
     None, None),
    ("spherical_z_loss", "spherical_z_loss", "a=1, b=2",
     lambda x, t, **kw: fastloss.ops.spherical_z_loss(x, t, a=1.0, b=2.0, **kw),
     lambda x, t: R.spherical_z_loss(x, t, a=1.0, b=2.0, compute_dtype=None),
     None, None),
    ("stablemax_cross_entropy", "stablemax_cross_entropy", "",
     lambda x, t, **kw: fastloss.ops.stablemax_cross_entropy(x, t, **kw),
     lambda x, t: R.stablemax_cross_entropy(x, t, compute_dtype=None),
     None, None),
]

SHORT = {"cross_entropy": "CE", "cross_entropy_ls_softcap": "CE ls=.1 cap=30",
         "comp_sum_loss": "comp-sum 1.5", "ldr_loss": "LDR-KL", "spherical_z_loss": "sph. Z",
         "stablemax_cross_entropy": "StableMax CE"}

# config key -> (op base name, scalar arguments of its *_forward / *_backward ops), for the
# kernels-only variant
RAW_OPS = {
    "cross_entropy": ("cross_entropy", (-100, 0.0, 0.0, 0.0)),
    "cross_entropy_ls_softcap": ("cross_entropy", (-100, 0.1, 0.0, 30.0)),
    "comp_sum_loss": ("comp_sum", (-100, 1.5)),
    "ldr_loss": ("ldr", (-100, 1.0, 1.0, False, 2.0)),
    "spherical_z_loss": ("spherical_z", (-100, 1.0, 2.0, 1e-6)),
    "stablemax_cross_entropy": ("stablemax", (-100,)),
}


def kernels_only(key):
    """A loss's forward and backward kernel ops called directly: no autograd, no reduction
    (the mean's per-row gradient 1/N is passed in). What the kernels cost without the host."""
    name, scalars = RAW_OPS[key]
    fwd = getattr(torch.ops.fastloss, f"{name}_forward").default
    bwd = getattr(torch.ops.fastloss, f"{name}_backward").default

    def run(x, t):
        _, s0, s1 = fwd(x, t, None, *scalars)
        g = torch.full((x.shape[0],), 1.0 / max(x.shape[0], 1), device=x.device)
        return bwd(g, x, t, None, s0, s1, *scalars)
    return run


def capture_graphs(run, sets):
    """One CUDA graph per input set, so that replaying it times the GPU work alone (the launch
    gaps of a Python caller removed)."""
    graphs = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as CUDA graphs require
        for x, t in sets[:1]:
            run(x.detach(), t)
    torch.cuda.current_stream().wait_stream(side)
    for x, t in sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run(x.detach(), t)
        graphs.append(g)
    return graphs


SHAPES = [(256, 1000), (4096, 32000), (8192, 128256)]
QUICK_SHAPES = [(64, 1000), (512, 4096)]
DTYPES = [torch.float32, torch.bfloat16]

# Peak extra memory of one call in units of the logits' size, used to decide whether a
# variant fits before it has been measured at a smaller shape in this run (afterwards the
# measured peak, scaled by N*C, is used).
DEFAULT_MEM_FACTOR = {"fastloss": 1.5, "fastloss_inplace": 0.5, "fastloss_kernels": 1.5,
                      "fastloss_fused": 1.5, "fastloss_fused_inplace": 0.5, "torch": 3.0,
                      "liger_kernel": 1.0, "eager_reference": 10.0}
BUSY_RETRY = 0.15           # CPU: re-measure (once) a row during which other processes kept
                            # more than this fraction of the cores busy, when that is cheap
RETRY_BUDGET_S = 150.0      # at most this much time re-measuring per run; one row at most 30 s
# CPU: a few more warm-up calls and samples than the harness's defaults, because the first
# touches of fresh gradient memory (page faults, huge-page compaction) make early calls slow.
MEASURE_KW = {"cpu": dict(warmup=3, min_repeats=5), "cuda": {}}
MEM_MARGIN = 1.15           # safety factor on the scaled estimate
MEM_RESERVE = 1.5 * GiB     # left free for the rest of the process / OS


def liger_cross_entropy():
    """(callable factory, None) or (None, reason)."""
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as e:  # ImportError, or Triton failing to load
        return None, f"missing: liger_kernel not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, "unavailable: liger-kernel is Triton/GPU only and no GPU is visible"

    def make(**kw):
        try:
            mod = LigerCrossEntropyLoss(**kw)
        except Exception as e:  # e.g. an older version without softcap: an error row
            err = e

            def fail(x, t):
                raise RuntimeError(f"LigerCrossEntropyLoss({kw}) failed: {err!r}")
            return fail

        def call(x, t):
            out = mod(x, t)
            if not torch.is_tensor(out):  # CrossEntropyOutput / tuple in newer versions
                out = out.loss if hasattr(out, "loss") else out[0]
            return out
        return call
    return make, None


def dshort(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if fastloss.cuda_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    ap.add_argument("--out", default=os.path.join(harness.REPO_ROOT, "bench", "results"))
    ap.add_argument("--name", default=None,
                    help="result file stem (default losses_<device>[_quick])")
    ap.add_argument("--kernels", action="store_true",
                    help="also time the kernel ops alone, last in each group (fastloss_kernels: "
                         "no autograd, no reduction; replayed CUDA graphs on a GPU)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of: " + ", ".join(c[0] for c in CONFIGS))
    ap.add_argument("--shapes", default=None,
                    help="comma-separated NxC shapes instead of the default ones, e.g. 256x1000")
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not fastloss.cuda_available():
        ap.error("--device cuda: fastloss was built without CUDA or no GPU is visible")
    cuda = device == "cuda"
    name = args.name or f"losses_{device}" + ("_quick" if args.quick else "")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
        except ValueError:
            ap.error(f"--shapes: expected NxC[,NxC...], got {args.shapes!r}")
        if any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
            ap.error(f"--shapes: expected positive NxC pairs, got {args.shapes!r}")
    configs = CONFIGS
    if args.configs:
        wanted = args.configs.split(",")
        unknown = set(wanted) - {c[0] for c in CONFIGS}
        if unknown:
            ap.error(f"--configs: unknown {sorted(unknown)}")
        configs = [c for c in CONFIGS if c[0] in wanted]

    t_start = time.perf_counter()
    torch.manual_seed(0)
    bw = harness.measure_bandwidth(device)
    liger_make, liger_reason = liger_cross_entropy()
    notes = [
        "time = forward + torch.autograd.grad(loss, logits) of reduction='mean' (a fresh "
        "gradient each call); median of the samples",
        "floor_bytes_kernels = 3*N*C*elem (fwd reads logits, bwd reads logits + writes grad); "
        "floor_bytes_min = 2*N*C*elem (the issue's 'read once, write once'); bytes_moved, "
        "achieved_GBps and fraction_of_floor refer to floor_bytes_kernels",
        "fraction_of_floor = achieved GB/s / measured copy bandwidth (memory_bandwidth.best_GBps)",
        "peak_extra_mem_bytes includes the N*C gradient every variant must return; "
        + ("CUDA: max_memory_allocated - memory_allocated before the call"
           if cuda else "CPU: process peak RSS (VmHWM after clear_refs=5) - RSS before the "
                        "call, after malloc_trim; process-level and approximate"),
        "samples_from_warmup=true: a warm-up call slower than the harness's slow_call_s "
        "(60 s CPU, 10 s CUDA) is the only sample; otherwise >= 1 timed call follows the warm-up",
        f"liger_kernel: {liger_reason or 'available'}",
    ]
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=notes)
    res.title = (f"fastloss fused losses, forward + backward "
                 f"({'quick' if args.quick else 'default'} shapes)")
    res.env["peers"] = {"liger_kernel": liger_reason or "available"}
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch "
          f"{res.env['torch']}, fastloss cpu_isa={res.env['cpu_isa']}, commit "
          f"{res.env['git_commit']}")
    print(f"# memory bandwidth (copy): best {bw['best_GBps']:.1f} GB/s, median "
          f"{bw['median_GBps']:.1f} GB/s")
    print(f"# liger_kernel: {liger_reason or 'available'}")
    busy = res.env.get("cpu_busy_others_start")
    if busy is not None:
        print(f"# other processes kept {100 * busy:.0f}% of the {os.cpu_count()} cores busy "
              f"just before the run")
        if not cuda and busy > 0.2:
            print("# WARNING: other processes compete for the cores: CPU timings are inflated")
    if liger_reason:
        res.add(op="cross_entropy", variant="liger_kernel", shape=[], dtype="-",
                group="peers", status="missing" if liger_reason.startswith("missing")
                else "unavailable", reason=liger_reason, label="liger_kernel")

    retry_budget = [RETRY_BUDGET_S]  # seconds of re-measurement left for this run
    # measured peak bytes per logit element, per (config, variant, dtype), for the memory check
    mem_per_elem: dict = {}

    def est_bytes(key, variant, dtype, numel):
        m = mem_per_elem.get((key, variant, dtype))
        if m is not None:
            return m * numel * MEM_MARGIN
        esize = torch.empty((), dtype=dtype).element_size()
        return DEFAULT_MEM_FACTOR[variant] * numel * esize * MEM_MARGIN

    for (n, c) in shapes:
        for dtype in DTYPES:
            esize = torch.empty((), dtype=dtype).element_size()
            numel = n * c
            logit_bytes = numel * esize
            floors = {"kernels": 3 * logit_bytes, "min": 2 * logit_bytes}
            n_sets = harness.num_input_sets(logit_bytes, device)
            avail = harness.available_memory_bytes(device)
            need_inputs = n_sets * logit_bytes
            common = dict(shape=[n, c], dtype=dtype)
            if avail is not None and need_inputs + MEM_RESERVE > avail:
                for key, op, opts, *_ in configs:
                    print_row(res.add(
                        op=op, variant="all", group=f"{key}|{n}x{c}|{dshort(dtype)}",
                        label=f"{SHORT[key]} {n}x{c} {dshort(dtype)}", status="skipped",
                        reason=f"skipped: inputs need {need_inputs / 1e9:.1f} GB, "
                               f"{avail / 1e9:.1f} GB available", options=opts, **common))
                continue

            gen = torch.Generator(device=device).manual_seed(n * 7 + c)
            sets = []
            for _ in range(n_sets):
                x = torch.randn(n, c, device=device, dtype=torch.float32, generator=gen)
                x = x.to(dtype).requires_grad_(True)
                t = torch.randint(0, c, (n,), device=device, generator=gen)
                sets.append((x, t))

            def drop_grad(inp):
                inp[0].grad = None

            def refill(sets_):
                with torch.no_grad():
                    for x_, _t in sets_:
                        x_.copy_(torch.randn(x_.shape, device=device, generator=gen))

            for key, op, opts, fl_fn, ref_fn, torch_fn, liger_kw in configs:
                group = f"{key}|{n}x{c}|{dshort(dtype)}"
                label = f"{SHORT[key]} {n}x{c} {dshort(dtype)}"
                variants = [("fastloss", fl_fn),
                            # opt-in: the gradient overwrites the logits (no [N, C] allocation).
                            # After its first call the inputs hold gradients; the kernels' work
                            # does not depend on the values, and the sets are refilled after.
                            ("fastloss_inplace",
                             lambda x, t, fl_fn=fl_fn: fl_fn(x, t, inplace_backward=True)),
                            # opt-in: the gradient made with the forward (one pass over the logits)
                            ("fastloss_fused",
                             lambda x, t, fl_fn=fl_fn: fl_fn(x, t, grad_in_forward=True)),
                            # both: the forward writes the gradient over the logits (one read,
                            # one write, no allocation); refilled after, as fastloss_inplace
                            ("fastloss_fused_inplace",
                             lambda x, t, fl_fn=fl_fn: fl_fn(x, t, grad_in_forward=True,
                                                             inplace_backward=True))]
                if torch_fn is not None:
                    variants.append(("torch", torch_fn))
                variants.append(("eager_reference", ref_fn))
                if liger_make is not None and liger_kw is not None:
                    variants.append(("liger_kernel", liger_make(**liger_kw)))
                if args.kernels:
                    variants.append(("fastloss_kernels", kernels_only(key)))
                for variant, fn in variants:
                    base = dict(op=op, variant=variant, group=group, options=opts, label=label,
                                floor_bytes=floors, input_sets=n_sets, **common)
                    gc.collect()
                    need = est_bytes(key, variant, dtype, numel)
                    avail = harness.available_memory_bytes(device)
                    if avail is not None and need + MEM_RESERVE > avail:
                        row = res.add(status="skipped",
                                      reason=f"skipped: needs {need / 1e9:.1f} GB, "
                                             f"{avail / 1e9:.1f} GB available", **base)
                        print_row(row)
                        res.write_json(partial=True)
                        continue

                    def call(inp, fn=fn):
                        # autograd.grad, not backward(): the logits here are a leaf, and
                        # AccumulateGrad would copy an in-place gradient (the leaf itself)
                        # into .grad; in a model the logits come from a matmul and no copy
                        # is made. For the other variants both are the same work.
                        loss = fn(inp[0], inp[1])
                        (grad,) = torch.autograd.grad(loss, inp[0])
                        del grad
                        return loss.detach()

                    inputs, extra = sets, dict(after=drop_grad)
                    if variant == "fastloss_kernels":
                        call = lambda inp, fn=fn: fn(inp[0].detach(), inp[1])  # noqa: E731
                        extra = {}
                    graphs = None
                    try:
                        if variant == "fastloss_kernels" and cuda:
                            # replays time the GPU alone; their memory was taken at capture
                            graphs = capture_graphs(fn, sets)
                            inputs, call = graphs, (lambda g: g.replay())
                            extra = dict(memory=False)
                        timing = harness.measure(call, inputs, device, **extra,
                                                 **MEASURE_KW[device])
                        busy = timing.get("cpu_busy_others")
                        spent = timing["median_ms"] * (timing["samples"] + timing["warmup_calls"])
                        if (not cuda and busy is not None and busy > BUSY_RETRY
                                and spent < min(30e3, 1e3 * retry_budget[0])):
                            # another process competed for the cores: measure again once
                            harness.wait_for_quiet(BUSY_RETRY / 2, 30.0)
                            t_retry = time.perf_counter()
                            again = harness.measure(call, inputs, device, **extra,
                                                    **MEASURE_KW[device])
                            retry_budget[0] -= time.perf_counter() - t_retry
                            if (again.get("cpu_busy_others") or 0) < busy:
                                timing = again
                            timing["remeasured_because_busy"] = busy
                    except Exception as e:  # report, do not lose the run
                        for x_, _t in sets:
                            x_.grad = None
                        row = res.add(status="error", reason=f"error: {type(e).__name__}: {e}",
                                      **base)
                        print_row(row)
                        res.write_json(partial=True)
                        continue
                    finally:
                        del graphs  # frees their memory pools before the next variant
                        if variant in ("liger_kernel", "fastloss_inplace", "fastloss_fused_inplace"):
                            refill(sets)  # these write the gradient into the logits in place
                    if timing.get("peak_extra_mem_bytes"):
                        mem_per_elem[(key, variant, dtype)] = timing["peak_extra_mem_bytes"] / numel
                    row = res.add(timing=timing, **base)
                    print_row(row)
                    res.write_json(partial=True)
            del sets, x, t
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    harness.finish_run(res, columns(), t_start=t_start)
    return 0


def columns():
    cols = harness.default_columns()
    out = []
    for title, get in cols:
        if title == "status":
            out.append(("busy", lambda r: "-" if r.get("cpu_busy_others") is None
                        else f"{100 * r['cpu_busy_others']:.0f}%"))
        if title == "GB/s":
            title = "GB/s(3NC)"
        if title == "floor%":
            title = "%floor 3NC"
            out.append((title, get))
            out.append(("%floor 2NC", lambda r: harness._f(
                r.get("fraction_of_floor_min") and 100 * r["fraction_of_floor_min"], ".0f")))
            continue
        if title == "vs torch":
            out.append((title, get))
            out.append(("vs liger", lambda r: harness._f(
                r.get("speedup_vs", {}).get("liger_kernel"), ".2f", "x")))
            continue
        out.append((title, get))
    return out


_printed_header = False


def print_row(row):
    """Progress: one line per measured row as it arrives."""
    global _printed_header
    cols = columns()
    if not _printed_header:
        print(" | ".join(t for t, _ in cols), flush=True)
        _printed_header = True
    print(" | ".join(get(row) for _, get in cols), flush=True)


if __name__ == "__main__":
    sys.exit(main())
