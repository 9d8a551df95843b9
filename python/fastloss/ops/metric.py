"""Metric-learning losses over embeddings ``[B, D]`` and labels ``[B]``, by blocks of anchors:
the Multi-Similarity loss (below) and the Threshold-Consistent Margin regularizer (``tcm_loss``).

``multi_similarity_loss(emb, labels, alpha, beta, base, epsilon)`` is the Multi-Similarity loss
(Wang et al., CVPR 2019) with its pair mining, as pytorch-metric-learning's
``MultiSimilarityLoss(alpha, beta, base)`` with ``MultiSimilarityMiner(epsilon)`` computes it on
cosine similarities ``S = normalize(emb) @ normalize(emb).T``: for anchor ``i``, positives
``P_i`` (same label, not ``i``) and negatives ``N_i``, mining keeps the positives with
``S_ip - epsilon < max_{n in N_i} S_in`` and the negatives with
``S_in + epsilon > min_{p in P_i} S_ip`` (``epsilon=None``: every pair), and

.. math:: \\ell_i = \\frac1\\alpha\\log\\Big(1 + \\sum_{p} e^{-\\alpha (S_{ip} - \\lambda)}\\Big)
          + \\frac1\\beta\\log\\Big(1 + \\sum_{n} e^{\\beta (S_{in} - \\lambda)}\\Big)

(``lambda = base``; an anchor with no mined pair has loss 0), averaged over all ``B`` anchors.
The mining is not differentiated (as the miner's indices are not). Every anchor's terms depend
only on its own row of ``S``, so the op goes over blocks of anchor rows, a GEMM per block: extra
memory is one ``[rows, B]`` block and O(B) statistics, not the ``B x B`` matrix and the masks
eager code builds.

The similarity-block kernels (``csrc/pair_losses/similarity_rows_*``: CPU, and CUDA in a CUDA
build) do all of a block's element-wise work (masks, mining, sums, and the gradient
``d loss / d S`` written over the block) in two or three passes over each row; with
``reduction`` mean or sum the forward also forms the embedding gradient (two more GEMMs per
block, so no block is formed twice) and the backward only scales it. TCM (its block loops in
C++, ``tcm_blocks``) forms its gradient in the forward too when one block holds every anchor
(the default up to B = 1024 on the CPU, 4096 on CUDA). Past that its gradient lives on its hard
pairs only: on the CPU the forward keeps their columns (while they are at most 1/16 of all
pairs) and the backward adds ``c e_j`` over that list instead of forming the blocks again
(CUDA, or more pairs: the blocks again). With one block on the CPU the same list, when short,
gives the forward's gradient. Other devices: the same blocks in float32 torch operations (4 MiB
blocks, a dozen temporaries each), formed again in the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._devices import has_kernel
from ._checks import as_int, require_finite, values_readable
from ._autograd import once_differentiable
from ._dtypes import as_loss_dtype, runs_without_autocast

_BLOCK_BYTES = 4 << 20  # small: each block has a dozen block-sized temporaries (masks, exps)
_KERNEL_BLOCK_BYTES = 4 << 20  # no temporaries on the CPU: TCM too gets 4 MiB blocks
_CUDA_BLOCK_BYTES = 64 << 20   # CUDA: larger GEMMs, fewer launches
# Multi-Similarity on the CPU takes S whole when it fits this and D >= _MS_WHOLE_MIN_D: one
# GEMM then forms the gradient, (dS + dS^T) E, instead of two per block (ms_blocks). Ad hoc on
# 2 cores, forward + backward: B = 4096, D = 1024 315 vs 458 ms, D = 512 176 vs 232,
# D = 256 131 vs 137, but D = 128 83 vs 66 (the whole matrix's passes cost more than the
# GEMM saved); B = 2048, D = 1024 127 vs 184. Eager builds S and a dozen B x B temporaries.
_MS_WHOLE_BYTES = 64 << 20
_MS_WHOLE_MIN_D = 256
_INF = float("inf")
_SPARSE_FRACTION = 16  # TCM keeps its hard pairs for the backward while they are <= B^2 / 16


def _kernels(e: Tensor) -> bool:
    """Whether the similarity-block kernels run on e's device (the CPU; CUDA in a CUDA build);
    elsewhere the losses use torch operations."""
    return has_kernel(e)


def _compute_rows(emb):
    """emb in the precision its rows are normalised in: float32 (rows normalised in bfloat16
    had moved every similarity by up to ~2^-9, which beta = 50 turned into ~10% changes of the
    pairs' weights: Multi-Similarity's gradient was 2-6% off the float64 reference on the same
    inputs); the kernels take float32 similarities anyway."""
    return emb.float()


def _normalized(emb):
    """The unit rows of emb (F.normalize, with autograd), in _compute_rows' precision."""
    return F.normalize(_compute_rows(emb), dim=1)


