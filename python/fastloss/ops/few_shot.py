"""Few-shot metric-learning losses of "SuSana Distancia is all you need" (Mendez-Ruiz et al.):
the Proto-Triplet loss and the ICNN loss. Formulas in each function's docstring, as the
authors' code computes them (its constants included, so the values are comparable).

Distances are Euclidean, ``d(a, b) = sqrt(||a - b||^2 + 1e-6)``. Neighbour search goes over
blocks of rows (a GEMM per block, then the ``knn_rows`` kernel of
``csrc/pair_losses/similarity_rows_*`` / ``neighbours_cuda.cu``; elsewhere, or for more than
64 neighbours, ``cdist`` + ``topk``), so no ``N x M`` distance
matrix is kept for backward: only the chosen neighbours' distances are formed again,
differentiably, from the embeddings.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._devices import has_kernel
from ._checks import as_int, require_finite
from ._autograd import once_differentiable
from ._dtypes import as_loss_dtype, without_autocast

_EPS_SQ = 1e-6   # inside the square root (the authors' value)
_EPS = 1e-7      # in the ICNN score's divisions (the authors' value)
_BLOCK_BYTES = 4 << 20
# CUDA: 4 MiB blocks were 64 rows at 16384 targets, and ICNN at B = 16384 took 101 ms on an
# H200 (e808290, cdist + topk per block) against eager's 12.9 ms, in 256 small steps
_CUDA_BLOCK_BYTES = 64 << 20
_KNN_KERNEL_MAX = 64  # kKnnMax of csrc/pair_losses/similarity_rows_kernels.h


def _check_set(fn, name, emb, labels_name, labels, device=None):
    if not isinstance(emb, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: {name} and {labels_name} must be Tensors")
    if emb.dim() != 2 or emb.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # (float64 too: the kernels compute in float32, which a float64 result would hide)
        raise ValueError(f"{fn}: {name} must be a float32, float16 or bfloat16 [B, D] tensor, got {emb.dtype} "
                         f"{tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: {labels_name} must be integer [{emb.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    for t, what in ((emb, name), (labels, labels_name)):
        if device is not None and t.device != device:
            raise ValueError(f"{fn}: {what} is on {t.device}, expected {device}")


def _kernels(x: Tensor) -> bool:
    """Whether the fastloss kernels take x's device (the tests switch them off to compare)."""
    return has_kernel(x)


def _pair_dist(a, b):
    """Distances of matching rows (a[i] to b[i]); differentiable, no pair matrix."""
    return ((a.float() - b.float()).square().sum(-1) + _EPS_SQ).sqrt()


