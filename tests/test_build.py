"""What was built, and that the module reports it."""

import os

import torch

import fastloss


def test_build_reports_itself():
    assert isinstance(fastloss.built_with_cuda(), bool)
    assert fastloss.cpu_isa() in ("generic", "avx2", "avx512", "amx")
    if fastloss.built_with_cuda():
        assert fastloss.cuda_archs(), "a CUDA build lists its architectures"
    assert fastloss.cuda_available() == (fastloss.built_with_cuda() and torch.cuda.is_available())


def test_cuda_code_was_built_when_required():
    # CI sets this: it has no GPU but must still compile and link the CUDA kernels.
    if os.environ.get("FASTLOSS_REQUIRE_CUDA_BUILD") == "1":
        assert torch.version.cuda is not None, "CI must install a CUDA build of torch"
        assert fastloss.built_with_cuda(), "the CUDA kernels were not compiled"
        wanted = os.environ.get("FASTLOSS_CUDA_ARCHS")
        if wanted:  # (the list asked for, not one a kept build folder had cached before)
            assert fastloss.cuda_archs() == wanted.replace(",", ";").split(";"), fastloss.cuda_archs()


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


def test_op_files_call_cuda_entry_points_only_in_cuda_builds():
    """Every call of a CUDA kernel entry point (`..._cuda(`, `..._cuda_scratch(`, ...) in the
    torch-aware op files sits inside `#if defined(FASTLOSS_WITH_CUDA)`: a CPU-only build (a CPU
    torch, FASTLOSS_CUDA=OFF, no nvcc) compiles no .cu file, and one unguarded call leaves an
    undefined symbol that makes `import fastloss` fail there. CI builds with CUDA, so this
    reads the sources instead."""
    import re
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    call = re.compile(r"\b(\w+_cuda(?:_\w+)?)\s*\(")
    allowed = {"is_cuda", "on_cuda"}
    bad = []
    for path in sorted(csrc.glob("*/*_op.cpp")):
        stack = []  # for each open #if: "cuda", "not cuda" or "other"
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.strip()
            if text.startswith("#if"):
                guard = "FASTLOSS_WITH_CUDA" in text
                stack.append(("not cuda" if "!" in text else "cuda") if guard else "other")
            elif text.startswith("#else"):
                stack[-1] = {"cuda": "not cuda", "not cuda": "cuda"}.get(stack[-1], "other")
            elif text.startswith("#endif"):
                stack.pop()
            elif "cuda" not in stack and not text.startswith("//"):
                bad += [f"{path.relative_to(csrc)}:{number}: {name}" for name in call.findall(line)
                        if name not in allowed]
    assert not bad, "CUDA entry points called outside #if defined(FASTLOSS_WITH_CUDA):\n" + "\n".join(bad)


def test_a_cpu_isa_the_environment_cannot_have_is_named():
    """FASTLOSS_CPU_ISA with a value the module cannot use (a typo, a level this CPU lacks)
    keeps the best level, which set_cpu_isa would refuse: the import warns, naming it."""
    import subprocess
    import sys
    env = dict(os.environ, FASTLOSS_CPU_ISA="avx3")
    run = subprocess.run([sys.executable, "-c", "import fastloss; print(fastloss.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True)
    assert "FASTLOSS_CPU_ISA='avx3' is not one of this CPU's levels" in run.stderr, run.stderr
    assert run.stdout.strip() == fastloss.cpu_isas()[-1]
    env["FASTLOSS_CPU_ISA"] = "generic"
    run = subprocess.run([sys.executable, "-W", "error", "-c", "import fastloss; print(fastloss.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "generic"
