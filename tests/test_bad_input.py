"""Bad input gets a clear error that names the argument; never a crash or a wild read."""

import pytest
import torch

from fastloss import ops

from conftest import requires_cuda

LOSSES = {
    "cross_entropy": (ops.cross_entropy, {}),
    "comp_sum_loss": (ops.comp_sum_loss, {"tau": 1.0}),
    "ldr_loss": (ops.ldr_loss, {"lam": 1.0}),
    "spherical_z_loss": (ops.spherical_z_loss, {"a": 1.0, "b": 1.0}),
    "stablemax_cross_entropy": (ops.stablemax_cross_entropy, {}),
}


def good():
    return torch.randn(4, 6), torch.tensor([0, 5, 2, -100])


@pytest.mark.parametrize("name", list(LOSSES))
class TestEveryLoss:
    def call(self, name, logits, target, **kw):
        fn, params = LOSSES[name]
        return fn(logits, target, **{**params, **kw})

    def test_logits_rank(self, name):
        # [C] and [N, C, d1, ...] are F.cross_entropy's layouts too, with their own target shapes
        with pytest.raises(ValueError, match=r"logits must be \[N, C\], \[N, C, d1, ...\] or unbatched"):
            self.call(name, torch.tensor(1.0), torch.tensor(0))
        with pytest.raises(ValueError, match=r"unbatched logits \[C\] take a 0-d target"):
            self.call(name, torch.randn(6), torch.tensor([1]))
        with pytest.raises(ValueError, match=r"target must be \[2, 6\] for logits of shape \[2, 3, 6\]"):
            self.call(name, torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match=r"logits must have at least one class, got shape \[2, 0, 3\]"):
            self.call(name, torch.randn(2, 0, 3), torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match=r"logits must have at least one class, got shape \[0\]"):
            self.call(name, torch.randn(0), torch.tensor(0))
        with pytest.raises(ValueError, match="probability targets are not supported"):
            self.call(name, torch.randn(2, 5, 3), torch.rand(2, 5, 3).softmax(1))
        with pytest.raises(RuntimeError, match="logits must be 2-D"):  # the kernel op: rows only
            torch.ops.fastloss.cross_entropy_forward(torch.randn(2, 3, 6), torch.zeros(2, dtype=torch.long),
                                                     None, -100, 0.0, 0.0, 0.0)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.bool])
    def test_logits_dtype(self, name, dtype):
        logits, target = good()
        with pytest.raises(RuntimeError, match="logits must be float32, float16 or bfloat16"):
            self.call(name, logits.to(dtype), target)

    def test_target_shape_and_dtype(self, name):
        logits, target = good()
        with pytest.raises(RuntimeError, match="target has 3 entries but logits has 4 rows"):
            self.call(name, logits, target[:3])
        with pytest.raises(RuntimeError, match="target must be 1-D"):
            self.call(name, logits, target.view(2, 2))
        with pytest.raises(ValueError, match="target must hold class indices"):
            self.call(name, logits, target.float())
        # probability targets of [N, C] logits: named as such (the kernel's "1-D" said less)
        with pytest.raises(ValueError, match="probability targets are not supported"):
            self.call(name, logits, logits.softmax(1))

    @pytest.mark.parametrize("bad", [6, 1000, -1, -101, 2**40])
    def test_target_out_of_range(self, name, bad):
        logits, target = good()
        target[1] = bad
        with pytest.raises(RuntimeError, match=rf"target\[1\] = {bad} is not a class index in \[0, 6\)"):
            self.call(name, logits, target)

    def test_weight(self, name):
        logits, target = good()
        with pytest.raises(RuntimeError, match="weight must be 1-D with one entry per class"):
            self.call(name, logits, target, weight=torch.ones(5))
        with pytest.raises(RuntimeError, match="weight must be a floating-point tensor"):
            self.call(name, logits, target, weight=torch.ones(6, dtype=torch.long))
        with pytest.raises(TypeError, match="weight must be a Tensor or None"):
            self.call(name, logits, target, weight=[1.0] * 6)

    def test_reduction(self, name):
        logits, target = good()
        with pytest.raises(ValueError, match="reduction must be one of"):
            self.call(name, logits, target, reduction="avg")

    def test_no_classes(self, name):
        with pytest.raises(RuntimeError, match="at least one class"):
            self.call(name, torch.randn(3, 0), torch.zeros(3, dtype=torch.long))

    def test_meta_device_mismatch(self, name):
        logits, target = good()
        with pytest.raises(RuntimeError, match="target is on meta but logits is on cpu"):
            self.call(name, logits, target.to("meta"))