def proto_triplet_loss(query: Tensor, query_labels: Tensor, support: Optional[Tensor] = None,
                       support_labels: Optional[Tensor] = None, margin: float = 0.5) -> Tensor:
    """Proto-Triplet loss: each query is an anchor, its class prototype the positive and the
    nearest prototype of another class the negative,

    .. math:: L = \\frac1Q \\sum_q \\max\\big(0,\\ d(q, c_{y_q}) - \\min_{k \\ne y_q} d(q, c_k)
              + \\mathrm{margin}\\big)

    with prototypes ``c_k`` the means of the support embeddings of class ``k`` (ProtoNet's).
    ``support=None`` takes the prototypes from the query batch itself (a plain batch of
    embeddings and labels). Extra memory ``O(Q K)`` for ``K`` classes (the distances, not kept
    for backward: only ``d(q, c_{y_q})`` and the nearest negative's are formed again); the CPU
    backward adds a ``[K, D]`` prototype-gradient buffer per thread (at most 64 MiB in all),
    summed in a fixed order: the gradients' last bits depend on the thread count.

    Args:
        query: ``[Q, D]`` embeddings; query_labels: integer ``[Q]``, each a class of the support.
        support, support_labels: ``[S, D]`` and ``[S]`` (or None: the query set).
        margin: the triplet margin (the authors use 0.5).
    """
    fn = "proto_triplet_loss"
    _check_set(fn, "query", query, "query_labels", query_labels)
    if (support is None) != (support_labels is None):
        raise ValueError(f"{fn}: give support and support_labels together, or neither")
    own = support is None
    if own:
        support, support_labels = query, query_labels
    _check_set(fn, "support", support, "support_labels", support_labels, query.device)
    if support.shape[1] != query.shape[1]:
        raise ValueError(f"{fn}: support has {support.shape[1]} features but query has {query.shape[1]}")
    require_finite(fn, margin=margin)
    if not margin >= 0:
        raise ValueError(f"{fn}: margin must be >= 0, got {margin}")
    if _kernels(query):  # one op (its label checks raise RuntimeError with the same text)
        return as_loss_dtype(_ProtoTriplet.apply(query, None if own else support, query_labels,
                                                 None if own else support_labels, float(margin))[0], query)
    classes, inverse = torch.unique(support_labels, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(f"{fn}: the support needs at least two classes, got {classes.numel()}")
    pos = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    if not bool((classes[pos] == query_labels).all()):
        raise ValueError(f"{fn}: every query label must be a class of the support")
    k = classes.numel()
    sums = torch.zeros(k, support.shape[1], dtype=torch.float32, device=support.device)
    protos = sums.index_add(0, inverse, support.float()) / torch.bincount(inverse, minlength=k)[:, None]
    # the nearest other prototype by ||c||^2 - 2 <q, c>: one float32 GEMM (autocast or not), no graph
    with torch.no_grad(), without_autocast(query):
        mu = protos.mean(0)  # (both shifted: the spread of embeddings far from 0 survives rounding)
        pc = protos - mu
        score = torch.addmm(pc.square().sum(1)[None, :], query.float() - mu, pc.t(), alpha=-2)
        neg = score.scatter_(1, pos[:, None], float("inf")).argmin(1)
    # only the two chosen distances of each query are differentiated: O(Q D), not the [Q, K]
    # distance matrix and its backward
    d = _chosen_dist(query, protos, torch.stack([pos, neg], 1))
    return as_loss_dtype(torch.relu(d[:, 0] - d[:, 1] + margin).mean(), query)


@torch.library.register_fake("fastloss::proto_triplet_forward")
def _fake_proto_forward(query, query_labels, support, support_labels, margin):
    k = torch.library.get_ctx().new_dynamic_size()
    q, d = query.shape
    f32 = dict(dtype=torch.float32)
    return (query.new_empty((), **f32), query.new_empty((k, d), **f32),
            query.new_empty((q, 2), dtype=torch.int64), query.new_empty((q, 2), **f32),
            query.new_empty((support.shape[0],), dtype=torch.int64), query.new_empty((k,), **f32))


@torch.library.register_fake("fastloss::proto_triplet_backward")
def _fake_proto_backward(grad, query, protos, idx, dist, inverse, counts, margin, own=False):
    return (query.new_empty(query.shape, dtype=torch.float32),
            query.new_empty((0 if own else inverse.shape[0], query.shape[1]), dtype=torch.float32))


class _ProtoTriplet(torch.autograd.Function):
    """proto_triplet_forward / _backward (pair_losses_op.cpp; CPU, and CUDA through the
    chosen-pair kernels of neighbours_cuda.cu), the whole loss in one op each way. support None:
    the query set is its own support and gets both gradients (passed once: torch.compile
    refuses a tensor given twice to one autograd.Function)."""

    @staticmethod
    def forward(ctx, query, support, query_labels, support_labels, margin):
        ctx.own = support is None
        if ctx.own:
            support, support_labels = query, query_labels
        loss, protos, idx, dist, inverse, counts = torch.ops.fastloss.proto_triplet_forward(
            query, query_labels, support, support_labels, margin)
        ctx.save_for_backward(query, protos, idx, dist, inverse, counts)
        ctx.margin, ctx.dtypes = margin, (query.dtype, support.dtype)
        # the class counts returned too: their length (the number of classes) depends on the
        # labels' values, and torch.compile needs such a size among a function's outputs
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    @once_differentiable("proto_triplet_loss")
    def backward(ctx, grad, _counts):
        query, protos, idx, dist, inverse, counts = ctx.saved_tensors
        grad_q, grad_s = torch.ops.fastloss.proto_triplet_backward(grad, query, protos, idx, dist,
                                                                   inverse, counts, ctx.margin, ctx.own)
        if ctx.own:  # grad_q holds both parts
            return grad_q.to(ctx.dtypes[0]), None, None, None, None
        return grad_q.to(ctx.dtypes[0]), grad_s.to(ctx.dtypes[1]), None, None, None


@torch.library.register_fake("fastloss::neighbour_dist")
def _fake_neighbour_dist(x, t, idx, eps):
    return x.new_empty(idx.shape)


@torch.library.register_fake("fastloss::neighbour_dist_backward")
def _fake_neighbour_dist_backward(grad_dist, x, t, idx, dist, grad_mask):
    d = x.shape[1]
    return (x.new_empty((x.shape[0] if grad_mask[0] else 0, d)),
            x.new_empty((t.shape[0] if grad_mask[1] else 0, d)))


class _NeighbourDist(torch.autograd.Function):
    """The chosen pairs' distances and their gradient in closed form (x_i - t_j) w / d, the
    targets' part through the pairs sorted by target (no scatter, no [N, n, D]); CPU and CUDA
    kernels. t None: the targets are x itself (passed once, as _ProtoTriplet's support)."""

    @staticmethod
    def forward(ctx, x, t, idx):
        ctx.own = t is None
        xf = x.float().contiguous()
        tf = xf if ctx.own else t.float().contiguous()
        dist = torch.ops.fastloss.neighbour_dist(xf, tf, idx, _EPS_SQ)
        ctx.save_for_backward(xf, tf, idx, dist)
        ctx.dtypes = (x.dtype, x.dtype if ctx.own else t.dtype)
        return dist

    @staticmethod
    @once_differentiable("icnn_loss / proto_triplet_loss (neighbour distances)")
    def backward(ctx, grad):
        xf, tf, idx, dist = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.own and ctx.needs_input_grad[0] or ctx.needs_input_grad[1]]
        gx, gt = torch.ops.fastloss.neighbour_dist_backward(grad.contiguous(), xf, tf, idx, dist, need)
        if ctx.own:
            return (gx + gt).to(ctx.dtypes[0]) if need[0] else None, None, None
        return (gx.to(ctx.dtypes[0]) if need[0] else None, gt.to(ctx.dtypes[1]) if need[1] else None,
                None)


