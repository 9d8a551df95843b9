"""The dilated convolution against its float64 reference (itself checked against F.conv1d),
forward and backward: every CPU kernel path, dtype, memory layout, causal and centred, kernel
sizes 1-16, dilations past the sequence length, awkward B/C/L; causality; grouped and full
weights; opcheck, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import ops
from fastloss.reference import tcn as ref
from checks import assert_compiled_matches, expect_errors

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(b, c, length, k, dtype, seed=0, bias=True, channels_last=False):
    g = torch.Generator().manual_seed(seed * 1000 + b * 100 + c * 10 + length + k)
    x = torch.randn(b, c, length, generator=g)
    if channels_last:  # [B, L, C] memory seen as [B, C, L]
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(c, k, generator=g) / k ** 0.5
    bb = torch.randn(c, generator=g) if bias else None
    return x.to(dtype), w.to(dtype), None if bb is None else bb.to(dtype)


def close(actual, expected, dtype, what):
    tol = TOL[dtype]
    mag = max(expected.abs().max().item() if expected.numel() else 1.0, 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * mag,
                               msg=lambda m: f"{what}: {m}")


def check(b, c, length, k, dilation, causal, dtype, channels_last=False, bias=True, seed=0,
          device="cpu"):
    x, w, bb = make(b, c, length, k, dtype, seed, bias, channels_last)
    leaves = [t.detach().to(device).requires_grad_(True) if t is not None else None
              for t in (x, w, bb)]
    y = ops.dilated_conv1d(leaves[0], leaves[1], leaves[2], dilation=dilation, causal=causal)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last and c > 1 and length > 1:
        assert y.stride(1) == 1, "the output keeps the channels-last layout"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y.backward(g.to(device))
    y = y.cpu()
    r_leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, bb)]
    r = ref.dilated_conv1d(r_leaves[0], r_leaves[1], r_leaves[2], dilation, causal)
    r.backward(g.double())
    what = f"{b}x{c}x{length} K={k} d={dilation} causal={causal} {dtype} cl={channels_last}"
    close(y, r, dtype, f"{what} y")
    for name, a, e in zip(("x", "weight", "bias"), leaves, r_leaves):
        if a is not None:
            assert a.grad.dtype == dtype and a.grad.shape == a.shape
            close(a.grad.cpu(), e.grad, dtype, f"{what} grad_{name}")


def test_reference_equals_conv1d():
    x = torch.randn(3, 4, 50, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    for causal in (True, False):
        for d in (1, 3):
            span = d * 4
            p = span if causal else span // 2
            expected = F.conv1d(F.pad(x, (p, span - p)), w.unsqueeze(1), b, dilation=d, groups=4)
            torch.testing.assert_close(ref.dilated_conv1d(x, w, b, d, causal), expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
@pytest.mark.parametrize("k,dilation", [(1, 1), (2, 1), (3, 4), (4, 9), (8, 2), (16, 3), (5, 60)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, k, dilation, causal, channels_last, device):
    # channels past 2 vector widths plus a tail; L with a tail, shorter than some receptive fields
    check(2, 37, 131, k, dilation, causal, dtype, channels_last, device=device)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 40), (3, 2, 1), (2, 5, 7), (1, 17, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
def test_awkward_shapes(shape, channels_last, device):
    for bias in (True, False):
        check(*shape, 3, 2, True, torch.float32, channels_last, bias=bias, seed=1, device=device)


def test_strided_inputs():
    """Views of a larger input (every other step, every other sample, a slice of channels):
    the output and the gradients of the input (through the view), the taps and the bias."""
    x, w, b = make(4, 6, 80, 3, torch.float32, seed=2)
    for pick in (lambda t: t[:, :, ::2], lambda t: t[::2], lambda t: t[:, 1:5]):
        xs, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        view, view64 = pick(xs), pick(x64)
        c = view.shape[1]
        ws, bs = w[:c].clone().requires_grad_(True), b[:c].clone().requires_grad_(True)
        w64, b64 = w[:c].double().requires_grad_(True), b[:c].double().requires_grad_(True)
        y = ops.dilated_conv1d(view, ws, bs, dilation=2)
        r = ref.dilated_conv1d(view64, w64, b64, 2)
        what = f"strided {tuple(view.stride())}"
        close(y, r, torch.float32, what)
        up = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
        y.backward(up)
        r.backward(up.double())
        for name, got, want in (("x", xs.grad, x64.grad), ("w", ws.grad, w64.grad), ("b", bs.grad, b64.grad)):
            close(got, want, torch.float32, f"{what} grad {name}")


def test_causal_output_ignores_the_future():
    x, w, b = make(2, 3, 64, 4, torch.float32, seed=3)
    x.requires_grad_(True)
    y = ops.dilated_conv1d(x, w, b, dilation=5, causal=True)
    t0 = 30
    y[:, :, t0].sum().backward()
    assert (x.grad[:, :, t0 + 1:] == 0).all() and (x.grad[:, :, : t0 + 1] != 0).any()


def test_grouped_and_full_weights():
    x, w, b = make(2, 6, 50, 3, torch.float32, seed=4)
    # a [C, 1, K] weight with groups = C is the depthwise convolution
    y = ops.dilated_conv1d(x, w.unsqueeze(1), b, dilation=3, causal=False)
    close(y, ref.dilated_conv1d(x, w, b, 3, False), torch.float32, "depthwise as grouped")
    # full: each output channel sums depthwise convolutions of the input channels
    wf = torch.randn(4, 6, 3)
    y = ops.dilated_conv1d(x, wf, None, dilation=2)
    expected = torch.stack([sum(ref.dilated_conv1d(x[:, i:i + 1], wf[o, i:i + 1], None, 2)[:, 0]
                                for i in range(6)) for o in range(4)], 1)
    close(y, expected, torch.float32, "full")
    # grouped, 2 groups of 3 channels
    wg = torch.randn(4, 3, 3)
    y = ops.dilated_conv1d(x, wg, None, dilation=2, groups=2)
    expected = torch.stack([sum(ref.dilated_conv1d(x[:, (o // 2) * 3 + i:(o // 2) * 3 + i + 1],
                                                   wg[o, i:i + 1], None, 2)[:, 0]
                                for i in range(3)) for o in range(4)], 1)
    close(y, expected, torch.float32, "grouped")


def test_opcheck():
    for channels_last in (False, True):
        x, w, b = make(2, 5, 33, 3, torch.float32, seed=6, channels_last=channels_last)
        for bias in (b, None):
            for pad in (0, 3, 6):
                args = (x.clone().requires_grad_(True), w.clone().requires_grad_(True), bias, 3, pad)
                torch.library.opcheck(torch.ops.fastloss.dilated_conv1d_forward.default, args)
                torch.library.opcheck(torch.ops.fastloss.dilated_conv1d_backward.default,
                                      (torch.randn(2, 5, 33), x, w, 3, pad, [True, True, True]))


def test_torch_compile_fullgraph():
    def f(x, w, b):
        return ops.dilated_conv1d(torch.tanh(ops.dilated_conv1d(x, w, b, dilation=2)), w, None,
                                  dilation=4, causal=False).square().sum()
    assert_compiled_matches(f, make(2, 4, 40, 3, torch.float32, seed=7))


def test_fake_kernels_lay_outputs_out_as_the_kernels():
    """The fake kernels give the outputs' strides the kernels give (a permuted or expanded x
    gets a contiguous output, a channels-last one with a sliced channel axis a dense
    channels-last one): empty_like(x) had kept the input's strides, and torch.compile's stride
    checks failed on an nn.TCN fed a [L, B, C] sequence viewed as [B, C, L]."""
    g = torch.Generator().manual_seed(9)
    layouts = {"permuted": torch.randn(20, 2, 8, generator=g).permute(1, 2, 0),
               "expanded": torch.randn(2, 8, 1, generator=g).expand(2, 8, 20),
               "channels-last, sliced": torch.randn(2, 20, 10, generator=g).transpose(1, 2)[:, :8]}
    w, b = torch.randn(8, 3, generator=g), torch.randn(8, generator=g)
    for name, x in layouts.items():
        for op, args in ((torch.ops.fastloss.dilated_conv1d_forward.default, (x, w, b, 2, 4)),
                         (torch.ops.fastloss.tcn_level_forward.default, (x, w, b, 2, 4, 1)),
                         (torch.ops.fastloss.dilated_conv1d_backward.default,
                          (torch.randn(x.shape, generator=g), x, w, 2, 4, [True, True, True])),
                         (torch.ops.fastloss.tcn_level_backward.default,
                          (torch.randn(x.shape, generator=g), x, w, b, 2, 4, 1, [True, True, True]))):
            torch.library.opcheck(op, args, test_utils=("test_faketensor",))
        model = fastloss.nn.TCN(8, 2, 3)
        leaf = x.detach().requires_grad_(name != "expanded")
        compiled = torch.compile(model, fullgraph=True)(leaf)
        torch.testing.assert_close(compiled, model(x))


def test_bad_input_errors_name_the_argument():
    x, w, b = make(2, 4, 20, 3, torch.float32, seed=8)
    cases = [
        (lambda: ops.dilated_conv1d(x[0], w), "x must be 3-D"),
        (lambda: ops.dilated_conv1d(x.int(), w), "x must be float32"),
        (lambda: ops.dilated_conv1d(x, w[:3]), "depthwise weight must be [C, K] with C = 4"),
        (lambda: ops.dilated_conv1d(x, w, dilation=0), "dilation must be an int >= 1"),
        (lambda: ops.dilated_conv1d(x, w, dilation=True), "dilation must be an int >= 1, got True"),
        # (F.conv1d's positional (stride, padding) = (1, 2) must not run as dilation 1, causal 2)
        (lambda: ops.dilated_conv1d(x, w, b, 1, 2), "causal must be True or False, got 2"),
        (lambda: ops.tcn_level(x, w, b, 1, "gelu", 0), "causal must be True or False, got 0"),
        (lambda: fastloss.nn.DilatedConv1d(4, 4, 3), "positional argument"),
        (lambda: fastloss.nn.DilatedConv1d(4, 3, causal=0), "causal must be True or False, got 0"),
        (lambda: ops.dilated_conv1d(x, w, dilation=1 << 62), "dilation * (K - 1) must be below 2^62"),
        (lambda: ops.dilated_conv1d(x, w[:, :0]), "K >= 1"),
        (lambda: ops.dilated_conv1d(x, w, b[:2]), "bias must be [4]"),
        (lambda: ops.dilated_conv1d(x, w.double()), "weight is Double but x is Float"),
        (lambda: ops.dilated_conv1d(x, torch.randn(4, 3, 3), groups=3), "do not fit 4 input channels"),
        (lambda: torch.ops.fastloss.dilated_conv1d_forward(x, w, None, 2, 5), "padding must be in [0, 4]"),
        (lambda: torch.ops.fastloss.dilated_conv1d_backward(x[:, :, :5], x, w, 1, 0, [True] * 3),
         "grad_y must have x's shape"),
    ]
    expect_errors(cases)


def test_float64_takes_conv1d_and_passes_gradcheck():
    """float64 (refused before) runs F.conv1d with the op's padding: equal to the reference in
    both layouts and both paddings, gradcheck on the op, tcn_level and nn.TCN; a weight of
    another dtype is refused by name."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    for causal in (True, False):
        for xx in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
            y = ops.dilated_conv1d(xx, w, b, dilation=3, causal=causal)
            assert y.dtype == torch.float64
            torch.testing.assert_close(y, ref.dilated_conv1d(x, w, b, 3, causal), rtol=1e-12, atol=1e-12)
    xs, ws, bs = (t[..., :9].clone().requires_grad_(True) if t.dim() == 3 else t.clone().requires_grad_(True)
                  for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.dilated_conv1d(*a, dilation=2, causal=False), (xs, ws, bs))
    assert torch.autograd.gradcheck(lambda *a: ops.tcn_level(*a, dilation=2, activation="silu"), (xs, ws, bs))
    tcn = fastloss.nn.TCN(3, depth=2, kernel_size=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(tcn, (xs,))
    with torch.no_grad():  # the streaming form in float64 too
        state = tcn.init_state(2)
        steps = torch.stack([tcn.step(x[:, :, t], state)[0] for t in range(17)], -1)
        torch.testing.assert_close(steps, tcn(x), rtol=1e-12, atol=1e-12)
    expect_errors([(lambda: ops.dilated_conv1d(x, w.float()), "weight is torch.float32 but x is torch.float64"),
                   (lambda: ops.dilated_conv1d(x, w, b.float()), "bias is torch.float32 but x is torch.float64")])


# ---- modules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size,base,depth", [(2, 2, 5), (3, 2, 4), (4, 3, 3), (1, 2, 2)])
def test_tcn_streaming_equals_full_forward(kernel_size, base, depth):
    torch.manual_seed(kernel_size * 10 + base)
    tcn = fastloss.nn.TCN(7, depth=depth, kernel_size=kernel_size, base=base)
    x = torch.randn(3, 7, 45)   # shorter than some receptive fields
    with torch.no_grad():
        full = tcn(x)
        state = tcn.init_state(3)
        steps = torch.stack([tcn.step(x[:, :, t], state)[0] for t in range(45)], -1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    assert state["t"] == 45


def test_tcn_forward_is_the_residual_stack_of_the_reference():
    torch.manual_seed(1)
    tcn = fastloss.nn.TCN(5, depth=3, kernel_size=3, base=2, activation="relu")
    x = torch.randn(2, 5, 30, dtype=torch.float32)
    expected = x.double()
    for level in tcn.levels:
        h = ref.dilated_conv1d(expected, level.weight.detach().double(), level.bias.detach().double(),
                               level.dilation, True)
        expected = expected + torch.relu(h)
    torch.testing.assert_close(tcn(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert tcn.receptive_field == 1 + 2 * (1 + 2 + 4)
    y = tcn(x.transpose(1, 2).contiguous().transpose(1, 2))   # channels-last memory
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_tcn_trains():
    torch.manual_seed(2)
    tcn = fastloss.nn.TCN(4, depth=2, kernel_size=2)
    x = torch.randn(2, 4, 16)
    tcn(x).square().mean().backward()
    for p in tcn.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any()


def test_tcn_bad_state_and_arguments():
    tcn = fastloss.nn.TCN(4, depth=2, kernel_size=3)
    state = tcn.init_state(2)
    with pytest.raises(ValueError, match=r"x_t must be \[B, 4\]"):
        tcn.step(torch.randn(2, 5), state)
    with pytest.raises(ValueError, match="buffer must be"):
        tcn.step(torch.randn(3, 4), state)
    with pytest.raises(ValueError, match="state must come from TCN.init_state"):
        tcn.step(torch.randn(2, 4), {"buffers": []})
    with pytest.raises(ValueError, match="activation must be one of"):
        fastloss.nn.TCN(4, depth=2, activation="tanh")
    with pytest.raises(ValueError, match="kernel_size and dilation must be >= 1"):
        fastloss.nn.DilatedConv1d(4, 0)


# ---- the fused level: x + act(conv(x) + b) -------------------------------------------------------

def reference_level(x, w, b, dilation, activation, causal):
    act = {None: lambda h: h, "relu": torch.relu, "silu": F.silu, "gelu": F.gelu}[activation]
    return x + act(ref.dilated_conv1d(x, w, b, dilation, causal))


@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_fused_level_matches_reference(causal, dtype, activation, channels_last, device):
    x, w, b = make(2, 19, 70, 3, dtype, seed=9, channels_last=channels_last)
    leaves = [t.detach().to(device).requires_grad_(True) for t in (x, w, b)]
    y = ops.tcn_level(*leaves, dilation=4, activation=activation, causal=causal)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    y.backward(g.to(device))
    r_leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    r = reference_level(*r_leaves, 4, activation, causal)
    r.backward(g.double())
    what = f"level {activation} causal={causal} {dtype}"
    close(y.cpu(), r, dtype, what)
    for name, a, e in zip(("x", "weight", "bias"), leaves, r_leaves):
        close(a.grad.cpu(), e.grad, dtype, f"{what} grad_{name}")


def test_fused_level_without_bias_opcheck_and_compile():
    x, w, _ = make(2, 5, 33, 4, torch.float32, seed=11)
    for act in range(4):
        torch.library.opcheck(torch.ops.fastloss.tcn_level_forward.default,
                              (x.clone().requires_grad_(True), w.clone().requires_grad_(True), None, 2, 6, act))
        torch.library.opcheck(torch.ops.fastloss.tcn_level_backward.default,
                              (torch.randn(2, 5, 33), x, w, None, 2, 6, act, [True, True, False]))
    tcn = fastloss.nn.TCN(5, depth=3, kernel_size=3)
    compiled = torch.compile(tcn, fullgraph=True)
    torch.testing.assert_close(compiled(x), tcn(x))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.tcn_level(x, w, activation="tanh")
    with pytest.raises(RuntimeError, match="activation code must be 0"):
        torch.ops.fastloss.tcn_level_forward(x, w, None, 1, 0, 7)


needs_cuda = pytest.mark.skipif(not fastloss.cuda_available(), reason="no CUDA device or CUDA build")


# Shapes past the CUDA kernels' grid caps: a row longer than 256 tiles (the taps' gradient
# loops over tiles), positions past 32 x 1024 block rows (channels last), rows past 65535
# block rows (forward), channels past one block (channels last).
@pytest.mark.parametrize("shape,channels_last", [((1, 2, 300_001), False), ((1, 5, 300_001), True),
                                                 ((600, 1000, 7), False), ((3, 1500, 40), True)],
                         ids=["long-BCL", "long-BLC", "many-rows", "wide-BLC"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_grid_limits(shape, channels_last):
    check(*shape, 3, 5000 if shape[2] > 1000 else 2, True, torch.float32, channels_last,
          seed=13, device="cuda")


@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_weight_gradient_is_deterministic(channels_last):
    x, w, b = make(4, 33, 5000, 5, torch.float32, seed=14, channels_last=channels_last)
    x, g = x.cuda(), torch.randn(4, 33, 5000, device="cuda")
    grads = [torch.ops.fastloss.dilated_conv1d_backward(g, x, w.cuda(), 7, 28, [False, True, True])
             for _ in range(2)]
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])


@pytest.mark.cuda
@needs_cuda
def test_cuda_path_equals_cpu():
    x, w, b = make(2, 6, 50, 3, torch.float32, seed=12)
    results = []
    for dev in ("cpu", "cuda"):
        leaves = [t.detach().to(dev).requires_grad_(True) for t in (x, w, b)]
        y = ops.tcn_level(*leaves, dilation=3, activation="gelu")
        y.square().sum().backward()
        results.append((y.cpu(), *[t.grad.cpu() for t in leaves]))
    for got, exp in zip(*results):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["BCL", "BLC"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_non_finite_taps_match_conv1d(causal, channels_last, device):
    """A tap of inf multiplies the padding's zeros too (NaN there, as F.conv1d), on every
    instruction set and layout, not only where it meets data."""
    x, w, b = make(2, 19, 37, 3, torch.float32, seed=6, channels_last=channels_last)
    w[4, 0], w[11, 2] = float("inf"), float("-inf")
    d = 5
    y = ops.dilated_conv1d(x.to(device), w.to(device), b.to(device), dilation=d, causal=causal).cpu()
    span = d * 2
    p = span if causal else span // 2
    expected = F.conv1d(F.pad(x, (p, span - p)), w.unsqueeze(1), b, dilation=d, groups=19)
    assert torch.equal(torch.isnan(y), torch.isnan(expected)), "NaN pattern"
    torch.testing.assert_close(y.nan_to_num(0.0, 7.0, -7.0), expected.nan_to_num(0.0, 7.0, -7.0),
                               rtol=2e-5, atol=2e-5)
