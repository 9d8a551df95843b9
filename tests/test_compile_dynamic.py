"""One torch.compile graph for every batch size: each loss compiled with dynamic=True and
fullgraph=True runs batches of three sizes, forward and backward, without recompiling
(torch._dynamo's error_on_recompile), and gives eager's values and gradients.

An int read of a traced size in an op's C++ autograd formula, or an `int` schema argument
derived from the batch size, fixes that size into the graph: every new batch size then
recompiled (after 8, fullgraph=True raised; without it, eager ran silently). The formulas
read sizes as SymInts (sym_size) and block_rows is a SymInt in the schemas that take it."""

import pytest
import torch

from fastloss import ops


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed))


def _ints(high, n, seed):
    return torch.randint(0, high, (n,), generator=_gen(seed))


# name -> (loss(*leaves, *others), inputs(n): (leaves, others))
CASES = {
    "cross_entropy": (lambda x, t: ops.cross_entropy(x, t, label_smoothing=0.1),
                      lambda n: ([_randn(n, 13, seed=n)], [_ints(13, n, n + 1)])),
    "cross_entropy_none": (lambda x, t: ops.cross_entropy(x, t, reduction="none"),
                           lambda n: ([_randn(n, 13, seed=n)], [_ints(13, n, n + 1)])),
    "comp_sum_loss_weighted": (lambda x, t, w: ops.comp_sum_loss(x, t, tau=1.5, weight=w),
                               lambda n: ([_randn(n, 13, seed=n)], [_ints(13, n, n + 1), _randn(13, seed=1).abs()])),
    "kd_loss": (lambda s, t: ops.kd_loss(s, t, T=2.0),
                lambda n: ([_randn(n, 13, seed=n)], [_randn(n, 13, seed=n + 1)])),
    "topk_kl_loss": (lambda s, t: ops.topk_kl_loss(s, t, k=4),
                     lambda n: ([_randn(n, 13, seed=n)], [_randn(n, 13, seed=n + 1)])),
    "pld_loss": (lambda s, t, y: ops.pld_loss(s, t, y),
                 lambda n: ([_randn(n, 13, seed=n)], [_randn(n, 13, seed=n + 1), _ints(13, n, n + 2)])),
    "dice_loss": (lambda x, t: ops.dice_loss(x, t, alpha=0.5),
                  lambda n: ([_randn(n, 13, seed=n)], [_ints(13, n, n + 1)])),
    "anyloss": (lambda x, y: ops.anyloss(x, y),
                lambda n: ([_randn(n, 3, seed=n)], [(_randn(n, 3, seed=n + 1) > 0).float()])),
    "mw_auc_loss": (lambda p, q: ops.mw_auc_loss(p, q),
                    lambda n: ([_randn(n, 7, seed=n), _randn(n, 5, seed=n + 1)], [])),
    "contrastive_loss": (lambda a, b: ops.contrastive_loss(a, b, T=0.2),
                         lambda n: ([_randn(n, 8, seed=n), _randn(n, 8, seed=n + 1)], [])),
    "multi_similarity_loss": (lambda e, y: ops.multi_similarity_loss(e, y),
                              lambda n: ([_randn(n, 8, seed=n)], [_ints(3, n, n + 1)])),
    "tcm_loss": (lambda e, y: ops.tcm_loss(e, y, pos_margin=0.3, neg_margin=0.0),
                 lambda n: ([_randn(n, 8, seed=n)], [_ints(3, n, n + 1)])),
    "linear_cross_entropy": (lambda h, w, t: ops.linear_cross_entropy(h, w, t),
                             lambda n: ([_randn(n, 8, seed=n), _randn(20, 8, seed=3)], [_ints(20, n, n + 1)])),
    # (its neighbour search had looped over row blocks in Python: one graph per size)
    "icnn_loss": (lambda e, y: ops.icnn_loss(e, y, k=3),
                  lambda n: ([_randn(n, 8, seed=n)], [_ints(3, n, n + 1)])),
    "proto_triplet_loss": (lambda e, y: ops.proto_triplet_loss(e, y),
                           lambda n: ([_randn(n, 8, seed=n)], [torch.arange(n) % 3])),
    # (dynamo had failed to wire the vocabulary size kept on its autograd.Function's ctx)
    "linear_cross_entropy_low_memory": (
        lambda h, w, t: ops.linear_cross_entropy(h, w, t, label_smoothing=0.1, low_memory=True),
        lambda n: ([_randn(n, 8, seed=n), _randn(20, 8, seed=3)], [_ints(20, n, n + 1)])),
}


@pytest.fixture
def no_recompiles():
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config
    torch._dynamo.reset()
    # (a graph cached by an earlier build brings back that build's guards: no caches)
    with torch._dynamo.config.patch(error_on_recompile=True), \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", list(CASES))
def test_one_graph_serves_every_batch_size(case, no_recompiles):
    loss, make = CASES[case]
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (9, 17, 30):
        leaves, others = make(n)
        mine = [x.clone().requires_grad_(True) for x in leaves]
        theirs = [x.clone().requires_grad_(True) for x in leaves]
        got, want = compiled(*mine, *others), loss(*theirs, *others)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for x, y in zip(mine, theirs):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
