"""Exits 0 when fastloss's C++ argument errors reach Python as RuntimeErrors (on the CPU, and on
CUDA when there is a GPU). A module built with a broken toolchain crashes here instead: seen on
the GPU machines with their image's default compiler (/opt/gcc/bin/g++), see README."""
import torch

import fastloss

checks = [("cpu", lambda: fastloss.ops.cross_entropy(torch.randn(4, 6), torch.tensor([0, 9, 1, 2])))]
if fastloss.cuda_available():
    checks.append(("cuda", lambda: fastloss.ops.cross_entropy(torch.randn(4, 6, device="cuda"),
                                                              torch.tensor([0, 1, 1, 2]))))
for where, bad_call in checks:
    try:
        bad_call()
    except RuntimeError as e:
        print(f"fastloss: a C++ error on {where} reached Python:", str(e).splitlines()[0][:80])
    else:
        raise SystemExit(f"fastloss: bad input on {where} raised nothing")
