"""Low-bit dequant GEMM: for every format, dequant_gemm(x, quantize_weight(w)) equals
x @ W^T with W unpacked by the independent float64 reference; dequantize_weight equals that
reference; round-to-nearest stays within half a step; every CPU path, activation dtype, batch
(both kernel paths) and awkward shape; gradients; opcheck; compile; imported integer weights;
QuantLinear on a small model; bad input."""

import pytest
import torch

import fastloss
from fastloss import ops
from fastloss.reference import quant as ref
from checks import assert_compiled_matches, expect_errors

FORMATS = [(bits, gs, sym) for bits in (4, 8) for gs in (32, 64, 128, 256, -1, 0) for sym in (True, False)]


def k_for(group_size):
    return {32: 288, 64: 192, 128: 384, 256: 512, -1: 266, 0: 266}[group_size]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS, ids=lambda v: str(v))
def test_format_and_gemm(bits, group_size, symmetric, cpu_isa):
    g = torch.Generator().manual_seed(bits * 100 + group_size + symmetric)
    k = k_for(group_size)
    w = torch.randn(37, k, generator=g) * 0.1
    qw = ops.quantize_weight(w, bits, group_size, symmetric)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, bits, qw.group)
    torch.testing.assert_close(ops.dequantize_weight(qw).double(), w64, rtol=0, atol=1e-7)
    step = qw.scales.double().repeat_interleave(qw.group, 1)
    assert ((w64 - w.double()).abs() <= 0.5 * step + 1e-6).all(), "round to nearest"
    for m in (1, 2, 5, 16, 17, 40):   # register path, buffer path, tile + GEMM path
        x = torch.randn(m, k, generator=g)
        torch.testing.assert_close(ops.dequant_gemm(x, qw).double(), x.double() @ w64.T,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_activations_bias_and_gradients(dtype):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(24, 128, generator=g) * 0.1, torch.randn(24, generator=g)
    qw = ops.quantize_weight(w, 4, 64, False)
    w64 = ref.unpack_weight(qw.qweight, qw.scales, qw.zeros, 4, qw.group)
    for m in (3, 30):
        x = torch.randn(2, m, 128, generator=g).to(dtype).requires_grad_(True)
        bias = b.to(dtype).requires_grad_(True)
        y = ops.dequant_gemm(x, qw, bias)
        assert y.dtype == dtype and y.shape == (2, m, 24)
        x64, b64 = x.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
        y64 = x64 @ w64.T + b64
        up = torch.randn(y.shape, generator=g)
        y.backward(up.to(dtype))
        y64.backward(up.to(dtype).double())
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * x64.grad.abs().max().item())
        torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=tol, atol=tol * b64.grad.abs().max().item())


def test_opcheck_compile_and_imported_weights():
    g = torch.Generator().manual_seed(6)
    q = torch.randint(0, 16, (10, 64), generator=g)
    scales, zeros = torch.rand(10, 2, generator=g) + 0.1, torch.randint(0, 16, (10, 2), generator=g).float()
    qw = ops.QuantizedWeight.from_int(q, scales, zeros, 4, 32)
    expected_w = (q.double() - zeros.double().repeat_interleave(32, 1)) * scales.double().repeat_interleave(32, 1)
    torch.testing.assert_close(ops.dequantize_weight(qw).double(), expected_w, rtol=0, atol=1e-6)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    b = torch.randn(10, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastloss.dequant_gemm.default, (x, qw.qweight, qw.scales, qw.zeros, 4, 32, b))
    torch.library.opcheck(torch.ops.fastloss.dequant_gemm_grad_input.default,
                          (torch.randn(3, 10), qw.qweight, qw.scales, qw.zeros, 4, 32))
    torch.library.opcheck(torch.ops.fastloss.dequantize_weight.default, (qw.qweight, qw.scales, qw.zeros, 4, 32))
    f = lambda t: ops.dequant_gemm(t, qw, b).square().sum()  # noqa: E731
    assert_compiled_matches(f, [x])


def test_quant_linear_on_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    x = torch.randn(20, 64)
    reference = model(x).detach()
    fastloss.nn.quantize_linear_layers_(model, bits=8, group_size=32, bits_per_layer={"2": 4})
    assert isinstance(model[0], fastloss.nn.QuantLinear) and model[0].bits == 8 and model[2].bits == 4
    out = model(x)
    rel = (out - reference).norm() / reference.norm()
    assert rel < 0.1, rel   # 4-bit round-to-nearest of a random layer: about 7% here
    state = model.state_dict()
    again = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    fastloss.nn.quantize_linear_layers_(again, bits=8, group_size=32, bits_per_layer={"2": 4})
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), out)
    out.sum().backward()
    assert model[0].bias.grad is not None


def test_bad_input_errors_name_the_argument():
    w = torch.randn(8, 64)
    qw = ops.quantize_weight(w, 4, 32)
    cases = [
        (lambda: ops.quantize_weight(w, 3, 32), "bits must be 4 or 8"),
        (lambda: ops.quantize_weight(w, 4, 48), "group_size (48) must divide the input features K = 64"),
        (lambda: ops.quantize_weight(w[:, :63], 4, -1), "4-bit groups must have an even length"),
        (lambda: ops.dequant_gemm(torch.randn(2, 63), qw), "x must be [..., 64]"),
        (lambda: ops.dequant_gemm(torch.randn(2, 64).double(), qw), "x must be a float32"),
        (lambda: ops.dequant_gemm(torch.randn(2, 64), w), "qw must be a QuantizedWeight"),
        (lambda: ops.dequant_gemm(torch.randn(2, 64), qw, torch.randn(7)), "bias must be [N] = [8]"),
        (lambda: torch.ops.fastloss.dequant_gemm(torch.randn(2, 64), qw.qweight, qw.scales[:, :1], qw.zeros, 4, 32, None),
         "scales and zeros must be float32 [N, K / group_size] = [8, 2]"),
        (lambda: torch.ops.fastloss.dequant_gemm(torch.randn(2, 64), qw.qweight.float(), qw.scales, qw.zeros, 4, 32, None),
         "qweight must be a 2-D uint8 tensor"),
        (lambda: ops.QuantizedWeight.from_int(torch.full((8, 64), 16), torch.ones(8, 2), torch.zeros(8, 2), 4, 32),
         "q must hold integers in [0, 16)"),
        (lambda: fastloss.nn.quantize_linear_layers_(torch.nn.Sequential(torch.nn.Linear(4, 4)), bits_per_layer={"x": 8}),
         "no nn.Linear named ['x']"),
    ]
    expect_errors(cases)
