"""The CPU similarity-block kernels (csrc/pair_losses/similarity_rows_*) on their own, on every
CPU kernel path: each op on a block of random similarities with awkward widths (vector tails)
and a first row inside the matrix, against float64 formulas written here (the nearest
neighbours against topk on float64 distances); the losses' torch-operation paths (used off the
CPU) against the kernel paths; TCM's sparse backward against the dense one; opcheck and bad
input."""

import pytest
import torch

import fastloss.ops.contrastive as contrastive
import fastloss.ops.few_shot as few_shot
import fastloss.ops.metric as metric
from checks import expect_errors
from conftest import requires_cuda

OPS = torch.ops.fastloss
SHAPES = [(5, 37, 3), (16, 133, 100), (1, 8, 0), (7, 300, 41)]  # rows, n, row0


def block(rows, n, row0, classes, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed * 31 + rows * 7 + n)
    s = (torch.rand(rows, n, generator=g) * 2 - 1) * spread
    labels = torch.randint(0, classes, (n,), generator=g) * 1000 - 7  # not 0..C-1: any integers
    return s, labels, OPS.pair_label_keys(labels)


def masks(s, labels, row0):
    rows, n = s.shape
    same = labels[row0:row0 + rows, None] == labels[None, :]
    self_ = torch.arange(row0, row0 + rows)[:, None] == torch.arange(n)[None, :]
    return same & ~self_, ~same


def ms_reference(s, labels, row0, alpha, beta, base, eps):
    s = s.double()
    pos, neg = masks(s, labels, row0)
    if eps is not None:
        min_pos = torch.where(pos, s, torch.inf).amin(1, keepdim=True)
        max_neg = torch.where(neg, s, -torch.inf).amax(1, keepdim=True)
        pos, neg = pos & (s - eps < max_neg), neg & (s + eps > min_pos)
    ep = torch.where(pos, torch.exp(alpha * (base - s)), 0.0)
    en = torch.where(neg, torch.exp(beta * (s - base)), 0.0)
    lp, ln = torch.log1p(ep.sum(1)), torch.log1p(en.sum(1))
    grad = -ep / (1 + ep.sum(1, keepdim=True)) + en / (1 + en.sum(1, keepdim=True))
    return lp, ln, grad


