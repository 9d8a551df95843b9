"""No op waits for the GPU where it does not have to: forward + backward on CUDA under
torch.cuda.set_sync_debug_mode("error"), which raises at any synchronising call (an .item(), a
copy to the host). A wait in a loss stalls a training step: the host cannot queue the next
kernels until the GPU has caught up.

Left out on purpose (their results' shapes or control flow depend on values): tcm_loss (the
list of hard pairs), proto_triplet_loss / icnn_loss (the number of support classes), sinkhorn
(convergence checks). grad_in_forward's backward scales its saved gradient on the device
unless the incoming gradient is exactly 1 (scale_rows_unless_one_cuda) since session 15; it
read that gradient on the host before.
"""

import pytest
import torch

from fastloss import ops

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


_MOVED = {}


def _on_device(qw, device):
    """The packed weight on `device`, copied once (by the first, unchecked call)."""
    if id(qw) not in _MOVED:
        _MOVED[id(qw)] = (qw, qw.to(device))
    return _MOVED[id(qw)][1]


def _cases():
    g = torch.Generator().manual_seed(0)
    n, c = 64, 1000
    logits = torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    teacher = torch.randn(n, c, generator=g)
    emb, emb2 = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    labels = torch.randint(0, 6, (n,), generator=g)
    qw = ops.quantize_weight(torch.randn(96, 256, generator=g) * 0.1, 4, 128)
    return {
        "cross_entropy": ((logits, target), lambda x, t: ops.cross_entropy(x, t)),
        "comp_sum_loss": ((logits, target), lambda x, t: ops.comp_sum_loss(x, t, 1.5)),
        "ldr_loss": ((logits, target), lambda x, t: ops.ldr_loss(x, t, 1.0)),
        "spherical_z_loss": ((logits, target), lambda x, t: ops.spherical_z_loss(x, t, 1.0, 2.0)),
        "stablemax_cross_entropy": ((logits, target), lambda x, t: ops.stablemax_cross_entropy(x, t)),
        "kd_loss": ((logits, teacher), lambda x, t: ops.kd_loss(x, t, 2.0)),
        "topk_kl_loss": ((logits, teacher), lambda x, t: ops.topk_kl_loss(x, t, 8, 2.0)),
        "pld_loss": ((logits, teacher, target), lambda x, t, y: ops.pld_loss(x, t, y, 2.0)),
        "dice_loss": ((logits[:, :10], target % 10), lambda x, t: ops.dice_loss(x, t)),
        "anyloss": ((logits[:, 0], (target % 2).float()), lambda x, t: ops.anyloss(x, t)),
        "mw_auc_loss": ((logits[0, :50], logits[1, :70]), lambda p, q: ops.mw_auc_loss(p, q)),
        "contrastive_loss": ((emb, emb2), lambda a, b: ops.contrastive_loss(a, b)),
        "contrastive_loss_learnt_T": ((emb, emb2, torch.tensor(0.1)),  # (T's gradient too)
                                      lambda a, b, t: ops.contrastive_loss(a, b, t.requires_grad_())),
        "multi_similarity_loss": ((emb, labels), lambda e, y: ops.multi_similarity_loss(e, y)),
        "dequant_gemm": ((torch.randn(4, 256, generator=g).half(),),
                         lambda x: ops.dequant_gemm(x, _on_device(qw, x.device)).float().sum()),
        "linear_cross_entropy": ((emb, torch.randn(500, 32, generator=g), target % 500),
                                 lambda h, w, y: ops.linear_cross_entropy(h, w, y)),
        "linear_cross_entropy_low_memory": ((emb, torch.randn(500, 32, generator=g), target % 500),
                                            lambda h, w, y: ops.linear_cross_entropy(h, w, y, low_memory=True)),
        "cross_entropy_weighted_ignore_sum": (
            (logits, torch.where(target % 7 == 0, -100, target), torch.rand(c, generator=g) + 0.5),
            lambda x, t, w: ops.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction="sum")),
        "cross_entropy_none_softcap": ((logits, target),
                                       lambda x, t: ops.cross_entropy(x, t, reduction="none", softcap=30.0).sum()),
        "cross_entropy_grad_in_forward": ((logits, target),
                                          lambda x, t: ops.cross_entropy(x, t, grad_in_forward=True) * 2.0),
        "cross_entropy_grad_in_forward_inplace": (
            (logits, target),
            lambda x, t: ops.cross_entropy(x * 1.0, t, grad_in_forward=True, inplace_backward=True) * 2.0),
        "cross_entropy_grad_in_forward_none": (
            (logits, target), lambda x, t: ops.cross_entropy(x, t, reduction="none", grad_in_forward=True).sum()),
        "dilated_conv1d": ((torch.randn(2, 8, 300, generator=g), torch.randn(8, 3, generator=g)),
                           lambda x, w: ops.dilated_conv1d(x, w, dilation=4).square().sum()),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_forward_and_backward_do_not_wait_for_the_gpu(name):
    inputs, fn = _cases()[name]
    xs = [t.cuda() for t in inputs]
    xs[0].requires_grad_(True)

    def step():
        xs[0].grad = None
        fn(*xs).backward()

    step()  # first call: lazy initialisation (cuBLAS handles, the caching allocator) may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert xs[0].grad is not None and bool(torch.isfinite(xs[0].grad).all())
