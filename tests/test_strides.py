"""Non-contiguous inputs (transposed views, every other row or column) of the embedding, metric and
transport losses give the loss and gradients of their contiguous copies: the ops read strides or
copy, and either way the numbers must not change. (Each op's contiguous results are tested
against float64 references in its own file; the row losses, distillation and TCN test their
strided inputs there.)"""

import pytest
import torch

from fastloss import ops


def strided(x):
    """A copy of the 2-D x [N, D] in every other row of a column-major [2N, D] buffer: the same
    values, strides (2, 2N): neither contiguous nor with unit stride in either dimension."""
    view = torch.empty(x.shape[1], 2 * x.shape[0], dtype=x.dtype).t()[::2]
    view.copy_(x)
    assert not view.is_contiguous() and 1 not in view.stride() and torch.equal(view, x)
    return view


def same_as_contiguous(fn, *tensors, tol=1e-6):
    """fn on strided copies of `tensors` and on contiguous ones: equal losses and gradients."""
    results = []
    for make in (strided, lambda t: t.clone()):
        leaves = [make(t).requires_grad_(True) for t in tensors]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), *[x.grad for x in leaves]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def data(n=37, d=10, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    emb = 0.3 * torch.randn(classes, d, generator=g)[labels] + torch.randn(n, d, generator=g)
    return emb, labels, g


def test_embedding_losses():
    emb, labels, g = data()
    other = torch.randn(emb.shape, generator=g)
    weights = torch.rand(emb.shape[0], emb.shape[0], generator=g)
    same_as_contiguous(lambda a, b: ops.contrastive_loss(a, b, 0.1), emb, other)
    same_as_contiguous(lambda a, b: ops.contrastive_loss(a, b, 0.1, weights, False), emb, other)
    same_as_contiguous(lambda e: ops.multi_similarity_loss(e, labels), emb)
    same_as_contiguous(lambda e: ops.multi_similarity_loss(e, labels, epsilon=None, block_rows=8), emb)
    same_as_contiguous(lambda e: ops.tcm_loss(e, labels, 0.3, 0.1), emb)
    same_as_contiguous(lambda e: ops.proto_triplet_loss(e, labels, margin=2.0), emb)
    same_as_contiguous(lambda e, s: ops.proto_triplet_loss(e, labels, s, labels, 2.0), emb, other)
    same_as_contiguous(lambda e: ops.icnn_loss(e, labels, k=3), emb)
    same_as_contiguous(lambda e, t: ops.icnn_loss(e, labels, t, labels, k=3), emb, other)


@pytest.mark.parametrize("shape", [(40, 3), (40, 1)], ids=["multilabel", "one_column"])
def test_metric_losses(shape):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*shape, generator=g)
    target = (torch.rand(*shape, generator=g) < 0.4).float()
    same_as_contiguous(lambda x: ops.anyloss(x, target, "f1"), logits)
    same_as_contiguous(lambda x: ops.anyloss(x, target, "gmean", from_logits=False), torch.sigmoid(logits))
    classes = torch.randint(0, shape[1], (shape[0],), generator=g)
    if shape[1] > 1:  # multi-class Dice over the softmax of each row
        same_as_contiguous(lambda x: ops.dice_loss(x, classes, alpha=0.5), logits)


@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_transport(method):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(23, 4, generator=g, dtype=torch.float64)
    a = torch.rand(30, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(23, generator=g, dtype=torch.float64) + 0.5
    a, b = a / a.sum(), b / b.sum()
    cost = torch.cdist(x, y) ** 2
    kw = dict(eps=0.5, method=method, tol=1e-10, max_iter=5000)
    same_as_contiguous(lambda c: ops.sinkhorn(c, a, b, **kw).cost, cost, tol=1e-8)
    same_as_contiguous(lambda p, q: ops.wasserstein(p, q, a, b, **kw), x, y, tol=1e-8)
