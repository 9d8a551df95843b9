"""The CPU kernels store float16 / bfloat16 results with their own conversions (plain C++ on
the generic path, F16C / AVX-512 / integer code on the vector paths). They must round exactly
as torch does: nearest, ties to even, overflow to inf, subnormals, NaN kept NaN."""

import math

import pytest
import torch

import fastloss

FORMATS = {1: torch.float16, 2: torch.bfloat16}


def awkward_floats():
    g = torch.Generator().manual_seed(0)
    vals = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, 65504.0, 65519.99, 65520.0, -65520.0,
            6.1e-5, 6.0e-8, 5.96e-8, 2.98e-8, 2.99e-8, 1e-40, -1e-45, 3.0e38, -3.4e38, 1e-30]
    # every float16 and bfloat16 value, and the midpoints between neighbours (ties round to even)
    for dtype in (torch.float16, torch.bfloat16):
        every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).float()
        every = every[torch.isfinite(every)].sort().values
        mids = (every[1:].double() + every[:-1].double()) / 2
        vals += every.tolist() + mids.float().tolist()
    # random floats over the whole exponent range, both signs
    mant = torch.rand(20000, generator=g) + 1
    expo = torch.randint(-140, 128, (20000,), generator=g).float()
    sign = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    vals += (sign * mant * torch.pow(2.0, expo)).tolist()
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("dtype_code", list(FORMATS), ids=lambda c: str(FORMATS[c]))
@pytest.mark.parametrize("isa", fastloss.cpu_isas())
def test_stores_round_like_torch(isa, dtype_code):
    values = awkward_floats()
    fastloss.set_cpu_isa(isa)
    try:
        ours = torch.tensor(fastloss._C._store_floats(values.tolist(), dtype_code), dtype=torch.int64)
    finally:
        fastloss.set_cpu_isa("auto")
    dtype = FORMATS[dtype_code]
    theirs = values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    mismatch = (ours != theirs).nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} values differ, e.g. {values[mismatch[:5]].tolist()}: "
        f"ours {[hex(v) for v in ours[mismatch[:5]].tolist()]}, "
        f"torch {[hex(v) for v in theirs[mismatch[:5]].tolist()]}")


@pytest.mark.parametrize("dtype_code", list(FORMATS), ids=lambda c: str(FORMATS[c]))
@pytest.mark.parametrize("isa", fastloss.cpu_isas())
def test_nan_stays_nan(isa, dtype_code):
    values = [math.nan, -math.nan] * 9  # 18: the vector body and the scalar tail
    fastloss.set_cpu_isa(isa)
    try:
        bits = fastloss._C._store_floats(values, dtype_code)
    finally:
        fastloss.set_cpu_isa("auto")
    out = torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(FORMATS[dtype_code])
    assert torch.isnan(out.float()).all()
