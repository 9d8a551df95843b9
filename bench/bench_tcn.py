"""Benchmark of the depthwise dilated causal convolution: forward, and forward + backward.

Variants, same inputs, same run:
  * ``fastloss``: ``fastloss.ops.dilated_conv1d`` (the CPU kernels, or the CUDA kernels);
  * ``torch_conv1d``: ``F.conv1d(F.pad(x, (P, 0)), w[:, None], b, dilation=d, groups=C)``
    (oneDNN on the CPU, cuDNN on a GPU);
  * ``fft``: the same convolution through ``torch.fft.rfft`` / ``irfft`` with a dense kernel of
    the receptive field's length (the MEGA-style path TCNCA replaces);
  * ``pytorch_tcn``: pytorch-tcn's ``TemporalConv1d(C, C, K, dilation=d, groups=C)`` where it
    can be imported (``pip install pytorch-tcn``; scripts/bench.sh installs it).

At 4 x 256 x 65536 also one TCN level, ``x + gelu(conv(x) + b)``: ``fastloss``
(``fastloss.ops.tcn_level``, fused), ``fastloss_unfused`` (fastloss's convolution, torch's GELU
and add) and ``torch_conv1d`` (all torch).

One call = ``y = f(x, w, b)`` (``fwd``) or that and ``torch.autograd.grad(y, (x, w, b), g)``
(``fwd+bwd``). Floors (bytes that must move, e = bytes per element, n = B*C*L): forward reads
x and writes y (2 n e); backward reads grad_y and x and writes grad_x (3 n e); against the
copy bandwidth measured in the same run.

Usage: python bench/bench_tcn.py [--device cpu|cuda] [--quick] [--out DIR]
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

# (B, C, L, K, dilation). The CPU case is 4 x 256 x 65536.
SHAPES = {
    "cpu": [(4, 256, 1024, 4, 16), (4, 256, 8192, 8, 64), (4, 256, 65536, 4, 16),
            (4, 256, 65536, 8, 512), (2, 1024, 131072, 2, 1024)],
    "cuda": [(4, 256, 8192, 8, 64), (4, 1024, 131072, 4, 256), (2, 512, 1048576, 8, 4096)],
}
QUICK = [(2, 64, 4096, 4, 16)]
# CPU warm-up: up to 6 calls / 3 s, so that the first calls after a large allocation (where the
# kernel compacts memory for the transparent huge pages fastloss advises: 300-460 ms instead
# of 25-35 ms for a 268 MB output, measured here) are not what is timed; see README.
# Sub-millisecond calls get up to 200 samples: with 20, a few slow calls (page faults, timer
# ticks) moved the 4x256x1024 forward's median by 50% between runs.
MEASURE_KW = {"cpu": dict(warmup=6, target_s=3.0, min_repeats=3, max_repeats=200, max_measure_s=20.0),
              "cuda": dict(warmup=2, target_s=0.3, min_repeats=10, max_repeats=200, max_measure_s=5.0)}
COLORS = {"torch_conv1d": "#ff7f0e", "fft": "#9467bd", "pytorch_tcn": "#2ca02c",
          "fastloss_unfused": "#17becf"}


def conv1d(x, w, b, d):
    return F.conv1d(F.pad(x, (d * (w.shape[1] - 1), 0)), w.unsqueeze(1), b, dilation=d,
                    groups=x.shape[1])


def fft_conv(x, w, b, d):
    """Causal y = x * h with h[d (K-1) - k d] = w[k], by FFT of length >= L + d (K-1)."""
    c, k = w.shape
    span = d * (k - 1)
    length = x.shape[-1]
    h = torch.zeros(c, span + 1, dtype=w.dtype, device=w.device)
    h = h.index_copy(1, torch.arange(span, -1, -d, device=w.device), w)
    n = 1 << (length + span - 1).bit_length()
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :length]
    return y + b[:, None]


def pytorch_tcn():
    """pytorch-tcn's TemporalConv1d with groups = C (its causal padding, then torch's Conv1d),
    called with w and b as its parameters; or why it cannot run."""
    try:
        from pytorch_tcn import TemporalConv1d
    except Exception as e:
        return f"missing: pytorch_tcn not importable ({type(e).__name__}: {e})"
    modules = {}

    def run(x, w, b, d):
        c, k = w.shape
        key = (c, k, d, x.device)
        if key not in modules:
            modules[key] = TemporalConv1d(c, c, k, dilation=d, groups=c, causal=True).to(x.device)
        return torch.func.functional_call(modules[key], {"weight": w.unsqueeze(1), "bias": b}, (x,))
    return run


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    device = args.device
    name = f"tcn_{device}" + ("_quick" if args.quick else "")
    shapes = QUICK if args.quick else SHAPES[device]
    t_start = time.perf_counter()
    bw = harness.measure_bandwidth(device)
    notes = ["fwd: y = f(x, w, b); fwd+bwd: and torch.autograd.grad(y, (x, w, b), g); median",
             "floor bytes: fwd 2*n*e (read x, write y), fwd+bwd 5*n*e (+ read grad_y and x, "
             "write grad_x), n = B*C*L; fraction_of_floor against the run's copy bandwidth",
             "causal depthwise convolution, float32"]
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=notes)
    res.title = "fastloss dilated_conv1d (depthwise, causal)"
    conv_variants = {"fastloss": lambda x, w, b, d: fastloss.ops.dilated_conv1d(x, w, b, dilation=d),
                     "torch_conv1d": conv1d, "fft": fft_conv, "pytorch_tcn": pytorch_tcn()}
    # one TCN level, x + gelu(conv(x) + b): fused, the same from fastloss's convolution and
    # torch's GELU and add, and all torch
    level_variants = {
        "fastloss": lambda x, w, b, d: fastloss.ops.tcn_level(x, w, b, dilation=d),
        "fastloss_unfused": lambda x, w, b, d: x + F.gelu(fastloss.ops.dilated_conv1d(x, w, b, dilation=d)),
        "torch_conv1d": lambda x, w, b, d: x + F.gelu(conv1d(x, w, b, d))}
    cols = [("case", lambda r: r["label"])] + [c for c in harness.default_columns()
                                                if c[0] not in ("op", "shape", "dtype", "vs torch")]
    cols = [c if c[0] != "vs eager" else ("vs conv1d", lambda r: harness._f(
        r.get("speedup_vs", {}).get("torch_conv1d"), ".2f", "x")) for c in cols]
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch "
          f"{res.env['torch']}, commit {res.env['git_commit']}, copy {bw['best_GBps']:.1f} GB/s")
    print(" | ".join(c for c, _ in cols), flush=True)
    for (B, C, L, K, d) in shapes:
        gen = torch.Generator(device=device).manual_seed(B + C + L)
        x = torch.randn(B, C, L, device=device, generator=gen).requires_grad_(True)
        w = (torch.randn(C, K, device=device, generator=gen) / K ** 0.5).requires_grad_(True)
        b = torch.randn(C, device=device, generator=gen).requires_grad_(True)
        g = torch.randn(B, C, L, device=device, generator=gen)
        n_bytes = x.numel() * 4
        cases = [("dilated_conv1d", conv_variants, mode) for mode in ("fwd", "fwd+bwd")]
        if (B, C, L) == (4, 256, 65536):
            cases += [("tcn_level", level_variants, mode) for mode in ("fwd", "fwd+bwd")]
        for op, variants, mode in cases:
            group = f"{op}|{mode}|{B}x{C}x{L}|K{K}d{d}"
            label = f"{'level ' if op == 'tcn_level' else ''}{mode} {B}x{C}x{L} K={K} d={d}"
            floor = {"min": (2 if mode == "fwd" else 5) * n_bytes}
            for variant, fn in variants.items():
                base = dict(op=op, variant=variant, group=group, label=label,
                            shape=[B, C, L], dtype=torch.float32, kernel_size=K, dilation=d,
                            mode=mode, floor_bytes=floor)
                if isinstance(fn, str):
                    harness.skipped_row(res, fn, base, cols)
                    continue

                def call(_inp, fn=fn, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            return fn(x, w, b, d)
                    y = fn(x, w, b, d)
                    torch.autograd.grad(y, (x, w, b), g)
                    return None
                harness.measure_row(res, call, device, base, cols, MEASURE_KW[device])
    harness.finish_run(res, cols, baseline="torch_conv1d", colors=COLORS, t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
