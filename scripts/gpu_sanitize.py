"""Small calls of the CUDA kernels, one family at a time, each followed by a synchronisation,
for `compute-sanitizer --tool memcheck` on a GPU machine (bench/gpu_check.sh, step
"sanitize"): a bad access is then reported with its kernel, and the last "ok" line printed
says which call it was. Names of the families to run may be given as arguments."""
import sys

import torch

import fastloss
from fastloss import ops

assert fastloss.cuda_available(), "needs a CUDA build and a GPU"
dev = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def run(what, fn):
    fn()
    torch.cuda.synchronize()
    print("ok", what, flush=True)


def tcn():
    for dtype in DTYPES:
        for channels_last in (False, True):
            for k, d in ((1, 1), (3, 4), (8, 2)):
                x = torch.randn(2, 37, 131, device=dev).to(dtype)
                if channels_last:
                    x = x.transpose(1, 2).contiguous().transpose(1, 2)
                w = torch.randn(37, k, device=dev).to(dtype)
                b = torch.randn(37, device=dev).to(dtype)
                leaves = [t.requires_grad_(True) for t in (x, w, b)]
                tag = f"tcn {dtype} cl={channels_last} k={k} d={d}"
                y = None

                def fwd():
                    nonlocal y
                    y = ops.dilated_conv1d(*leaves, dilation=d, causal=True)
                run(tag + " forward", fwd)
                run(tag + " backward", lambda: y.backward(torch.randn_like(y)))
                run(tag + " level", lambda: ops.tcn_level(*leaves, dilation=d).sum().backward())


def losses():
    for dtype in DTYPES:
        x = torch.randn(37, 1001, device=dev).to(dtype).requires_grad_(True)
        t = torch.randint(0, 1001, (37,), device=dev)
        run(f"cross_entropy {dtype}", lambda: ops.cross_entropy(x, t).backward())


FAMILIES = {"tcn": tcn, "losses": losses}
for name in sys.argv[1:] or list(FAMILIES):
    FAMILIES[name]()
print("all ok")