@pytest.mark.parametrize("params", [(2.0, 50.0, 0.5, 0.1), (1.0, 10.0, 0.2, None), (3.0, 80.0, -0.3, 0.4)])
@pytest.mark.parametrize("shape", SHAPES)
def test_ms_rows(cpu_isa, shape, params):
    rows, n, row0 = shape
    for classes in (1, 4, n):  # one class: no negatives; n classes: (almost) no positives
        s, labels, keys = block(rows, n, row0, classes, seed=classes)
        lp, ln, grad = ms_reference(s, labels, row0, *params)
        got = OPS.ms_rows_(s.clone(), keys, row0, *params, False)
        torch.testing.assert_close(got.double(), torch.stack([lp, ln]), rtol=2e-6, atol=1e-7)
        written = s.clone()
        got = OPS.ms_rows_(written, keys, row0, *params, True)
        torch.testing.assert_close(got.double(), torch.stack([lp, ln]), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(written.double(), grad, rtol=2e-5, atol=1e-7)


def test_ms_rows_large_exponents(cpu_isa):
    # beta (S - base) up to 400: shifted sums, no overflow to inf
    s, labels, keys = block(6, 70, 2, 5, seed=9)
    lp, ln, grad = ms_reference(s, labels, 2, 1.0, 400.0, 0.0, None)
    written = s.clone()
    got = OPS.ms_rows_(written, keys, 2, 1.0, 400.0, 0.0, None, True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), torch.stack([lp, ln]), rtol=2e-6, atol=1e-6)
    # float32 exponents near 400 are rounded to 3e-5 absolute: relative error of exp up to 3e-5
    torch.testing.assert_close(written.double(), grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("margins", [(0.9, 0.5), (0.3, -0.1), (-0.5, 0.95)], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_tcm_rows_pairs_and_grad(cpu_isa, shape, margins):
    rows, n, row0 = shape
    m_pos, m_neg = margins
    s, labels, keys = block(rows, n, row0, 3, seed=5)
    pos, neg = masks(s, labels, row0)
    hp, hn = pos & (s <= m_pos), neg & (s >= m_neg)
    sd = s.double()
    want = torch.stack([torch.where(hp, m_pos - sd, 0.0).sum(), hp.sum().double(),
                        torch.where(hn, sd - m_neg, 0.0).sum(), hn.sum().double()])
    totals, row_nnz, cols = OPS.tcm_rows(s.clone(), keys, row0, m_pos, m_neg, True)
    torch.testing.assert_close(totals, want, rtol=1e-6, atol=1e-5)
    hard = hp | hn
    assert row_nnz.tolist() == hard.sum(1).tolist()
    assert cols.tolist() == [j for i in range(rows) for j in hard[i].nonzero().flatten().tolist()]
    _, _, none = OPS.tcm_rows(s.clone(), keys, row0, m_pos, m_neg, False)
    assert none.numel() == 0
    written = s.clone()
    OPS.tcm_rows_grad_(written, keys, row0, m_pos, m_neg, torch.tensor([0.25, 1.5], dtype=torch.float64))
    torch.testing.assert_close(written, torch.where(hp, -0.25, torch.where(hn, 1.5, 0.0)).float())


@pytest.mark.parametrize("d", [1, 8, 37])
def test_pair_grad(cpu_isa, d):
    g = torch.Generator().manual_seed(d)
    n = 23
    e = torch.randn(n, d, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    keep = torch.rand(n, n, generator=g) < 0.3
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    cols = keep.nonzero()[:, 1].int()
    coef = torch.tensor([-0.7, 1.9], dtype=torch.float64)
    got = OPS.pair_grad(e, OPS.pair_label_keys(labels), row_ptr, cols, coef)
    same = labels[:, None] == labels[None, :]
    c = torch.where(keep, torch.where(same, -0.7, 1.9), 0.0).double()  # d loss / d S_ij
    want = c @ e.double() + c.t() @ e.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_clip_rows_and_grad(cpu_isa, shape, symmetric):
    rows, n, row0 = shape
    s, _, _ = block(rows, n, row0, 2, seed=7, spread=3.0)
    scale = 14.0  # similarities / T: exponents up to 42
    x = s.double() * scale
    lse_row, diag, lse_col = OPS.clip_rows(s, row0, scale, symmetric)
    torch.testing.assert_close(lse_row.double(), torch.logsumexp(x, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(diag.double(), x[torch.arange(rows), torch.arange(row0, row0 + rows)])
    if symmetric:
        torch.testing.assert_close(lse_col.double(), torch.logsumexp(x, 0), rtol=1e-6, atol=1e-5)
    else:
        assert lse_col.numel() == 0
    g = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    col = lse_col if symmetric else None
    written = s.clone()
    OPS.clip_rows_grad_(written, row0, scale, lse_row, col, g)
    gi = g.double()[row0:row0 + rows, None]
    want = gi * torch.softmax(x, 1)
    eye = (torch.arange(row0, row0 + rows)[:, None] == torch.arange(n)[None, :]).double()
    want -= gi * eye
    if symmetric:  # this block's column softmax with the given (whole-matrix) column lse
        want += g.double()[None, :] * torch.exp(x - lse_col.double()[None, :]) - gi * eye
    torch.testing.assert_close(written.double(), scale * want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_knn_rows(cpu_isa, shape, k, exclude_self):
    rows, n, row0 = shape
    k = min(k, n - 1)  # (1, 8, 0): all 7 other columns
    g = torch.Generator().manual_seed(rows + n + k)
    x, t = torch.randn(rows, 6, generator=g), torch.randn(n, 6, generator=g)
    idx = OPS.knn_rows(x @ t.t(), x.square().sum(1), t.square().sum(1), row0, exclude_self, k)
    d2 = torch.cdist(x.double(), t.double()).square()
    if exclude_self:
        d2[torch.arange(rows), torch.arange(row0, row0 + rows)] = torch.inf
    want = d2.topk(k, 1, largest=False).indices
    assert torch.equal(idx, want)


def test_knn_rows_ties_go_to_the_lower_column(cpu_isa):
    t = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [2, 0]]).repeat(4, 1)  # 20 columns, ties
    x = torch.zeros(2, 2)
    idx = OPS.knn_rows(x @ t.t(), x.square().sum(1), t.square().sum(1), 0, False, 9)
    assert idx[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10]


@pytest.mark.parametrize("d", [3, 8, 41])
def test_neighbour_dist_and_gradients(cpu_isa, d):
    g = torch.Generator().manual_seed(d)
    x, t = torch.randn(13, d, generator=g), torch.randn(9, d, generator=g)
    idx = torch.randint(0, 9, (13, 4), generator=g)
    dist = OPS.neighbour_dist(x, t, idx, 1e-6)
    x64, t64 = x.double().requires_grad_(True), t.double().requires_grad_(True)
    want = ((x64[:, None, :] - t64[idx]).square().sum(-1) + 1e-6).sqrt()
    torch.testing.assert_close(dist.double(), want.detach(), rtol=1e-6, atol=1e-6)
    up = torch.rand(13, 4, generator=g, dtype=torch.float64)
    want.backward(up)
    for mask in ([True, True], [True, False], [False, True]):
        gx, gt = OPS.neighbour_dist_backward(up.float(), x, t, idx, dist, mask)
        for got, need, ref in ((gx, mask[0], x64.grad), (gt, mask[1], t64.grad)):
            if need:
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
            else:
                assert got.numel() == 0


def test_label_keys_are_exact_or_ranks():
    small = torch.tensor([3, -(1 << 24), 1 << 24, 3])
    assert OPS.pair_label_keys(small).tolist() == [3.0, -16777216.0, 16777216.0, 3.0]
    big = torch.tensor([1 << 40, 5, (1 << 40) + 1, 5])  # not exact in float32: ranks
    assert OPS.pair_label_keys(big).tolist() == [1.0, 0.0, 2.0, 0.0]
    assert OPS.pair_label_keys(torch.zeros(0, dtype=torch.int64)).numel() == 0
    g = torch.Generator().manual_seed(4)
    many = torch.randint(-3, 40, (300,), generator=g) * (1 << 38)   # ranks, with many repeats
    assert OPS.pair_label_keys(many).tolist() == torch.unique(many, return_inverse=True)[1].float().tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_label_keys_on_cuda_are_ranks_without_a_sync():
    """On CUDA the keys are always the dense ranks, computed without reading anything back."""
    labels = torch.tensor([7, -2, 7, 1 << 40, 3, -2], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        keys = OPS.pair_label_keys(labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert keys.cpu().tolist() == [2.0, 0.0, 2.0, 3.0, 1.0, 0.0]


def test_opcheck():
    s, labels, keys = block(6, 29, 4, 3, seed=2)
    coef = torch.tensor([0.5, 2.0], dtype=torch.float64)
    e29 = torch.nn.functional.normalize(torch.randn(29, 5), dim=1)
    for op, args in [
        (OPS.pair_label_keys.default, (labels,)),
        (OPS.ms_rows_.default, (s.clone(), keys, 4, 2.0, 50.0, 0.5, 0.1, True)),
        (OPS.tcm_rows.default, (s.clone(), keys, 4, 0.3, 0.1, False)),
        (OPS.tcm_rows_grad_.default, (s.clone(), keys, 4, 0.3, 0.1, coef)),
        (OPS.clip_rows.default, (s, 4, 3.0, True)),
        (OPS.knn_rows.default, (s, torch.rand(6), torch.rand(29), 4, True, 3)),
        (OPS.neighbour_dist.default, (torch.rand(6, 3), torch.rand(5, 3), torch.randint(0, 5, (6, 2)), 1e-6)),
        (OPS.neighbour_dist_backward.default, (torch.rand(6, 2), torch.rand(6, 3), torch.rand(5, 3),
                                               torch.randint(0, 5, (6, 2)), torch.rand(6, 2) + 1, [True, True])),
        (OPS.proto_triplet_forward.default, (s[:, :5], torch.arange(6) % 3, s[:, :5], torch.arange(6) % 3, 0.5)),
        (OPS.clip_rows_grad_.default, (s.clone(), 4, 3.0, torch.rand(6), torch.rand(29), torch.rand(29))),
        (OPS.icnn_score.default, (torch.rand(6, 4) + 0.1, torch.rand(6, 4) > 0.5, 3, False)),
        (OPS.unit_rows.default, (s,)),
        (OPS.unit_rows_grad.default, (s, *OPS.unit_rows(s.t().contiguous().t()))),
        (OPS.tcm_blocks_backward.default, (e29, keys, 0.3, 0.1, 4, coef)),
        (OPS.ms_blocks.default, (e29, keys, 2.0, 50.0, 0.5, 0.1, 8, True, None)),
        (OPS.ms_blocks.default, (e29, keys, 2.0, 50.0, 0.5, None, 8, False, torch.rand(29))),
    ] + [(OPS.tcm_blocks.default, (e29, keys, 0.3, 0.1, 0.7, 1.2, block, early, max_pairs))
         for block in (8, 29) for early in (True, False) for max_pairs in (-1, 10 ** 6)]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    e, lab = s[:, :5].contiguous(), torch.arange(6) % 3
    saved = OPS.proto_triplet_forward(e, lab, e, lab, 0.5)[1:]
    for own in (False, True):
        torch.library.opcheck(OPS.proto_triplet_backward.default, (torch.tensor(0.7), e, *saved, 0.5, own),
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_input_errors_name_the_argument():
    s, labels, keys = block(4, 10, 2, 3, seed=3)
    coef = torch.tensor([1.0, 1.0], dtype=torch.float64)
    ptr = torch.tensor([0, 1] + [1] * 9, dtype=torch.int64)
    expect_errors([
        (lambda: OPS.ms_rows_(s.double(), keys, 2, 2.0, 50.0, 0.5, 0.1, False), "s must be a contiguous float32"),
        (lambda: OPS.ms_rows_(s.t(), keys, 0, 2.0, 50.0, 0.5, 0.1, False), "s must be a contiguous float32"),
        (lambda: OPS.ms_rows_(s.clone(), keys, 7, 2.0, 50.0, 0.5, 0.1, False), "rows [7, 11) of the block"),
        (lambda: OPS.ms_rows_(s.clone(), keys[:9], 2, 2.0, 50.0, 0.5, 0.1, False), "keys must be a contiguous"),
        (lambda: OPS.tcm_rows_grad_(s.clone(), keys, 2, 0.5, 0.5, coef.float()), "coef must be a contiguous"),
        (lambda: OPS.clip_rows_grad_(s.clone(), 2, 1.0, torch.rand(3), None, torch.rand(10)), "lse_row must be"),
        (lambda: OPS.pair_label_keys(labels.float()), "labels must be an integer [B] tensor"),
        (lambda: OPS.pair_grad(torch.rand(10, 3), keys, ptr, torch.tensor([10], dtype=torch.int32), coef),
         "column 10 of row 0 is not in [0, 10)"),
        (lambda: OPS.pair_grad(torch.rand(10, 3), keys, ptr[:-1], torch.tensor([1], dtype=torch.int32), coef),
         "row_ptr must be a contiguous"),
        (lambda: OPS.knn_rows(s, torch.rand(4), torch.rand(10), 2, True, 10), "k must be in [1, 9]"),
        (lambda: OPS.knn_rows(torch.rand(4, 100), torch.rand(4), torch.rand(100), 0, False, 65),
         "k must be in [1, 64]"),
        (lambda: OPS.neighbour_dist(torch.rand(4, 3), torch.rand(5, 3), torch.tensor([[0], [5], [1], [2]]), 0.0),
         "idx holds 5, not a row of t [0, 5)"),
        (lambda: OPS.neighbour_dist(torch.rand(4, 3), torch.rand(5, 2), torch.zeros(4, 1, dtype=torch.long), 0.0),
         "t has 2 features but x has 3"),
        (lambda: OPS.neighbour_dist(torch.rand(4, 3), torch.rand(5, 3), torch.zeros(3, 1, dtype=torch.long), 0.0),
         "idx must be a contiguous int64 [4, n]"),
    ])
    # past 2^24 columns the float32 hard-pair counts that size the lists could fall short of
    # the pairs written (a heap overflow through the raw op; tcm_loss's keys stop earlier)
    wide = (1 << 24) + 2
    expect_errors([(lambda: OPS.tcm_rows(torch.full((1, wide), 0.7), torch.zeros(wide), 0, 0.9, 0.5, True),
                    "at most 2^24 columns when collecting")])


# ---- the losses' torch-operation paths (CUDA) against the kernel paths, on the CPU -------------

def embeddings(b, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (b,), generator=g)
    return torch.randn(classes, d, generator=g)[labels] + torch.randn(b, d, generator=g), labels


def grads_of(f, emb):
    x = emb.clone().requires_grad_(True)
    out = f(x)
    out.backward(torch.rand(out.shape, generator=torch.Generator().manual_seed(5)) + 0.5)
    return out.detach(), x.grad


@pytest.mark.parametrize("loss", ["ms", "tcm"])
def test_torch_operation_paths_match_the_kernels(monkeypatch, loss):
    emb, labels = embeddings(45, 10, 4, seed=11)
    for reduction in ("mean", "none") if loss == "ms" else ("mean",):
        f = {"ms": lambda x: metric.multi_similarity_loss(x, labels, reduction=reduction, block_rows=7),
             "tcm": lambda x: metric.tcm_loss(x, labels, 0.5, 0.1, block_rows=7)}[loss]
        kernel = grads_of(f, emb)
        with monkeypatch.context() as m:
            m.setattr(metric, "_kernels", lambda e: False)
            torch_ops = grads_of(f, emb)
        for got, want in zip(kernel, torch_ops):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("separate_targets", [False, True])
def test_few_shot_torch_operation_paths_match_the_kernels(monkeypatch, separate_targets):
    emb, labels = embeddings(40, 9, 5, seed=4)
    other, other_labels = embeddings(23, 9, 5, seed=5)
    tgt = (other, other_labels) if separate_targets else (None, None)
    for f in (lambda x: few_shot.icnn_loss(x, labels, *tgt, k=3),
              lambda x: few_shot.proto_triplet_loss(x, labels, *tgt, margin=0.7)):
        kernel = grads_of(f, emb)
        with monkeypatch.context() as m:
            m.setattr(few_shot, "_kernels", lambda x: False)
            torch_ops = grads_of(f, emb)
        assert kernel[1].abs().sum() > 0
        for got, want in zip(kernel, torch_ops):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_contrastive_torch_operation_path_matches_the_kernels(symmetric):
    a, b = torch.nn.functional.normalize(torch.randn(2, 33, 12, generator=torch.Generator().manual_seed(3)), dim=2)
    results = []
    for apply in (lambda x, y: torch.ops.fastloss.contrastive_loss(x, y, 5.0, symmetric, 8, 0),
                  lambda x, y: contrastive._Contrastive.apply(x, y, None, 5.0, symmetric, 8)):
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = apply(x, y)
        out.backward(torch.rand(33, generator=torch.Generator().manual_seed(1)))
        results.append((out.detach(), x.grad, y.grad))
    for got, want in zip(*results):  # float32 rounding of different summation orders
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item())


# margins with few hard pairs here (282 and 98 of the 306 a list may hold; the defaults give 1344)
@pytest.mark.parametrize("margins", [(0.3, 0.8), (0.0, 0.9)], ids=str)
def test_tcm_sparse_backward_matches_the_dense_one(monkeypatch, margins):
    emb, labels = embeddings(70, 6, 5, seed=2)
    f = lambda x: metric.tcm_loss(x, labels, *margins, 0.6, 1.7, block_rows=16)  # noqa: E731
    # the pair list is short enough here, so the first run goes through it
    e, keys = torch.nn.functional.normalize(emb, dim=1), OPS.pair_label_keys(labels)
    row_ptr = OPS.tcm_blocks(e, keys, *margins, 0.6, 1.7, 16, True, 70 * 70 // metric._SPARSE_FRACTION)[2]
    assert row_ptr.numel() == 71
    sparse = grads_of(f, emb)
    monkeypatch.setattr(metric, "_SPARSE_FRACTION", 10 ** 9)  # no pair list: blocks again
    dense = grads_of(f, emb)
    assert sparse[1].abs().sum() > 0
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def tcm_grad_reference(e, labels, margins, weights):
    """TCM's totals and its gradient for E (upstream 1) from the float64 similarities of e."""
    ed = e.double()
    sd = ed @ ed.t()
    n = e.shape[0]
    same = labels[:, None] == labels[None, :]
    hp = same & ~torch.eye(n, dtype=torch.bool) & (sd <= margins[0])
    hn = ~same & (sd >= margins[1])
    totals = torch.stack([torch.where(hp, margins[0] - sd, 0.0).sum(), hp.sum().double(),
                          torch.where(hn, sd - margins[1], 0.0).sum(), hn.sum().double()])
    c_pos, c_neg = weights[0] / max(hp.sum().item(), 1), weights[1] / max(hn.sum().item(), 1)
    ds = torch.where(hp, -c_pos, torch.where(hn, c_neg, 0.0)).double()
    return totals, (ds + ds.t()) @ ed


@pytest.mark.parametrize("margins", [(0.9, 0.5), (0.2, -0.3)], ids=str)
def test_tcm_blocks_every_path(margins):
    """tcm_blocks' four ways to the gradient (one block: from the block in hand or from the pair
    list; several blocks: the pair list through pair_grad, or tcm_blocks_backward forming the
    blocks again) against the float64 formula."""
    emb, labels = embeddings(70, 6, 5, seed=2)
    e = torch.nn.functional.normalize(emb, dim=1)
    keys = OPS.pair_label_keys(labels)
    weights = (0.6, 1.7)
    want_totals, want = tcm_grad_reference(e, labels, margins, weights)
    assert want.abs().sum() > 0
    check = lambda got: torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # noqa: E731
    for max_pairs in (10 ** 9, -1):  # one block: with and without the pair list
        totals, grad, row_ptr, cols = OPS.tcm_blocks(e, keys, *margins, *weights, 70, True, max_pairs)
        torch.testing.assert_close(totals, want_totals, rtol=1e-6, atol=1e-5)
        assert row_ptr.numel() == 0 and cols.numel() == 0
        check(grad)
    coef = torch.tensor([weights[0] / max(want_totals[1].item(), 1),
                         weights[1] / max(want_totals[3].item(), 1)], dtype=torch.float64)
    totals, grad, row_ptr, cols = OPS.tcm_blocks(e, keys, *margins, *weights, 16, True, 10 ** 9)
    torch.testing.assert_close(totals, want_totals, rtol=1e-6, atol=1e-5)
    assert grad.numel() == 0 and row_ptr.numel() == 71 and cols.numel() == row_ptr[-1].item() > 0
    check(OPS.pair_grad(e, keys, row_ptr, cols, coef * torch.tensor([-1.0, 1.0], dtype=torch.float64)))
    # more pairs than allowed: no list
    _, _, row_ptr, cols = OPS.tcm_blocks(e, keys, *margins, *weights, 16, True, cols.numel() - 1)
    assert row_ptr.numel() == 0 and cols.numel() == 0
    check(OPS.tcm_blocks_backward(e, keys, *margins, 16, coef))


@pytest.mark.parametrize("d", [1, 7, 8, 37])
def test_unit_rows_and_grad(d):
    """unit_rows / unit_rows_grad against F.normalize in float64 and its autograd, with a zero
    row (its norm clamped to 1e-12) among them."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(9, d, generator=g) * torch.rand(9, 1, generator=g) * 3
    x[4] = 0
    e, norms = OPS.unit_rows(x)
    x64 = x.double().requires_grad_(True)
    want = torch.nn.functional.normalize(x64, dim=1)
    torch.testing.assert_close(e.double(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norms.double(), x64.detach().norm(dim=1), rtol=1e-6, atol=0)
    up = torch.randn(9, d, generator=g, dtype=torch.float64)
    want.backward(up)
    got = OPS.unit_rows_grad(up.float(), e, norms)
    torch.testing.assert_close(got[4].double(), x64.grad[4], rtol=1e-6, atol=0)  # up / 1e-12
    scale = (up / x64.detach().norm(dim=1, keepdim=True).clamp_min(1e-12))[torch.arange(9) != 4].abs().max()
    torch.testing.assert_close(got.double(), x64.grad, rtol=1e-5, atol=1e-6 * scale.item())
    # rows read at a stride (a slice of wider rows, every other row) or copied first (a column
    # stride): the same results
    wide = torch.cat([x, torch.randn(9, 3, generator=g)], 1)
    for view in (wide[:, :d], torch.stack([x, x], 1).view(18, d)[::2], x.t().contiguous().t()):
        ve, vn = OPS.unit_rows(view)
        assert torch.equal(ve, e) and torch.equal(vn, norms)
    # the torch form (off the CPU) gives the same
    te, tn = metric._unit_rows(x.double())
    torch.testing.assert_close(te.float(), e)
    torch.testing.assert_close(metric._unit_rows_grad(up, te, tn).float(), got, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("loss", ["ms", "ms_none", "ms_one_block", "tcm", "tcm_one_block", "clip",
                                  "clip_one_way"])
def test_cuda_kernels_match_the_cpu(loss):
    """The CUDA similarity-block kernels (through the losses) against the CPU kernels."""
    emb, labels = embeddings(300, 24, 7, seed=8)
    other = torch.nn.functional.normalize(embeddings(300, 24, 7, seed=9)[0], dim=1)
    f = {"ms": lambda x, y, o: metric.multi_similarity_loss(x, y, block_rows=64),
         "ms_none": lambda x, y, o: metric.multi_similarity_loss(x, y, reduction="none", block_rows=64),
         "ms_one_block": lambda x, y, o: metric.multi_similarity_loss(x, y),  # (dS + dS^T) E
         "tcm": lambda x, y, o: metric.tcm_loss(x, y, 0.5, 0.1, block_rows=64),
         "tcm_one_block": lambda x, y, o: metric.tcm_loss(x, y, 0.5, 0.1),  # gradient in the forward
         "clip": lambda x, y, o: contrastive.contrastive_loss(torch.nn.functional.normalize(x, dim=1), o,
                                                             0.1, block_rows=100),
         "clip_one_way": lambda x, y, o: contrastive.contrastive_loss(
             torch.nn.functional.normalize(x, dim=1), o, 0.1, symmetric=False, block_rows=100)}[loss]
    results = []
    for dev in ("cpu", "cuda"):
        x = emb.detach().to(dev).requires_grad_(True)
        out = f(x, labels.to(dev), other.to(dev))
        out.backward(torch.rand(out.shape, generator=torch.Generator().manual_seed(5)).to(dev) + 0.5)
        results.append((out.detach().cpu(), x.grad.cpu()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_nan_and_empty_edges(cpu_isa):
    # a NaN similarity makes its anchor's Multi-Similarity loss and gradient row NaN (as the
    # torch path and pytorch-metric-learning), on every path, the other rows untouched
    s, labels, keys = block(4, 37, 2, 3, seed=12)
    s[1, 30] = float("nan")
    written = s.clone()
    got = OPS.ms_rows_(written, keys, 2, 2.0, 50.0, 0.5, 0.1, True)
    assert got[:, 1].isnan().all() and written[1].isnan().all()
    clean = torch.cat([s[:1], s[2:]])
    lp, ln, _ = ms_reference(s, labels, 2, 2.0, 50.0, 0.5, 0.1)
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(got[:, keep].double(), torch.stack([lp, ln])[:, keep], rtol=2e-6, atol=1e-7)
    assert torch.isfinite(written[keep]).all() and clean.isfinite().all()
    # a NaN distance never counts as near, whatever its column's place in the vectors
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 4, generator=g), torch.randn(20, 4, generator=g)
    for col in (2, 19):
        tn = t.clone()
        tn[col] = float("nan")
        d2 = torch.cdist(x.double(), tn.double()).nan_to_num(float("inf"))
        idx = OPS.knn_rows(x @ tn.t(), x.square().sum(1), tn.square().sum(1), 0, False, 3)
        assert torch.equal(idx, d2.topk(3, largest=False).indices), col
    # no rows: the column log-sum-exps of an empty block are -inf
    _, _, lse_col = OPS.clip_rows(torch.empty(0, 5), 0, 1.0, True)
    assert torch.equal(lse_col, torch.full((5,), float("-inf")))


def test_proto_labels_of_other_integer_dtypes_are_checked_exactly():
    e = torch.randn(6, 3)
    support_labels = torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int32)
    query_labels = torch.tensor([0, 1, 2, 1 << 32])   # 2^32 wraps to 0 in int32: not a class
    with pytest.raises(RuntimeError, match="every query label must be a class of the support"):
        few_shot.proto_triplet_loss(e[:4], query_labels, e, support_labels)
    ok = few_shot.proto_triplet_loss(e[:4], torch.tensor([0, 1, 2, 1]), e, support_labels)
    assert torch.isfinite(ok)


def test_contrastive_backward_checks_its_arguments():
    a = torch.randn(4, 3)
    lse = torch.zeros(4)
    expect_errors([
        (lambda: OPS.contrastive_backward(torch.ones(4), a, a, lse, lse, torch.empty(0, 0), 1.0, True, 0,
                                          [True, True]), "block_rows must be >= 1, got 0"),
        (lambda: OPS.contrastive_backward(torch.ones(3), a, a, lse, lse, torch.empty(0, 0), 1.0, True, 2,
                                          [True, True]), "grad_rows must be [4]"),
        (lambda: OPS.contrastive_backward(torch.ones(4), a, a, lse, torch.zeros(3), torch.empty(0, 0), 1.0,
                                          True, 2, [True, True]), "lse_col must be [4]"),
    ])