@torch.library.register_fake("fastloss::icnn_score")
def _fake_icnn_score(d, same, k, clipped):
    return d.new_empty(()), d.new_empty(d.shape)


class _IcnnScore(torch.autograd.Function):
    """The score and its gradient with respect to the distances in one pass (CPU) or three
    launches (CUDA) instead of the formula's ~40 small torch operations and their graph (which
    cost more than the neighbour search at B = 256 on the CPU); the backward scales the
    gradient."""

    @staticmethod
    def forward(ctx, d, same, k, clipped):
        loss, grad = torch.ops.fastloss.icnn_score(d.float().contiguous(), same.contiguous(), k, clipped)
        ctx.save_for_backward(grad)
        ctx.dtype = d.dtype
        return loss

    @staticmethod
    @once_differentiable("icnn_loss")
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.dtype), None, None, None


def _chosen_dist(x, t, idx):
    """``d(x_i, t_idx[i, c])`` ``[N, n]``, differentiable in x and t (t None: x itself)."""
    if _kernels(x):
        return _NeighbourDist.apply(x, t, idx)
    return _pair_dist(x[:, None, :], (x if t is None else t)[idx])


@torch.library.register_fake("fastloss::knn_rows")
def _fake_knn_rows(s, row_sq, col_sq, row0, exclude_self, k):
    return s.new_empty((s.shape[0], k), dtype=torch.int64)