_NORM_EPS = 1e-12  # F.normalize's


def _unit_rows(x):
    """x's rows scaled to unit length as F.normalize scales them (x / max(||x||, eps)), outside
    autograd, with the norms for _unit_rows_grad: the kernels' autograd Functions take the raw
    embeddings and apply the normalisation's chain rule themselves (F.normalize's own autograd
    nodes were ~0.2 ms of a B = 256 tcm_loss call of ~0.85 ms on the CPU). Float32 CPU rows go
    through one op (unit_rows); its torch form here took ~12 us at B = 256, D = 128."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.fastloss.unit_rows(x)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norms.clamp_min(_NORM_EPS), norms.squeeze(1)


def _unit_rows_grad(grad_e, e, norms):
    """The gradient for x of sum(grad_e * e), e = _unit_rows(x): (g - e (e . g)) / ||x|| where
    ||x|| > eps, g / eps where the norm was clamped (F.normalize's backward). Float32 CPU: one
    op (unit_rows_grad; the torch form below took ~70 us at B = 256, D = 128)."""
    if e.device.type == "cpu" and e.dtype == grad_e.dtype == norms.dtype == torch.float32:
        return torch.ops.fastloss.unit_rows_grad(grad_e, e, norms)
    norms = norms.unsqueeze(1)
    dot = (e * grad_e).sum(1, keepdim=True)
    return torch.where(norms > _NORM_EPS, (grad_e - e * dot) / norms.clamp_min(_NORM_EPS),
                       grad_e / _NORM_EPS)


def _kernel_block_bytes(e):
    return _KERNEL_BLOCK_BYTES if e.device.type == "cpu" else _CUDA_BLOCK_BYTES


# ---- fake kernels of the similarity-block ops (pair_losses_op.cpp) -----------------------------

@torch.library.register_fake("fastloss::pair_label_keys")
def _fake_label_keys(labels):
    return labels.new_empty(labels.shape, dtype=torch.float32)


@torch.library.register_fake("fastloss::ms_rows_")
def _fake_ms_rows(s, keys, row0, alpha, beta, base, epsilon, write_grad):
    return s.new_empty((2, s.shape[0]))


@torch.library.register_fake("fastloss::tcm_rows")
def _fake_tcm_rows(s, keys, row0, m_pos, m_neg, collect):
    nnz = torch.library.get_ctx().new_dynamic_size() if collect else 0
    return (s.new_empty((4,), dtype=torch.float64), s.new_empty((s.shape[0],), dtype=torch.int64),
            s.new_empty((nnz,), dtype=torch.int32))


@torch.library.register_fake("fastloss::tcm_rows_grad_")
def _fake_tcm_rows_grad(s, keys, row0, m_pos, m_neg, coef):
    return None


@torch.library.register_fake("fastloss::tcm_blocks")
def _fake_tcm_blocks(e, keys, m_pos, m_neg, w_pos, w_neg, block_rows, early, max_pairs):
    n, d = e.shape
    early = early and 0 < n <= block_rows
    lists = max_pairs >= 0 and e.device.type == "cpu" and not early  # (their sizes: the data's)
    ctx = torch.library.get_ctx()
    rows, pairs = (ctx.new_dynamic_size(), ctx.new_dynamic_size()) if lists else (0, 0)
    return (e.new_empty((4,), dtype=torch.float64),
            e.new_empty((n, d) if early else (0,), dtype=torch.float32),
            e.new_empty((rows,), dtype=torch.int64), e.new_empty((pairs,), dtype=torch.int32))


@torch.library.register_fake("fastloss::tcm_blocks_backward")
def _fake_tcm_blocks_backward(e, keys, m_pos, m_neg, block_rows, coef):
    return e.new_empty(e.shape, dtype=torch.float32)


@torch.library.register_fake("fastloss::unit_rows")
def _fake_unit_rows(x):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1])


@torch.library.register_fake("fastloss::unit_rows_grad")
def _fake_unit_rows_grad(grad_e, e, norms):
    return e.new_empty(e.shape)


@torch.library.register_fake("fastloss::pair_grad")
def _fake_pair_grad(e, keys, row_ptr, cols, coef):
    return e.new_empty(e.shape)


def _pair_masks(labels_rows, labels, r0):
    """Positive (same label, not the anchor itself) and negative masks of a block of anchors."""
    same = labels_rows[:, None] == labels[None, :]
    rows = torch.arange(r0, r0 + labels_rows.shape[0], device=labels.device)
    not_self = rows[:, None] != torch.arange(labels.shape[0], device=labels.device)[None, :]
    return same & not_self, ~same


def _masks(s, labels_rows, labels, r0, epsilon):
    """Positive and negative masks of a block of anchor rows, after mining."""
    pos, neg = _pair_masks(labels_rows, labels, r0)
    if epsilon is not None:
        min_pos = torch.where(pos, s, _INF).amin(1, keepdim=True)
        max_neg = torch.where(neg, s, -_INF).amax(1, keepdim=True)
        pos = pos & (s - epsilon < max_neg)
        neg = neg & (s + epsilon > min_pos)
    return pos, neg


def _log1p_sum_exp(x, mask):
    """log(1 + sum_{mask} exp(x)) per row (0 for rows with no kept entry)."""
    lse = torch.logsumexp(torch.where(mask, x, -_INF), 1)
    return torch.logaddexp(torch.zeros_like(lse), lse)


class _MultiSimilarity(torch.autograd.Function):
    # (the torch path, for devices without kernels: its GEMMs in float32, autocast or not)
    @staticmethod
    @runs_without_autocast
    def forward(ctx, e, labels, alpha, beta, base, epsilon, block):
        n = e.shape[0]
        rows = torch.empty(n, dtype=torch.float32, device=e.device)
        lse_pos, lse_neg = torch.empty_like(rows), torch.empty_like(rows)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            s = (e[r0:r1] @ e.t()).float()
            pos, neg = _masks(s, labels[r0:r1], labels, r0, epsilon)
            lse_pos[r0:r1] = _log1p_sum_exp(alpha * (base - s), pos)
            lse_neg[r0:r1] = _log1p_sum_exp(beta * (s - base), neg)
        rows = lse_pos / alpha + lse_neg / beta
        ctx.save_for_backward(e, labels, lse_pos, lse_neg)
        ctx.args = (alpha, beta, base, epsilon, block)
        return rows

    @staticmethod
    @once_differentiable("multi_similarity_loss")
    @runs_without_autocast
    def backward(ctx, grad_rows):
        e, labels, lse_pos, lse_neg = ctx.saved_tensors
        alpha, beta, base, epsilon, block = ctx.args
        n = e.shape[0]
        g = grad_rows.float()
        ef = e.float()
        grad = torch.zeros(e.shape, dtype=torch.float32, device=e.device)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            s = (e[r0:r1] @ e.t()).float()
            pos, neg = _masks(s, labels[r0:r1], labels, r0, epsilon)
            # d l_i / d S_ip = -exp(alpha (base - S_ip) - lse_pos_i), d l_i / d S_in = +exp(...)
            d_pos = torch.where(pos, torch.exp(alpha * (base - s) - lse_pos[r0:r1, None]), 0.0)
            d_neg = torch.where(neg, torch.exp(beta * (s - base) - lse_neg[r0:r1, None]), 0.0)
            ds = (d_neg - d_pos) * g[r0:r1, None]
            grad[r0:r1] += ds @ ef               # S = e e^T: both factors get a gradient
            grad.addmm_(ds.t(), ef[r0:r1])
        return grad.to(e.dtype), None, None, None, None, None, None


@torch.library.register_fake("fastloss::ms_blocks")
def _fake_ms_blocks(e, keys, alpha, beta, base, epsilon, block_rows, early, grad_rows):
    n = e.shape[0]
    backward = grad_rows is not None
    return (e.new_empty((0 if backward else 2, n), dtype=torch.float32),
            e.new_empty(e.shape if early or backward else (0,), dtype=torch.float32))


class _MultiSimilarityKernel(torch.autograd.Function):
    """ms_blocks (the block loop in C++, ms_rows_ per block); with a reduced loss the gradient
    is formed in the forward and only scaled in the backward."""

    @staticmethod
    def forward(ctx, x, keys, alpha, beta, base, epsilon, reduction, block):
        e, norms = _unit_rows(x)  # (x: the raw embeddings; see _unit_rows)
        early = reduction != "none" and ctx.needs_input_grad[0]
        stats, grad = torch.ops.fastloss.ms_blocks(e, keys, alpha, beta, base, epsilon, block,
                                                   early, None)
        rows = stats[0] / alpha + stats[1] / beta
        ctx.save_for_backward(*((_unit_rows_grad(grad, e, norms),) if early else (e, keys, norms)))
        ctx.args = (alpha, beta, base, epsilon, reduction, block, x.dtype)
        if reduction == "mean":
            return rows.mean()
        return rows.sum() if reduction == "sum" else rows

    @staticmethod
    @once_differentiable("multi_similarity_loss")
    def backward(ctx, grad_out):
        alpha, beta, base, epsilon, reduction, block, dtype = ctx.args
        if reduction != "none":
            (grad,) = ctx.saved_tensors
            scale = grad_out.float() / (grad.shape[0] if reduction == "mean" else 1)
            return (grad * scale).to(dtype), None, None, None, None, None, None, None
        e, keys, norms = ctx.saved_tensors
        grad = torch.ops.fastloss.ms_blocks(e, keys, alpha, beta, base, epsilon, block, False,
                                            grad_out)[1]
        return _unit_rows_grad(grad, e, norms).to(dtype), None, None, None, None, None, None, None


def _check_emb_labels(fn, emb, labels):
    if not isinstance(emb, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: emb and labels must be Tensors")
    if emb.dim() != 2 or emb.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # (float64 too: the kernels compute in float32, which a float64 result would hide)
        raise ValueError(f"{fn}: emb must be a float32, float16 or bfloat16 [B, D] tensor, got {emb.dtype} "
                         f"{tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be integer [B] = [{emb.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.device != emb.device:
        raise ValueError(f"{fn}: labels is on {labels.device} but emb is on {emb.device}")


def _block_rows(fn, block_rows, n, budget=_BLOCK_BYTES):
    block_rows = as_int(block_rows)
    if block_rows is None:
        return max(1, budget // (4 * max(n, 1)))
    if not (isinstance(block_rows, int) and not isinstance(block_rows, bool) and block_rows > 0):
        raise ValueError(f"{fn}: block_rows must be a positive int or None, got {block_rows!r}")
    return block_rows


def multi_similarity_loss(emb: Tensor, labels: Tensor, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, epsilon: Optional[float] = 0.1,
                          reduction: str = "mean", block_rows: Optional[int] = None) -> Tensor:
    """Multi-Similarity loss with its miner (see the module docstring).

    Args:
        emb: ``[B, D]`` embeddings (normalised inside, as cosine similarity does).
        labels: ``[B]`` integer class labels.
        alpha, beta, base: the loss's positive weight, negative weight and margin ``lambda``.
        epsilon: the miner's margin; None keeps every pair (pytorch-metric-learning's
            ``MultiSimilarityLoss`` used without a miner is ``epsilon=None``; the default 0.1
            is it with ``MultiSimilarityMiner(epsilon=0.1)``).
        reduction: ``"mean"`` over the ``B`` anchors, ``"sum"`` or ``"none"`` (``[B]``).
        block_rows: anchors per block (None: 4 MiB of float32 similarities on the CPU, 64 MiB
            on CUDA; on the CPU every anchor when ``S`` fits 64 MiB and ``D >= 256``).
    """
    fn = "multi_similarity_loss"
    _check_emb_labels(fn, emb, labels)
    require_finite(fn, alpha=alpha, beta=beta, base=base, epsilon=epsilon)
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"{fn}: alpha and beta must be > 0, got {alpha} and {beta}")
    if epsilon is not None and not epsilon >= 0:
        raise ValueError(f"{fn}: epsilon must be >= 0 or None, got {epsilon}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    x = _compute_rows(emb)
    if _kernels(x):
        n = emb.shape[0]
        whole = (block_rows is None and x.device.type == "cpu" and 4 * n * n <= _MS_WHOLE_BYTES
                 and emb.shape[1] >= _MS_WHOLE_MIN_D)
        block_rows = n if whole else _block_rows(fn, block_rows, n, _kernel_block_bytes(x))
        keys = torch.ops.fastloss.pair_label_keys(labels)
        out = _MultiSimilarityKernel.apply(x, keys, float(alpha), float(beta), float(base),
                                        None if epsilon is None else float(epsilon), reduction,
                                        block_rows)
        return as_loss_dtype(out, emb)
    e = _normalized(emb)
    block_rows = _block_rows(fn, block_rows, emb.shape[0])
    rows = _MultiSimilarity.apply(e, labels, float(alpha), float(beta), float(base),
                                  None if epsilon is None else float(epsilon), block_rows)
    if reduction == "mean":
        return as_loss_dtype(rows.mean(), emb)
    if reduction == "sum":
        return as_loss_dtype(rows.sum(), emb)
    return as_loss_dtype(rows, emb)


# --- Threshold-Consistent Margin (TCM) regularizer ----------------------------------------------

class _Tcm(torch.autograd.Function):
    @staticmethod
    @runs_without_autocast
    def forward(ctx, e, labels, m_pos, m_neg, w_pos, w_neg, block):
        n = e.shape[0]
        sums = torch.zeros(4, dtype=torch.float64, device=e.device)  # pos sum, pos count, neg ...
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            s = (e[r0:r1] @ e.t()).float()
            pos, neg = _pair_masks(labels[r0:r1], labels, r0)
            hard_pos, hard_neg = pos & (s <= m_pos), neg & (s >= m_neg)
            sums += torch.stack([torch.where(hard_pos, m_pos - s, 0.0).sum(dtype=torch.float64),
                                 hard_pos.sum(dtype=torch.float64),
                                 torch.where(hard_neg, s - m_neg, 0.0).sum(dtype=torch.float64),
                                 hard_neg.sum(dtype=torch.float64)])
        # a term with no hard pair is 0 (clamp: 0 / 1)
        loss = w_pos * sums[0] / sums[1].clamp(min=1) + w_neg * sums[2] / sums[3].clamp(min=1)
        ctx.save_for_backward(e, labels, sums)
        ctx.args = (m_pos, m_neg, w_pos, w_neg, block)
        return loss.float()

    @staticmethod
    @once_differentiable("tcm_loss")
    @runs_without_autocast
    def backward(ctx, grad_loss):
        e, labels, sums = ctx.saved_tensors
        m_pos, m_neg, w_pos, w_neg, block = ctx.args
        # d loss / d S_ij: -w_pos / count_pos on hard positives, w_neg / count_neg on hard negatives
        d_pos = (grad_loss.double() * w_pos / sums[1].clamp(min=1)).float()
        d_neg = (grad_loss.double() * w_neg / sums[3].clamp(min=1)).float()
        n = e.shape[0]
        ef = e.float()
        grad = torch.zeros(e.shape, dtype=torch.float32, device=e.device)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            s = (e[r0:r1] @ e.t()).float()
            pos, neg = _pair_masks(labels[r0:r1], labels, r0)
            ds = torch.where(pos & (s <= m_pos), -d_pos, torch.where(neg & (s >= m_neg), d_neg, 0.0))
            grad[r0:r1] += ds @ ef
            grad.addmm_(ds.t(), ef[r0:r1])
        return grad.to(e.dtype), None, None, None, None, None, None


def _tcm_coefficients(grad_loss, sums, w_pos, w_neg):
    """d loss / d S on a hard positive (negated) and on a hard negative, as a float64 [2]."""
    return grad_loss.double() * torch.stack([w_pos / sums[1].clamp(min=1),
                                             w_neg / sums[3].clamp(min=1)])


class _TcmKernel(torch.autograd.Function):
    """tcm_blocks (the block loop in C++, tcm_rows per block); on the CPU the hard pairs'
    columns kept for a sparse backward; with one block the gradient formed in the forward."""

    @staticmethod
    def forward(ctx, x, keys, m_pos, m_neg, w_pos, w_neg, block):
        e, norms = _unit_rows(x)  # (x: the raw embeddings; see _unit_rows)
        n = e.shape[0]
        ef = e.float().contiguous()
        need = ctx.needs_input_grad[0]
        collect = need and e.device.type == "cpu" and not torch.compiler.is_compiling()
        sums, grad, row_ptr, cols = torch.ops.fastloss.tcm_blocks(
            ef, keys, m_pos, m_neg, w_pos, w_neg, block, need, n * n // _SPARSE_FRACTION if collect else -1)
        if values_readable(sums):  # (the CPU: a few host floats instead of a dozen tiny ops)
            pos_sum, pos_n, neg_sum, neg_n = sums.tolist()
            loss = torch.tensor(w_pos / max(pos_n, 1.0) * pos_sum + w_neg / max(neg_n, 1.0) * neg_sum,
                                dtype=torch.float64)
        else:
            loss = w_pos * sums[0] / sums[1].clamp(min=1) + w_neg * sums[2] / sums[3].clamp(min=1)
        early = grad.dim() == 2  # the gradient for an upstream 1: the backward only scales it
        sparse = row_ptr.numel() > 0  # every block's hard pairs were kept, for the backward
        if early:
            ctx.save_for_backward(_unit_rows_grad(grad, ef, norms))
        elif sparse:
            ctx.save_for_backward(norms, ef, keys, sums, row_ptr, cols)
        else:
            ctx.save_for_backward(norms, ef, keys, sums)
        ctx.args = (m_pos, m_neg, w_pos, w_neg, block, sparse, early, x.dtype)
        return loss.float()

    @staticmethod
    @once_differentiable("tcm_loss")
    def backward(ctx, grad_loss):
        m_pos, m_neg, w_pos, w_neg, block, sparse, early, dtype = ctx.args
        if early:
            (grad,) = ctx.saved_tensors
            return (grad * grad_loss.float()).to(dtype), None, None, None, None, None, None
        norms, ef, keys, sums, *pairs = ctx.saved_tensors
        coef = _tcm_coefficients(grad_loss, sums, w_pos, w_neg)
        if sparse:  # d S_ij = -coef[0] on hard positives, +coef[1] on hard negatives
            signed = coef * torch.tensor([-1.0, 1.0], dtype=torch.float64, device=coef.device)
            grad = torch.ops.fastloss.pair_grad(ef, keys, *pairs, signed)
        else:
            grad = torch.ops.fastloss.tcm_blocks_backward(ef, keys, m_pos, m_neg, block, coef)
        return _unit_rows_grad(grad, ef, norms).to(dtype), None, None, None, None, None, None


def tcm_loss(emb: Tensor, labels: Tensor, pos_margin: float = 0.9, neg_margin: float = 0.5,
             pos_weight: float = 1.0, neg_weight: float = 1.0,
             block_rows: Optional[int] = None) -> Tensor:
    """Threshold-Consistent Margin regularizer (Zhang et al., ICLR 2024), on the cosine
    similarities ``S`` of the batch (self-pairs excluded):

    .. math:: L = \\lambda^+ \\frac{\\sum_{S^+ \\le m^+} (m^+ - S^+)}{|\\{S^+ \\le m^+\\}|}
              + \\lambda^- \\frac{\\sum_{S^- \\ge m^-} (S^- - m^-)}{|\\{S^- \\ge m^-\\}|}

    the mean margin violation of the hard positive pairs (less similar than ``pos_margin``) and
    of the hard negative pairs (more similar than ``neg_margin``); a term with no hard pair is 0.
    Added to a base metric-learning loss. Defaults as pytorch-metric-learning's
    ``ThresholdConsistentMarginLoss`` (from the paper's section 5.2), which it equals on the same
    inputs. Blocks of anchor rows, as ``multi_similarity_loss``: no ``B x B`` matrix is kept.
    With one block the gradient is formed in the forward; with several, on the CPU the forward
    keeps the hard pairs' columns while they are few (at most ``B^2 / 16``) and the backward goes
    over them alone, otherwise it forms each block again.

    Args:
        emb: ``[B, D]`` embeddings (normalised inside). labels: ``[B]`` integer classes.
        pos_margin, neg_margin: ``m+`` and ``m-``. pos_weight, neg_weight: ``lambda+``, ``lambda-``.
        block_rows: anchors per block (None: 4 MiB of float32 similarities on the CPU, 64 MiB
            on CUDA, 1 MiB on other devices).
    """
    fn = "tcm_loss"
    _check_emb_labels(fn, emb, labels)
    require_finite(fn, pos_weight=pos_weight, neg_weight=neg_weight)
    for name, v in (("pos_weight", pos_weight), ("neg_weight", neg_weight)):
        if not v >= 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {v}")
    for name, v in (("pos_margin", pos_margin), ("neg_margin", neg_margin)):
        if not -1 <= v <= 1:
            raise ValueError(f"{fn}: {name} must be a cosine similarity in [-1, 1], got {v}")
    x = _compute_rows(emb)
    if _kernels(x):
        block_rows = _block_rows(fn, block_rows, emb.shape[0], _kernel_block_bytes(x))
        keys = torch.ops.fastloss.pair_label_keys(labels)
        return as_loss_dtype(_TcmKernel.apply(x, keys, float(pos_margin), float(neg_margin),
                                              float(pos_weight), float(neg_weight), block_rows), emb)
    e = _normalized(emb)
    block_rows = _block_rows(fn, block_rows, emb.shape[0], _BLOCK_BYTES // 4)
    return as_loss_dtype(_Tcm.apply(e, labels, float(pos_margin), float(neg_margin), float(pos_weight),
                                    float(neg_weight), block_rows), emb)
