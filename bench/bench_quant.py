"""Benchmark of the low-bit dequant GEMM: ``y = x @ W^T`` from 2-, 3-, 4- and 8-bit weights.

Variants, same inputs, same run, per (layer shape N x K, batch M):
  * ``fastloss_{2,3,4,8}bit``: ``fastloss.ops.dequant_gemm`` (group 128, symmetric uniform);
  * ``fastloss_nf4``: the same with the NF4 codebook (group 128, no zero points);
  * ``fastloss_8bit_cb``: an 8-bit codebook (``power_codebook(8, 1.7)``, group 128): its codes
    decode by a gather from the 256-entry table;
  * ``fastloss_4bit_warp_gemv`` (CUDA, batch <= 16): the 4-bit row again with the warp-per-row
    GEMV forced instead of the tensor-core GEMV (the environment variable costs ~1 us per call);
  * ``fastloss_4bit_ring2`` / ``fastloss_4bit_ring8`` (CUDA, batch <= 16): the 4-bit row again
    with the tensor-core GEMV's shared ring at 2 or 8 slots per warp instead of 4
    (FASTLOSS_QUANT_GEMV_RING; 2: one step in flight, about what the register double buffer
    before it kept);
  * ``fastloss_4bit_smem_gemm`` (CUDA, batch > 16): the 4-bit row again with the shared-memory
    tensor-core GEMM forced (FASTLOSS_QUANT_GEMM=smem) instead of the pipelined one (or, from
    512 rows, the 16-bit weight tiles + cuBLAS); ``fastloss_4bit_pipe_gemm`` (CUDA, batch >= 512):
    with the pipelined GEMM forced (FASTLOSS_QUANT_GEMM=pipe) instead of the tiles;
    ``fastloss_nf4_smem_gemm`` (CUDA, batch >= 64): NF4 with the shared-memory GEMM forced
    instead of the tiles (from 64 rows for the formats the pipelined GEMM does not read);
  * ``fastloss_4bit_avx512`` (CPU with AMX): the 4-bit row again on the AVX-512 path (GEMV,
    or dequantized tiles + torch's GEMM) instead of the AMX tile products (the AMX-INT8 GEMV at
    batch 1-16, the AMX-BF16 GEMM above);
  * ``fastloss_4bit_bf16`` and ``torch_matmul_bf16`` (CPU with AMX): bfloat16 activations,
    where the AMX path multiplies one bfloat16 term instead of three, against torch's bfloat16
    matmul (oneDNN on the tile unit);
  * ``torch_matmul``: ``x @ W.T`` with the float weight in the activation dtype (float32 on the
    CPU, float16 on CUDA: cuBLAS);
  * ``eager_dequant``: unpack the 4-bit weight with torch operations, then the matmul;
  * ``torch_int4pack``: torch's own ``aten._weight_int4pack_mm_for_cpu`` (CPU) or
    ``aten._weight_int4pack_mm`` (CUDA, bfloat16) (4-bit, group 128), where this torch has it;
  * ``torchao_int8wo``: torchao's ``Int8WeightOnlyConfig`` (8-bit, per output channel) on an
    ``nn.Linear`` in the activation dtype, and ``torchao_int4wo`` (CUDA): its
    ``Int4WeightOnlyConfig(group_size=128)`` in the tinygemm layout, bfloat16 activations
    (torchao 0.18 has no CPU int4 layout), where torchao imports and runs with this torch.
Floor (small batches are memory-bound): the packed weight, its scales and zeros, x and y, read
or written once, against the copy bandwidth measured in the same run.
Cold weights: each variant rotates through copies of its weight that together exceed 4x the
last-level cache (``harness.num_input_sets``), as a model's forward streams its layers; with
one copy, a float32 weight of up to 300 MB (the 2-vCPU Xeon's L3) stayed cached between calls
and the matmul read it at twice the memory bandwidth. torch int4pack and the torchao rows keep
one copy (their packing runs per copy; on the CPU they are 10-100x slower than the rest).

Usage: python bench/bench_quant.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastloss  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 28672)]   # (N out, K in), LLM layers
BATCHES = [1, 4, 16, 64, 256]
CUDA_BATCHES = BATCHES + [1024]  # 1024: the 16-bit weight tiles + cuBLAS against the pipelined kernel
LARGE_BATCHES = [1, 4, 16]   # 8192x28672 on the CPU: its float32 weight is 0.94 GB; large batches take minutes
QUICK_SHAPES, QUICK_BATCHES = [(512, 512)], [1, 32]
MEASURE_KW = dict(warmup=3, target_s=0.5, min_repeats=5, max_repeats=50, max_measure_s=10.0)


def eager_dequant(qw):
    """Unpack with torch operations (the 4-bit layout of fastloss.ops.quant), then scale."""
    n, k = qw.shape
    b = qw.qweight.to(torch.int32).view(n, k // qw.group, qw.group // 2)
    q = torch.cat([b & 15, b >> 4], dim=2).view(n, k).float()
    idx = torch.arange(k, device=b.device) // qw.group
    return (q - qw.zeros[:, idx]) * qw.scales[:, idx]


def int4pack(w, device, group=128):
    """torch's int4 kernel (CPU: float32 x; CUDA: bfloat16 x) on the same weights, or the reason
    it is unavailable."""
    try:
        n, k = w.shape
        wg = w.view(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.clamp(torch.round((wg - lo) / scale), 0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale   # torch's convention: w = (q - 8) * scale + zero
        sz = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1).contiguous()
        if device == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            fn = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)  # noqa: E731
        else:   # CUDA: codes two per byte (even index in the high nibble), bfloat16 scales
            qu8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(qu8, 8)
            szd = sz.to(device, torch.bfloat16)
            fn = lambda x: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), packed, group, szd)  # noqa: E731
        fn(torch.randn(1, k, device=device))
        return fn
    except Exception as e:  # an op this torch lacks, or a layout it rejects
        return f"unavailable: torch int4pack kernel failed ({type(e).__name__}: {str(e)[:80]})"


@functools.lru_cache(maxsize=1)
def torchao_import_error():
    """None when torchao imports in a child process, else why not. torchao ships compiled ops
    built for one torch; a mismatched one must cost its rows, not the whole run (a crash on
    import would take the process with it)."""
    try:
        done = subprocess.run([sys.executable, "-c", "import torchao.quantization"], capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}"
    if done.returncode != 0:
        return f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:60]}"
    return None


def torchao_linear(w, dtype, device, kind):
    """torchao's weight-only quantized nn.Linear of w: kind "int8wo" (x in dtype) or "int4wo"
    (CUDA, x in bfloat16) -> a function of x, or the reason it is unavailable."""
    if torchao_import_error():
        return f"unavailable: torchao not importable ({torchao_import_error()})"
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # not installed, or built for another torch
        return f"unavailable: torchao not importable ({type(e).__name__}: {str(e)[:60]})"
    if kind == "int4wo" and device == "cpu":
        return "unavailable: torchao 0.18 has no CPU int4 weight-only layout"
    try:
        act = torch.bfloat16 if kind == "int4wo" else dtype
        n, k = w.shape
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=act)
        with torch.no_grad():
            lin.weight.copy_(w)
        config = (Int8WeightOnlyConfig() if kind == "int8wo" else
                  Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        quantize_(lin, config)

        def fn(x):
            with torch.no_grad():
                return lin(x.to(act))
        fn(torch.randn(1, k, device=device))
        return fn
    except Exception as e:  # a layout or kernel this torch / device lacks
        return f"unavailable: torchao {kind} failed ({type(e).__name__}: {str(e)[:80]})"


def warp_gemv(x, qw):
    """dequant_gemm with the CUDA warp-per-row GEMV forced (FASTLOSS_QUANT_GEMV=warp, read per
    call by the op) where the tensor-core GEMV would run: both kernels in one run."""
    os.environ["FASTLOSS_QUANT_GEMV"] = "warp"
    try:
        return fastloss.ops.dequant_gemm(x, qw)
    finally:
        del os.environ["FASTLOSS_QUANT_GEMV"]


def with_ring(x, qw, ring):
    """dequant_gemm with the tensor-core GEMV's ring at `ring` slots per warp
    (FASTLOSS_QUANT_GEMV_RING, read per call by the op): several depths in one run."""
    os.environ["FASTLOSS_QUANT_GEMV_RING"] = str(ring)
    try:
        return fastloss.ops.dequant_gemm(x, qw)
    finally:
        del os.environ["FASTLOSS_QUANT_GEMV_RING"]


def forced_gemm(x, qw, kernel):
    """dequant_gemm with a CUDA tensor-core GEMM forced (FASTLOSS_QUANT_GEMM=smem or pipe, read
    per call by the op) where another path would run: both in one run."""
    os.environ["FASTLOSS_QUANT_GEMM"] = kernel
    try:
        return fastloss.ops.dequant_gemm(x, qw)
    finally:
        del os.environ["FASTLOSS_QUANT_GEMM"]


def weight_bytes(weight):
    """Bytes of a float weight, or of a QuantizedWeight's packed tensors (codes, scales, zeros,
    codebook)."""
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return sum(t.numel() * t.element_size() for t in weight.op_args[:4] if t is not None)


def weight_copies(weight, device):
    """Copies of a float weight or a QuantizedWeight that together exceed 4x the last-level
    cache (at least two): the rotation keeps every call's weight out of the cache."""
    n = harness.num_input_sets(weight_bytes(weight), device)
    if isinstance(weight, torch.Tensor):
        return [weight] + [weight.clone() for _ in range(n - 1)]
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    return [weight] + [dataclasses.replace(weight, qweight=clone(weight.qweight), scales=clone(weight.scales),
                                           zeros=clone(weight.zeros), codebook=clone(weight.codebook))
                       for _ in range(n - 1)]


