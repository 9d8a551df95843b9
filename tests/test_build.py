"""What was built, and that the module reports it."""

import os

import torch

import fastloss


def test_build_reports_itself():
    assert isinstance(fastloss.built_with_cuda(), bool)
    assert fastloss.cpu_isa() in ("generic", "avx2", "avx512")
    if fastloss.built_with_cuda():
        assert fastloss.cuda_archs(), "a CUDA build lists its architectures"
    assert fastloss.cuda_available() == (fastloss.built_with_cuda() and torch.cuda.is_available())


def test_cuda_code_was_built_when_required():
    # CI sets this: it has no GPU but must still compile and link the CUDA kernels.
    if os.environ.get("FASTLOSS_REQUIRE_CUDA_BUILD") == "1":
        assert torch.version.cuda is not None, "CI must install a CUDA build of torch"
        assert fastloss.built_with_cuda(), "the CUDA kernels were not compiled"


def test_cpu_isa_switch():
    fastloss.set_cpu_isa("generic")
    assert fastloss.cpu_isa() == "generic"
    fastloss.set_cpu_isa("auto")
    assert fastloss.cpu_isa() == fastloss.cpu_isas()[-1]
    for isa in fastloss.cpu_isas():
        fastloss.set_cpu_isa(isa)
        assert fastloss.cpu_isa() == isa
    fastloss.set_cpu_isa("auto")


def test_ops_are_registered_with_torch():
    for name in ("cross_entropy", "comp_sum", "ldr", "spherical_z", "stablemax"):
        assert hasattr(torch.ops.fastloss, f"{name}_forward")
        assert hasattr(torch.ops.fastloss, f"{name}_backward")
