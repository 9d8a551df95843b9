import pytest
import torch

import fastloss

@pytest.fixture(params=fastloss.cpu_isas())
def cpu_isa(request):
    """Run a CPU test once with each kernel path this machine has (generic, AVX2, AVX-512)."""
    fastloss.set_cpu_isa(request.param)
    yield request.param
    fastloss.set_cpu_isa("auto")


def cuda_device():
    return torch.device("cuda") if fastloss.cuda_available() else None


requires_cuda = pytest.mark.skipif(not fastloss.cuda_available(), reason="no CUDA device or CUDA build")