@pytest.mark.parametrize("fn, kwargs, match", [
    (ops.comp_sum_loss, {"tau": -0.5}, "tau must be >= 0"),
    (ops.comp_sum_loss, {"tau": float("nan")}, "tau must be a finite number, got nan"),
    (ops.comp_sum_loss, {"tau": float("inf")}, "tau must be a finite number, got inf"),
    (ops.ldr_loss, {"lam": float("inf")}, "lam must be a finite number"),
    (ops.ldr_loss, {"lam": 1.0, "margin": float("-inf")}, "margin must be a finite number"),
    (ops.ldr_loss, {"lam": 1.0, "margin": float("nan")}, "margin must be a finite number"),
    (ops.ldr_loss, {"lam": 1.0, "adaptive": True, "alpha": float("inf")}, "alpha must be a finite number"),
    (ops.spherical_z_loss, {"a": float("inf"), "b": 1.0}, "a must be a finite number"),
    (ops.spherical_z_loss, {"a": 1.0, "b": float("nan")}, "b must be a finite number"),
    (ops.cross_entropy, {"softcap": float("inf")}, "softcap must be a finite number"),
    (ops.cross_entropy, {"lse_square_scale": float("inf")}, "lse_square_scale must be a finite number"),
    (ops.cross_entropy, {"softcap": "3"}, "softcap must be a number, got str"),
    (ops.cross_entropy, {"softcap": 10 ** 400}, "softcap must be a finite number"),
    (ops.cross_entropy, {"softcap": torch.ones(2)}, "softcap must be a number, got Tensor"),
    (ops.ldr_loss, {"lam": 0.0}, "lam must be > 0"),
    (ops.ldr_loss, {"lam": -1.0}, "lam must be > 0"),
    (ops.ldr_loss, {"lam": 1.0, "adaptive": True, "alpha": 1.0}, "alpha must be > 1"),
    (ops.spherical_z_loss, {"a": 0.0, "b": 1.0}, "a must be > 0"),
    (ops.spherical_z_loss, {"a": 1.0, "b": 1.0, "eps": -1.0}, "eps must be >= 0"),
    (ops.cross_entropy, {"label_smoothing": 1.5}, "label_smoothing must be in"),
    (ops.cross_entropy, {"softcap": 0.0}, "softcap must be None or > 0"),
    (ops.cross_entropy, {"lse_square_scale": -1e-4}, "lse_square_scale must be >= 0"),
])
def test_bad_hyperparameters(fn, kwargs, match):
    logits, target = good()
    with pytest.raises((ValueError, TypeError), match=match):
        fn(logits, target, **kwargs)


