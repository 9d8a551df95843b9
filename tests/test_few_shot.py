"""The SuSana Distancia losses (Proto-Triplet, ICNN) against float64 references written row by
row from their definitions: values and gradients (embeddings and support), clipping of k,
separate target sets, half precision, compile, bad input."""

import pytest
import torch

from fastloss import ops
from fastloss.reference import few_shot as ref
from checks import assert_compiled_matches, expect_errors
from conftest import requires_cuda


def episode(n, d, classes, seed=0, dtype=torch.float32, centre=1.0):
    """Embeddings around random class centres (scaled by `centre`: small values make the
    classes overlap) with noise 0.9."""
    g = torch.Generator().manual_seed(seed * 41 + n * 7 + d + classes)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    emb = centre * torch.randn(classes, d, generator=g)[labels] + 0.9 * torch.randn(n, d, generator=g)
    return emb.to(dtype), labels


def grads_close(fn, ref_fn, tensors, rtol=1e-5, atol=1e-7, device="cpu"):
    ins = [t.detach().to(device, copy=True).requires_grad_(True) for t in tensors]
    ref_ins = [t.double().requires_grad_(True) for t in tensors]
    got, want = fn(*ins), ref_fn(*ref_ins)
    got.backward()
    want.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=atol)
    for a, e in zip(ins, ref_ins):
        torch.testing.assert_close(a.grad.double().cpu(), e.grad, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("sizes", [(6, 3, 2), (25, 17, 5), (80, 64, 11), (301, 13, 23)], ids=str)
def test_proto_triplet_matches_reference(sizes, margin):
    """(301 queries: the CPU backward's queries in parts of their own prototype buffers, one
    per thread, summed after.)"""
    n, d, classes = sizes
    q, ql = episode(n, d, classes, seed=1)
    s, sl = episode(2 * classes + 1, d, classes, seed=2)
    grads_close(lambda a, b: ops.proto_triplet_loss(a, ql, b, sl, margin),
                lambda a, b: ref.proto_triplet_loss(a, ql, b, sl, margin), [q, s])
    # the query set as its own support, classes overlapping so that some hinges are active at
    # every size and margin (well-separated classes had left the loss and gradient 0)
    e, el = episode(n, d, classes, seed=1, centre=0.15)
    assert float(ref.proto_triplet_loss(e.double(), el, margin=margin)) > 0
    grads_close(lambda a: ops.proto_triplet_loss(a, el, margin=margin),
                lambda a: ref.proto_triplet_loss(a, el, margin=margin), [e])


@pytest.mark.parametrize("args", [{}, {"k": 1}, {"k": 3, "num_neighbors": 7}, {"k": 50}], ids=str)
@pytest.mark.parametrize("sizes", [(3, 4, 2), (23, 8, 4), (70, 32, 9)], ids=str)
def test_icnn_matches_reference(sizes, args):
    n, d, classes = sizes
    e, lab = episode(n, d, classes, seed=3)
    own = dict(args)
    if "num_neighbors" in own:  # at most the set's other members (k is clipped to n - 2 there)
        own["num_neighbors"] = min(own["num_neighbors"], n - 1)
    grads_close(lambda a: ops.icnn_loss(a, lab, **own), lambda a: ref.icnn_loss(a, lab, **own), [e])
    t, tl = episode(2 * classes + 3, d, classes, seed=4)
    grads_close(lambda a, b: ops.icnn_loss(a, lab, b, tl, **args),
                lambda a, b: ref.icnn_loss(a, lab, b, tl, **args), [e, t])


def test_icnn_no_other_class_neighbour_and_well_separated_classes():
    # one class only: lambda_dc is 1 by definition
    e, _ = episode(12, 5, 1, seed=5)
    lab = torch.zeros(12, dtype=torch.long)
    grads_close(lambda a: ops.icnn_loss(a, lab, k=3), lambda a: ref.icnn_loss(a, lab, k=3), [e])
    # far apart tight classes score near 1 (loss near 0); mixed ones score lower
    lab = torch.arange(40) % 4
    tight = torch.eye(4, 16)[lab] * 100 + 0.01 * torch.randn(40, 16)
    mixed = torch.randn(40, 16)
    assert ops.icnn_loss(tight, lab) < 0.3 < ops.icnn_loss(mixed, lab)


def test_icnn_embeddings_far_from_the_origin():
    """Embeddings sharing an offset 1000x their spread: the neighbours (found by GEMM-form
    distances, |a|^2 + |b|^2 - 2 a.b) are those of the float64 reference (they had not been:
    1.1327 against 1.1558 at offset 10, spread 0.01), with or without a separate target set."""
    g = torch.Generator().manual_seed(32)
    lab = torch.randint(0, 3, (40,), generator=g)
    e = 10 + 0.01 * torch.randn(40, 8, generator=g)
    t = 10 + 0.01 * torch.randn(15, 8, generator=g)
    tl = torch.arange(15) % 3
    grads_close(lambda a: ops.icnn_loss(a, lab, k=4), lambda a: ref.icnn_loss(a, lab, k=4), [e])
    grads_close(lambda a, b: ops.icnn_loss(a, lab, b, tl, k=4),
                lambda a, b: ref.icnn_loss(a, lab, b, tl, k=4), [e, t])


@pytest.mark.parametrize("seed", range(4))
def test_icnn_duplicated_embeddings(seed):
    """Exact duplicates make equal distances: a tied minimum (delta) or maximum (the largest
    other-class distance) is a kink, whose gradient the op shares equally among the ties, as
    torch's amin / amax do (and the reference with them). The reference's Python min / max had
    given it all to the first tie: the same sum per duplicate group, a different split."""
    g = torch.Generator().manual_seed(100 + seed)
    e = torch.randn(24, 8, generator=g)
    e[5] = e[11] = e[3]
    e[17] = e[2]
    lab = torch.randint(0, 4, (24,), generator=g)
    grads_close(lambda a: ops.icnn_loss(a, lab, k=4), lambda a: ref.icnn_loss(a, lab, k=4), [e])
    t = torch.cat([e[:6], e[:6]])  # a target set of duplicated pairs
    tl = torch.randint(0, 4, (12,), generator=g)
    grads_close(lambda a, b: ops.icnn_loss(a, lab, b, tl, k=4),
                lambda a, b: ref.icnn_loss(a, lab, b, tl, k=4), [e, t])


def test_proto_triplet_embeddings_far_from_the_origin():
    """Queries and prototypes sharing an offset 1000x their spread: each query's nearest other
    prototype (by ||c||^2 - 2 <q, c>) is the float64 reference's (27 of 64 had been wrong at
    offset 10, spread 0.01), on both CPU paths (the loops for a small label range, the torch
    operations for labels spread wide)."""
    g = torch.Generator().manual_seed(33)
    lab = torch.arange(64) % 8
    e = 10 + 0.01 * torch.randn(64, 16, generator=g)
    grads_close(lambda a: ops.proto_triplet_loss(a, lab, margin=0.001),
                lambda a: ref.proto_triplet_loss(a, lab, margin=0.001), [e], rtol=1e-4, atol=1e-6)
    wide = lab * 1_000_003  # a label range too wide for the loop path
    grads_close(lambda a: ops.proto_triplet_loss(a, wide, margin=0.001),
                lambda a: ref.proto_triplet_loss(a, wide, margin=0.001), [e], rtol=1e-4, atol=1e-6)


def test_proto_triplet_label_ranges_and_backward_checks():
    """Labels spanning a small range take the CPU loops (proto_triplet.cpp), a huge span
    torch.unique: same loss and gradients; the backward op refuses indices that are not the
    forward's (it is a public op)."""
    q, ql = episode(40, 9, 5, seed=7)
    s, sl = episode(23, 9, 5, seed=8)
    far = (ql - 2) * 10**12, (sl - 2) * 10**12  # negative, huge and sparse labels
    results = []
    for labels in ((ql, sl), far):
        x, y = q.clone().requires_grad_(True), s.clone().requires_grad_(True)
        loss = ops.proto_triplet_loss(x, labels[0], y, labels[1], 0.4)
        loss.backward()
        results.append((loss.detach(), x.grad, y.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    grads_close(lambda a, b: ops.proto_triplet_loss(a, far[0], b, far[1], 0.4),
                lambda a, b: ref.proto_triplet_loss(a, far[0], b, far[1], 0.4), [q, s])
    out = torch.ops.fastloss.proto_triplet_forward(q, ql, s, sl, 0.4)
    bad = out[2].clone()
    bad[3, 1] = 5
    expect_errors([
        (lambda: torch.ops.fastloss.proto_triplet_backward(torch.tensor(1.0), q, out[1], bad, out[3], out[4],
                                                           out[5], 0.4), "a class index outside [0, 5)"),
        (lambda: torch.ops.fastloss.proto_triplet_backward(torch.tensor(1.0), q[:3], *out[1:], 0.4),
         "must be proto_triplet_forward's outputs"),
        (lambda: torch.ops.fastloss.proto_triplet_backward(torch.tensor(1.0), q, *out[1:], 0.4, True),
         "own needs the support to be the query set (40 rows), got 23 support rows"),
        (lambda: torch.ops.fastloss.proto_triplet_forward(q, ql[:3], s, sl, 0.4),
         "query_labels must be [40] and support_labels [23] CPU tensors"),
    ])


@pytest.mark.cuda
@requires_cuda
def test_cuda_matches_reference():
    """The CUDA path (the chosen-pair and ICNN score kernels of neighbours_cuda.cu, the
    Proto-Triplet op over them; neighbour search by cdist + topk) against the float64
    references, with the labels on the GPU too."""
    for n, d, classes in ((25, 17, 5), (70, 32, 9)):
        q, ql = episode(n, d, classes, seed=1)
        s, sl = episode(2 * classes + 1, d, classes, seed=2)
        qlc, slc = ql.cuda(), sl.cuda()
        grads_close(lambda a, b: ops.proto_triplet_loss(a, qlc, b, slc, 0.5),
                    lambda a, b: ref.proto_triplet_loss(a, ql, b, sl, 0.5), [q, s], device="cuda")
        for args in ({}, {"k": 3, "num_neighbors": 7}, {"k": 50}):
            grads_close(lambda a: ops.icnn_loss(a, qlc, **args), lambda a: ref.icnn_loss(a, ql, **args), [q],
                        device="cuda")
            grads_close(lambda a, b: ops.icnn_loss(a, qlc, b, slc, **args),
                        lambda a, b: ref.icnn_loss(a, ql, b, sl, **args), [q, s], device="cuda")
    e, _ = episode(12, 5, 1, seed=5)
    one = torch.zeros(12, dtype=torch.long)
    grads_close(lambda a: ops.icnn_loss(a, one.cuda(), k=3), lambda a: ref.icnn_loss(a, one, k=3), [e],
                device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(dtype):
    """16-bit embeddings: the ops compute in float32 from the rounded inputs, so against the
    float64 reference on the same rounded inputs only the results' rounding to the dtype
    differs (2^-8 / 2^-11 relative); losses and gradients. Margin 3: every hinge active."""
    e, lab = episode(30, 16, 5, seed=6)
    x = e.to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for fn, ref_fn in ((lambda a: ops.icnn_loss(a, lab), lambda a: ref.icnn_loss(a, lab)),
                       (lambda a: ops.proto_triplet_loss(a, lab, margin=3.0),
                        lambda a: ref.proto_triplet_loss(a, lab, margin=3.0))):
        got_in, want_in = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        got, want = fn(got_in), ref_fn(want_in)
        assert got.dtype == dtype and float(want.detach()) > 0.1
        got.backward()
        want.backward()
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=0)
        scale = float(want_in.grad.abs().max())
        assert scale > 0
        torch.testing.assert_close(got_in.grad.double(), want_in.grad, rtol=tol, atol=tol * scale)


def test_compile():
    e, lab = episode(30, 16, 5, seed=6)
    # fullgraph: the query set as its own support is passed once (torch.compile refuses a tensor
    # given twice to one autograd.Function), and the class count, a size that depends on the
    # labels, is among the Proto-Triplet function's outputs (a compile error otherwise)
    s, sl = episode(12, 16, 5, seed=7)
    f = lambda a, b: (ops.proto_triplet_loss(a, lab, margin=0.2)  # noqa: E731
                      + ops.proto_triplet_loss(a, lab, b, sl) + ops.icnn_loss(a, lab, k=2)
                      + ops.icnn_loss(a, lab, b, sl, k=2))
    assert_compiled_matches(f, [e, s])


def test_bad_input_errors_name_the_argument():
    e, lab = episode(10, 4, 3)
    expect_errors([
        (lambda: ops.proto_triplet_loss(e, lab.float()), "query_labels must be integer"),
        (lambda: ops.proto_triplet_loss(e, lab, e[:, :2], lab), "support has 2 features"),
        (lambda: ops.proto_triplet_loss(e, lab, e), "give support and support_labels together"),
        (lambda: ops.proto_triplet_loss(e, lab, e[:3], torch.tensor([0, 1, 1])),
         "every query label must be a class of the support"),
        (lambda: ops.proto_triplet_loss(e, torch.zeros(10, dtype=torch.long)), "at least two classes"),
        (lambda: ops.proto_triplet_loss(e, lab, margin=-1.0), "margin must be >= 0"),
        (lambda: ops.icnn_loss(e, lab, k=0), "k must be a positive int"),
        (lambda: ops.icnn_loss(e, lab, k=2, num_neighbors=1), "num_neighbors must be an int in [k = 2, 9]"),
        (lambda: ops.icnn_loss(e[:2], lab[:2]), "at least 3 embeddings"),
        (lambda: ops.icnn_loss(e, lab[:4]), "labels must be integer [10]"),
        (lambda: ops.icnn_loss(e, lab, e[:, :3], lab), "target has 3 features"),
        (lambda: ops.icnn_loss(e.double(), lab), "got torch.float64"),
        (lambda: ops.proto_triplet_loss(e.double(), lab), "got torch.float64"),
    ])