def avx512_path(x, qw):
    """dequant_gemm on the AVX-512 kernels where the AMX tile products would run."""
    active = fastloss.cpu_isa()
    fastloss.set_cpu_isa("avx512")
    try:
        return fastloss.ops.dequant_gemm(x, qw)
    finally:
        fastloss.set_cpu_isa(active)


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.float16   # the activations
    name = f"quant_{device}" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    bw = harness.measure_bandwidth(device)
    res = harness.Results(name, device, args.out, bandwidth=bw, notes=[
        "time = y = f(x) for x [M, K], no autograd; median",
        f"floor bytes = packed weight + scales + zeros + x + y ({dtype} activations)",
        "fastloss_*: group 128, symmetric round-to-nearest (nf4: NF4 codebook, no zero points; "
        "8bit_cb: power_codebook(8, 1.7))"])
    res.title = f"fastloss dequant_gemm ({device})"
    cols = [("case", lambda r: r["label"])] + [c for c in harness.default_columns()
                                                if c[0] not in ("op", "shape", "dtype", "vs eager", "vs torch")]
    cols.append(("vs matmul", lambda r: harness._f(r.get("speedup_vs", {}).get("torch_matmul"), ".2f", "x")))
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch {res.env['torch']}, "
          f"commit {res.env['git_commit']}, copy {bw['best_GBps']:.1f} GB/s")
    print(" | ".join(c for c, _ in cols), flush=True)
    for (n, k) in QUICK_SHAPES if args.quick else SHAPES:
        gen = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        packed = {f"fastloss_{b}bit": fastloss.ops.quantize_weight(w, b, 128).to(device) for b in (2, 3, 4, 8)}
        packed["fastloss_nf4"] = fastloss.ops.quantize_weight(
            w, 4, 128, codebook=fastloss.ops.nf_codebook(4)).to(device)
        packed["fastloss_8bit_cb"] = fastloss.ops.quantize_weight(
            w, 8, 128, codebook=fastloss.ops.power_codebook(8, 1.7)).to(device)
        q4 = packed["fastloss_4bit"]
        w4 = fastloss.ops.dequantize_weight(q4).to(dtype)
        tp = int4pack(w, device)
        ao = {kind: torchao_linear(w, dtype, device, kind) for kind in ("int8wo", "int4wo")}
        large_on_cpu = n * k > 1e8 and device == "cpu"
        batches = QUICK_BATCHES if args.quick else (LARGE_BATCHES if large_on_cpu
                                                    else CUDA_BATCHES if device != "cpu" else BATCHES)
        for m in batches:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            # variant: (call on one weight copy, the weight whose copies rotate (None: one), its
            # packed form for the floor (None: the float weight))
            variants = {name: (lambda qw: fastloss.ops.dequant_gemm(x, qw), qw, qw) for name, qw in packed.items()}
            if device != "cpu" and m <= 16:  # the warp-per-row GEMV the tensor-core one replaced
                variants["fastloss_4bit_warp_gemv"] = (lambda qw: warp_gemv(x, qw), q4, q4)
                variants["fastloss_4bit_ring2"] = (lambda qw: with_ring(x, qw, 2), q4, q4)
                variants["fastloss_4bit_ring8"] = (lambda qw: with_ring(x, qw, 8), q4, q4)
            if device != "cpu" and m > 16:  # the shared-memory GEMM the pipelined one replaced
                variants["fastloss_4bit_smem_gemm"] = (lambda qw: forced_gemm(x, qw, "smem"), q4, q4)
            if device != "cpu" and m >= 64:  # NF4's shared-memory GEMM, which the tiles replace there
                nf4 = packed["fastloss_nf4"]
                variants["fastloss_nf4_smem_gemm"] = (lambda qw: forced_gemm(x, qw, "smem"), nf4, nf4)
            if device != "cpu" and m >= 512:  # the kernel the 16-bit tiles + cuBLAS replace there
                variants["fastloss_4bit_pipe_gemm"] = (lambda qw: forced_gemm(x, qw, "pipe"), q4, q4)
            if device == "cpu" and fastloss.cpu_isa() == "amx":
                variants["fastloss_4bit_avx512"] = (lambda qw: avx512_path(x, qw), q4, q4)
                xb = x.bfloat16()
                variants["fastloss_4bit_bf16"] = (lambda qw: fastloss.ops.dequant_gemm(xb, qw), q4, q4)
                variants["torch_matmul_bf16"] = (lambda wt: xb @ wt.T, w4.bfloat16(), None)
            variants.update({"torch_matmul": (lambda wt: x @ wt.T, w4, None),
                             "eager_dequant": (lambda qw: x @ eager_dequant(qw).to(x.dtype).T, q4, q4),
                             "torch_int4pack": ((lambda _: tp(x)) if callable(tp) else tp, None, q4)})
            for kind, qw in (("int8wo", packed["fastloss_8bit"]), ("int4wo", q4)):
                fn = ao[kind]
                variants[f"torchao_{kind}"] = ((lambda _, fn=fn: fn(x)) if callable(fn) else fn, None, qw)
            for variant, (fn, weight, qw) in variants.items():
                base = dict(op="dequant_gemm", variant=variant, group=f"{n}x{k}|M{m}",
                            label=f"{n}x{k} M={m}", shape=[m, n, k], dtype=dtype,
                            floor_bytes={"min": weight_bytes(weight if qw is None else qw)
                                             + x.element_size() * m * (n + k)})
                if isinstance(fn, str):
                    harness.skipped_row(res, fn, base, cols)
                    continue
                harness.measure_row(res, fn, device, base, cols, MEASURE_KW,
                                    inputs=None if weight is None else weight_copies(weight, device))
    harness.finish_run(res, cols, baseline="torch_matmul", t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
