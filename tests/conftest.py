import pytest
import fastloss

requires_cuda = pytest.mark.skipif(not fastloss.cuda_available(), reason="no CUDA device or CUDA build")


# "amx" runs the AVX-512 kernels everywhere but in the low-bit GEMM (quant_cpu_isa)
KERNEL_ISAS = [isa for isa in fastloss.cpu_isas() if isa != "amx"]


@pytest.fixture(params=KERNEL_ISAS)
def cpu_isa(request):
    """Run a CPU test once with each kernel path this machine has (generic, AVX2, AVX-512)."""
    fastloss.set_cpu_isa(request.param)
    yield request.param
    fastloss.set_cpu_isa("auto")


@pytest.fixture(params=fastloss.cpu_isas())
def quant_cpu_isa(request):
    """cpu_isa plus "amx" where this machine has it (the low-bit GEMM's tile products)."""
    fastloss.set_cpu_isa(request.param)
    yield request.param
    fastloss.set_cpu_isa("auto")


def _places():
    places = [pytest.param(("cpu", isa), id=isa) for isa in KERNEL_ISAS]
    places.append(pytest.param(("cuda", None), id="cuda", marks=[pytest.mark.cuda, requires_cuda]))
    return places


@pytest.fixture(params=_places())
def device(request):
    """Run a test on every kernel path: each CPU path this machine has, then CUDA (skipped
    without a GPU). Yields the torch device string for the inputs."""
    dev, isa = request.param
    if isa is not None:
        fastloss.set_cpu_isa(isa)
    yield dev
    if isa is not None:
        fastloss.set_cpu_isa("auto")
