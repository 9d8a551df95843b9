"""Where the time of a GPU call goes: for a few calls that the H200 run of 2026-11-29 found slow
or unexplained, torch's profiler over a few repetitions gives the device time of each kernel,
the number of kernel launches and the host time per call, so that the next change (without a
GPU) starts from a breakdown rather than a guess. bench/gpu_check.sh runs it (step "profile");
`python scripts/gpu_profile.py [name ...]` runs the cases named (default: all).

Not a benchmark: the profiler adds host time to every launch, so the host figures are upper
bounds; the device times of long kernels are accurate.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastloss
from fastloss import ops

# FASTLOSS_PROFILE_DEVICE=cpu runs the same cases on the CPU (a dry run of the script itself)
dev = os.environ.get("FASTLOSS_PROFILE_DEVICE", "cuda")
assert dev == "cpu" or (fastloss.cuda_available() and torch.cuda.is_available()), "needs a CUDA build and a GPU"
cuda = dev == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
REPS = 3
gen = torch.Generator(device=dev).manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=dev, generator=gen).to(dtype)


def grad_call(fn, *leaves):
    """A call = forward + torch.autograd.grad towards the leaves (as the benchmarks time it)."""
    def call():
        out = fn()
        torch.autograd.grad(out, leaves)
    return call


def rows_case(n, c, dtype, **kw):
    x = randn(n, c, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, c, (n,), device=dev, generator=gen)
    if kw.get("inplace_backward"):  # the gradient overwrites the logits: refill outside the timing
        return grad_call(lambda: ops.cross_entropy(x * 1.0, t, **kw), x)
    return grad_call(lambda: ops.cross_entropy(x, t, **kw), x)


def torch_ce_case(n, c, dtype):
    x = randn(n, c, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, c, (n,), device=dev, generator=gen)
    return grad_call(lambda: F.cross_entropy(x, t), x)


def pld_case(n, c, eager=False):
    s = randn(n, c).requires_grad_(True)
    te = randn(n, c)
    y = torch.randint(0, c, (n,), device=dev, generator=gen)
    if eager:  # the benchmark's eager baseline (sort, gathers, logcumsumexp)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
        from bench_distill import pld_eager
        return grad_call(lambda: pld_eager(s, te, y, 2.0), s)
    return grad_call(lambda: ops.pld_loss(s, te, y, 2.0), s)


def sort_case(n, c, stable):
    """PLD's sort alone: the kernel's (stable, descending, as pld_forward calls it) or the eager
    baseline's (torch.sort ascending): how much of PLD's time is the sort."""
    te = randn(n, c)
    if stable:
        return lambda: te.sort(stable=True, dim=1, descending=True)
    return lambda: torch.sort(te, -1)


def ms_case(b, d):
    e = randn(b, d).requires_grad_(True)
    y = torch.randint(0, max(2, b // 8), (b,), device=dev, generator=gen)
    return grad_call(lambda: ops.multi_similarity_loss(e, y), e)


def clip_case(b, d):
    a, bb = randn(b, d).requires_grad_(True), randn(b, d).requires_grad_(True)
    return grad_call(lambda: ops.contrastive_loss(a, bb), a, bb)


def dice_case(n, c):
    x = randn(n, c).requires_grad_(True)
    t = torch.randint(0, c, (n,), device=dev, generator=gen)
    return grad_call(lambda: ops.dice_loss(x, t), x)


def quant_case(n, k, m, ring=None, gemm=None):
    qw = ops.quantize_weight(randn(n, k) * 0.02, 4, 128)
    x = randn(m, k, dtype=torch.float16)
    env = {"FASTLOSS_QUANT_GEMV_RING": None if ring is None else str(ring), "FASTLOSS_QUANT_GEMM": gemm}

    def call():
        os.environ.update({key: v for key, v in env.items() if v is not None})
        try:
            ops.dequant_gemm(x, qw)
        finally:
            for key in env:
                os.environ.pop(key, None)
    return call


def linear_case(n, d, v, low_memory=False, fused_stats=False):
    h = randn(n, d, dtype=torch.bfloat16).requires_grad_(True)
    w = (randn(v, d) * 0.02).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device=dev, generator=gen)

    def loss():
        if fused_stats:  # (read per call by the op: the forward's statistics kernel)
            os.environ["FASTLOSS_LINEAR_CE_STATS"] = "fused"
        try:
            return ops.linear_cross_entropy(h, w, t, low_memory=low_memory)
        finally:
            os.environ.pop("FASTLOSS_LINEAR_CE_STATS", None)
    return grad_call(loss, h, w)


CASES = {
    "ce_256x1000_fp32": lambda: rows_case(256, 1000, torch.float32),
    "ce_256x1000_fp32_torch": lambda: torch_ce_case(256, 1000, torch.float32),
    "ce_4096x32000_fp32": lambda: rows_case(4096, 32000, torch.float32),
    "ce_4096x32000_fp32_fused_inplace": lambda: rows_case(4096, 32000, torch.float32, grad_in_forward=True,
                                                          inplace_backward=True),
    "ce_8192x128256_bf16": lambda: rows_case(8192, 128256, torch.bfloat16),
    "ce_8192x128256_bf16_fused_inplace": lambda: rows_case(8192, 128256, torch.bfloat16, grad_in_forward=True,
                                                           inplace_backward=True),
    "pld_1024x32000": lambda: pld_case(1024, 32000),
    "pld_1024x32000_eager": lambda: pld_case(1024, 32000, eager=True),
    "pld_256x128256": lambda: pld_case(256, 128256),
    "sort_1024x32000_stable_descending": lambda: sort_case(1024, 32000, True),
    "sort_1024x32000": lambda: sort_case(1024, 32000, False),
    "ms_1024x128": lambda: ms_case(1024, 128),
    "clip_4096x512": lambda: clip_case(4096, 512),
    "dice_1024x32000": lambda: dice_case(1024, 32000),
    "quant_8192x28672_m1": lambda: quant_case(8192, 28672, 1),
    "quant_8192x28672_m1_ring2": lambda: quant_case(8192, 28672, 1, ring=2),
    "quant_8192x28672_m1_ring8": lambda: quant_case(8192, 28672, 1, ring=8),
    "quant_8192x28672_m64": lambda: quant_case(8192, 28672, 64),
    "quant_8192x28672_m64_smem": lambda: quant_case(8192, 28672, 64, gemm="smem"),
    "quant_8192x28672_m256": lambda: quant_case(8192, 28672, 256),
    "linear_8192x4096x32000_bf16": lambda: linear_case(8192, 4096, 32000),
    "linear_8192x4096x32000_bf16_low_memory": lambda: linear_case(8192, 4096, 32000, low_memory=True),
    "linear_8192x4096x32000_bf16_low_memory_fused_stats": lambda: linear_case(8192, 4096, 32000, low_memory=True,
                                                                              fused_stats=True),
}


def profile_case(name, make):
    call = make()
    for _ in range(3):
        call()
    sync()
    t0 = time.perf_counter()
    for _ in range(REPS):
        call()
    sync()
    wall = (time.perf_counter() - t0) / REPS
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(REPS):
            call()
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    dev_us = sum(e.self_device_time_total for e in kernels) / REPS
    launches = sum(e.count for e in kernels) / REPS
    print(f"== {name}: wall {wall * 1e3:.3f} ms per call (unprofiled), device {dev_us / 1e3:.3f} ms, "
          f"{launches:.0f} kernels per call", flush=True)
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]:
        print(f"   {e.self_device_time_total / REPS / 1e3:8.3f} ms  x{e.count / REPS:<4.0f} {e.key[:110]}")
    cpu = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: -e.self_cpu_time_total)[:5]
    print("   host (self, per call):", ", ".join(f"{e.key[:40]} {e.self_cpu_time_total / REPS:.0f} us"
                                                for e in cpu), flush=True)


def main(names):
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'}, commit "
          f"{os.environ.get('FASTLOSS_GIT_COMMIT', '?')}", flush=True)
    for name in names or CASES:
        try:
            profile_case(name, CASES[name])
        except Exception as e:  # one failing case must not hide the others' breakdowns
            print(f"== {name}: FAILED {type(e).__name__}: {e}", flush=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