def _neighbours(emb, target, k, exclude_self):
    """Indices [N, k] of the k nearest rows of target for each row of emb, by blocks (ascending
    distance). CPU and CUDA (k <= 64): a GEMM per block and the knn_rows kernel (CPU: one pass
    keeping each row's k best; CUDA: a radix selection per row); elsewhere cdist + topk on
    each block."""
    n, m = emb.shape[0], target.shape[0]
    budget = _BLOCK_BYTES if emb.device.type == "cpu" else _CUDA_BLOCK_BYTES
    block = max(1, budget // (4 * max(m, 1)))
    with torch.no_grad(), without_autocast(emb):  # (float32 distances, autocast or not)
        # Both sets shifted by the target set's mean (distances do not change): the GEMM form
        # |a|^2 + |b|^2 - 2 a.b (and cdist's, which uses it for large sets) loses the spread to
        # rounding when every embedding shares an offset far larger than it (offset 10, spread
        # 0.01 had picked wrong neighbours).
        shift = target.float().mean(0) if m else 0.0
        emb, target = emb.float() - shift, target.float() - shift
        if _kernels(emb) and k <= _KNN_KERNEL_MAX:
            ef, tf = emb.contiguous(), target.contiguous()
            row_sq, col_sq = ef.square().sum(1), tf.square().sum(1)
            if n <= block:  # one block (a few-shot episode): no loop over the batch size, so
                # that one torch.compile(dynamic=True) graph serves every size
                return torch.ops.fastloss.knn_rows(torch.mm(ef, tf.t()), row_sq, col_sq, 0, exclude_self, k)
            # one reused block: a fresh one per step, with small tensors kept between steps,
            # fragmented the heap (+0.8 GB peak at B = 16384 in TCM's block loop, measured)
            buf = ef.new_empty((min(block, n), m))
            out = torch.empty(n, k, dtype=torch.long, device=emb.device)
            for r0 in range(0, n, block):
                r1 = min(n, r0 + block)
                dots = torch.mm(ef[r0:r1], tf.t(), out=buf[: r1 - r0])
                out[r0:r1] = torch.ops.fastloss.knn_rows(dots, row_sq[r0:r1], col_sq, r0, exclude_self, k)
            return out
        out = torch.empty(n, k, dtype=torch.long, device=emb.device)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            d = torch.cdist(emb[r0:r1].float(), target.float())
            if exclude_self:
                rows = torch.arange(r0, r1, device=emb.device)
                d[rows - r0, rows] = float("inf")
            out[r0:r1] = d.topk(k, 1, largest=False).indices
    return out


def icnn_loss(emb: Tensor, labels: Tensor, target: Optional[Tensor] = None,
              target_labels: Optional[Tensor] = None, k: int = 4,
              num_neighbors: Optional[int] = None) -> Tensor:
    """ICNN loss ``-log(score)``, the inter- and intra-class nearest-neighbour score of each
    embedding's neighbourhood in the target set (the embeddings themselves by default, each
    without itself). With ``M`` targets, ``k`` is clipped to ``M - 2`` when ``k + 2 >= M``;
    each embedding ``i`` takes its ``n = num_neighbors`` (default ``k + 1``) nearest targets at
    distances ``d_ij`` (ascending) with same-class flags ``s_ij``:

    * ``delta_i`` = the distance to the nearest other-class target among them (infinite if none);
      ``u_ij = (d_ij / (delta_i + eps)) / max(1, max_j d_ij / (delta_i + eps))`` over the first
      ``k``;
    * ``lambda_sc = 1 - mean_{i with a same-class neighbour}`` of the mean of ``u_ij`` over its
      same-class neighbours (close same-class neighbours are good);
    * ``lambda_dc = mean_{i with another-class neighbour}`` of the mean of ``d_ij / D`` over its
      other-class neighbours among the first ``k``, with ``D`` the largest such other-class
      distance in the batch (far other-class neighbours are good), or 1 when no embedding
      has one;
    * ``gamma = mean_i (same-class neighbours among the first k) / k`` (1 when ``k`` was clipped);
    * ``score = ((lambda_sc + lambda_dc) / 2 + gamma) / 2`` in [0, 1].

    Means are over the embeddings that have such neighbours (divisions carry the authors'
    ``eps = 1e-7``). The neighbour choice and ``gamma`` are not differentiated; the distances
    are. Equal distances (duplicated embeddings) tied at a minimum or maximum share its
    gradient equally, as torch's ``amin`` / ``amax`` do; ties in the neighbour order go to the
    lower target index. With a separate target set every target counts (the authors' code also drops the
    nearest target there, meant for the self-match; we drop only the self-match).

    Args:
        emb: ``[N, D]`` embeddings; labels: integer ``[N]``.
        target, target_labels: ``[M, D]`` and ``[M]`` (or None: the embeddings themselves).
        k: neighbours scored (the authors' default 4). num_neighbors: neighbours retrieved
            (>= k; default k + 1; the authors use shot + query for the whole episode).
    """
    fn = "icnn_loss"
    _check_set(fn, "emb", emb, "labels", labels)
    if (target is None) != (target_labels is None):
        raise ValueError(f"{fn}: give target and target_labels together, or neither")
    same_set = target is None
    if same_set:
        target, target_labels = emb, labels
    _check_set(fn, "target", target, "target_labels", target_labels, emb.device)
    if target.shape[1] != emb.shape[1]:
        raise ValueError(f"{fn}: target has {target.shape[1]} features but emb has {emb.shape[1]}")
    k, num_neighbors = as_int(k), as_int(num_neighbors)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{fn}: k must be a positive int, got {k!r}")
    m = target.shape[0]
    available = m - 1 if same_set else m
    if m < 3:
        raise ValueError(f"{fn}: the target set needs at least 3 embeddings, got {m}")
    clipped = k + 2 >= m
    if clipped:
        k = m - 2
    n_nb = k + 1 if num_neighbors is None else num_neighbors
    if isinstance(n_nb, bool) or not isinstance(n_nb, int) or not k <= n_nb <= available:
        raise ValueError(f"{fn}: num_neighbors must be an int in [k = {k}, {available}], got {n_nb!r}")
    idx = _neighbours(emb, target, n_nb, same_set)                            # [N, n]
    d = _chosen_dist(emb, None if same_set else target, idx)                 # [N, n]
    same = target_labels[idx] == labels[:, None]
    if _kernels(emb):
        return as_loss_dtype(_IcnnScore.apply(d, same, k, clipped), emb)
    return as_loss_dtype(icnn_score_torch(d, same, k, clipped), emb)


def icnn_score_torch(d: Tensor, same: Tensor, k: int, clipped: bool) -> Tensor:
    """ICNN's ``-log(score)`` from the neighbours' distances ``d [N, n]`` (ascending) and
    same-class flags, in torch operations (devices without the kernels; the tests' reference
    for the kernels, in float64)."""
    other = ~same
    inf = torch.tensor(float("inf"), device=d.device, dtype=d.dtype)
    delta = torch.where(other, d, inf).amin(1, keepdim=True)
    u = d[:, :k] / (delta + _EPS)
    u = u / u.amax(1, keepdim=True).clamp(min=1.0)
    same_k, other_k = same[:, :k], other[:, :k]
    n_same, n_other = same_k.sum(1), other_k.sum(1)
    sc_rows = torch.where(same_k, u, 0.0).sum(1) / (n_same + _EPS)
    lambda_sc = 1 - sc_rows.sum() / ((n_same > 0).sum() + _EPS)
    dc = torch.where(other_k, d[:, :k], 0.0)
    dc = dc / (dc.amax() + _EPS)
    dc_rows = dc.sum(1) / (n_other + _EPS)
    lambda_dc = dc_rows.sum() / ((n_other > 0).sum() + _EPS)
    # no other-class neighbour anywhere: 1 - lambda_dc (a where, not an `if`: no wait for a GPU)
    lambda_dc = torch.where(other_k.any(), lambda_dc, 1 - lambda_dc)
    gamma = 1.0 if clipped else (n_same.to(d.dtype) / k).mean()
    score = ((lambda_sc + lambda_dc) / 2 + gamma) / 2
    return -torch.log(score)