def test_other_families_refuse_non_finite_hyperparameters():
    """An infinite or NaN temperature, margin or scale had given an all-NaN loss silently."""
    x, t = torch.randn(4, 6), torch.tensor([0, 5, 2, 1])
    emb, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    inf, nan = float("inf"), float("nan")
    cases = [
        (lambda: ops.kd_loss(x, x, T=inf), "kd_loss: T must be a finite number"),
        (lambda: ops.topk_kl_loss(x, x, 2, T=nan), "topk_kl_loss: T must be a finite number"),
        (lambda: ops.pld_loss(x, x, t, T=inf), "pld_loss: T must be a finite number"),
        (lambda: ops.kd_loss(torch.tensor(1.0), torch.tensor(2.0)), "student must have a class dimension"),
        (lambda: ops.contrastive_loss(emb, emb, inf), "contrastive_loss: T must be a finite number"),
        (lambda: ops.multi_similarity_loss(emb, labels, alpha=inf), "alpha must be a finite number"),
        (lambda: ops.multi_similarity_loss(emb, labels, epsilon=nan), "epsilon must be a finite number"),
        (lambda: ops.tcm_loss(emb, labels, neg_weight=inf), "neg_weight must be a finite number"),
        (lambda: ops.anyloss(x, (x > 0).float(), L=inf), "anyloss: L must be a finite number"),
        (lambda: ops.proto_triplet_loss(emb, labels, margin=inf), "margin must be a finite number"),
        (lambda: ops.linear_cross_entropy(emb, torch.randn(5, 4), labels % 5, softcap=inf),
         "linear_cross_entropy: softcap must be a finite number"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_ops_check_hyperparameters_too():
    """The raw ops (torch.ops.fastloss.*) refuse bad scalars themselves."""
    logits, target = good()
    with pytest.raises(RuntimeError, match="tau must be >= 0"):
        torch.ops.fastloss.comp_sum_forward(logits, target, None, -100, -1.0)
    with pytest.raises(RuntimeError, match="lam must be > 0"):
        torch.ops.fastloss.ldr_forward(logits, target, None, -100, 0.0, 1.0, False, 2.0)


def test_backward_op_checks_shapes():
    logits, target = good()
    _, s0, s1 = torch.ops.fastloss.cross_entropy_forward(logits, target, None, -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[4\]"):
        torch.ops.fastloss.cross_entropy_backward(torch.ones(3), logits, target, None, s0, s1,
                                                  -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"stat0 must have shape \[4\]"):
        torch.ops.fastloss.cross_entropy_backward(torch.ones(4), logits, target, None, s0[:2], s1,
                                                  -100, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_loss_op_checks_reduction_code(requires_grad):
    logits, target = good()
    logits.requires_grad_(requires_grad)  # the autograd kernel and the plain one both check
    with pytest.raises(RuntimeError, match=r"reduction must be 0 \(none\), 1 \(mean\) or 2 \(sum\), got 3"):
        torch.ops.fastloss.stablemax_loss(logits, target, None, -100, 3)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="reduction must be 0"):
        torch.ops.fastloss.comp_sum_loss(logits.detach(), target, None, -100, -1, 1.0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", list(LOSSES))
def test_cuda_checks(name):
    """The same argument checks guard the CUDA kernels; a CPU tensor beside CUDA logits is named."""
    fn, params = LOSSES[name]
    logits, target = (t.cuda() for t in good())
    with pytest.raises(RuntimeError, match="target is on cpu but logits is on cuda"):
        fn(logits, target.cpu(), **params)
    with pytest.raises(RuntimeError, match="weight is on cpu but logits is on cuda"):
        fn(logits, target, weight=torch.ones(6), **params)
    with pytest.raises(ValueError, match=r"unbatched logits \[C\] take a 0-d target"):
        fn(logits[0], target[:1], **params)
    with pytest.raises(RuntimeError, match="logits must be float32, float16 or bfloat16"):
        fn(logits.double(), target, **params)
    with pytest.raises(RuntimeError, match="target has 3 entries but logits has 4 rows"):
        fn(logits, target[:3], **params)


def test_numpy_integers_are_taken_as_ints():
    """Integer arguments accept NumPy integers (anything with __index__ but a bool), as torch's
    own ops do: block_rows=np.int64(2) and k=np.int64(3) had been refused as not ints."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    torch.testing.assert_close(ops.topk_kl_loss(s, t, np.int64(3)), ops.topk_kl_loss(s, t, 3))
    w = torch.randn(8, 64, generator=g)
    q = ops.quantize_weight(w, np.int64(4), np.int64(32))
    assert type(q.bits) is int and type(q.group) is int and q.bits == 4 and q.group == 32
    x = torch.randn(2, 4, 20, generator=g)
    k = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(ops.dilated_conv1d(x, k, dilation=np.int32(2)), ops.dilated_conv1d(x, k, dilation=2))
    torch.testing.assert_close(ops.tcn_level(x, k, dilation=np.int64(2)), ops.tcn_level(x, k, dilation=2))
    h, W, tt = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g), torch.randint(0, 9, (6,), generator=g)
    torch.testing.assert_close(ops.linear_cross_entropy(h, W, tt, block_rows=np.int64(2)),
                               ops.linear_cross_entropy(h, W, tt, block_rows=2))
    c = torch.rand(3, 4, generator=g, dtype=torch.float64)
    assert int(ops.sinkhorn(c, eps=0.1, max_iter=np.int64(5), warn=False).n_iter) <= 5
    e, lab = torch.randn(12, 4, generator=g), torch.arange(12) % 3
    torch.testing.assert_close(ops.icnn_loss(e, lab, k=np.int64(2)), ops.icnn_loss(e, lab, k=2))
    torch.testing.assert_close(ops.contrastive_loss(e, e, block_rows=np.int64(4)), ops.contrastive_loss(e, e, block_rows=4))
    torch.testing.assert_close(ops.multi_similarity_loss(e, lab, block_rows=np.int64(5)),
                               ops.multi_similarity_loss(e, lab, block_rows=5))
    for bad in (True, 3.0):   # a bool or a float is still no int
        with pytest.raises(ValueError, match="k must be an int"):
            ops.topk_kl_loss(s, t, bad)
