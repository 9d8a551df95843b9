"""Contrastive (InfoNCE / CLIP) loss by tiles, the ``B x B`` similarity matrix never kept.

``contrastive_loss(a, b, T, weights=None)`` with ``a``, ``b`` ``[B, D]`` (paired rows) and
``S = a @ b.T / T``:

* without ``weights`` (CLIP): ``(CE(S, arange(B)) + CE(S.T, arange(B))) / 2``;
* with ``weights`` ``[B, B]`` (CWCL's continuous weights, ``w[i, j] >= 0``): row ``i``'s
  target distribution is ``w[i, :]`` normalised, column ``j``'s is ``w[:, j]`` normalised,
  ``-sum_j w~_ij log softmax(S_i)_j`` and likewise for columns; the identity gives CLIP.

``symmetric=False`` keeps only the ``a -> b`` (row) term. The forward goes over blocks of rows
of ``a`` (a GEMM per block, float32 math on it) keeping per-row and per-column log-sum-exps
(the column ones merged across blocks); the backward forms each block again and folds its
gradient into ``grad_a`` and ``grad_b`` with two GEMMs. Extra memory: one ``[rows, B]``
block (64 MiB of float32 by default) and O(B) statistics, not the ``[B, B]`` matrix and its
softmaxes that eager autograd keeps; when the whole matrix is one block (B <= 4096 at the
default size, without CWCL weights) the forward keeps it for the backward instead (3 GEMMs in
all, as eager). Without ``weights``, the similarity-block kernels
(``csrc/pair_losses/similarity_rows_*``: ``clip_rows`` and ``clip_rows_grad_``; CPU, and CUDA
in a CUDA build) do all of a block's element-wise work in two passes over each row, and the
block loops run in C++ (``contrastive_forward`` / ``_backward``), behind one op with a C++
autograd formula (``contrastive_loss``, since session 15); with CWCL weights (or on other
devices) the blocks go through torch element-wise operations.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._devices import has_kernel
from ._checks import as_int, require_finite, values_readable
from ._autograd import once_differentiable, refuse_grad
from ._dtypes import as_loss_dtype, call_rounding, fake_loss, runs_without_autocast

# 64 MiB: B = 4096 is one block, kept for the backward (3 GEMMs instead of 4). At 32 MiB
# (two blocks) forward + backward took 494 / 810 ms at 4096 x 512 / 1024 on the 2-core CPU
# machine, at 64 MiB 319 / 601 ms (ad hoc, same session); eager's peak there is ~450 MiB.
_BLOCK_BYTES = 64 << 20


@torch.library.register_fake("fastloss::clip_rows")
def _fake_clip_rows(s, row0, scale, symmetric):
    rows, n = s.shape
    return s.new_empty((rows,)), s.new_empty((rows,)), s.new_empty((n if symmetric else 0,))


@torch.library.register_fake("fastloss::clip_rows_grad_")
def _fake_clip_rows_grad(s, row0, scale, lse_row, lse_col, g):
    return None


def _blocks(n: int, block: int):
    for r0 in range(0, n, block):
        yield r0, min(n, r0 + block)


class _Contrastive(torch.autograd.Function):
    @staticmethod
    @runs_without_autocast  # (autocast would redo the float32 GEMMs in 16 bits)
    def forward(ctx, a, b, weights, inv_t, symmetric, block):
        n = a.shape[0]
        f32 = dict(dtype=torch.float32, device=a.device)
        lse_row = torch.empty(n, **f32)
        lse_col = torch.full((n,), float("-inf"), **f32)
        target_row = torch.empty(n, **f32)      # sum_j w~_ij S_ij
        target_col = torch.zeros(n, **f32)      # sum_i w~'_ij S_ij
        col_norm = weights.float().sum(0) if weights is not None else None
        # S in float32 from the inputs' values (a 16-bit product would round S, which the
        # kernels' path does not)
        af, bf = a.float(), b.float()
        for r0, r1 in _blocks(n, block):
            s = (af[r0:r1] @ bf.t()).mul_(inv_t)
            lse_row[r0:r1] = torch.logsumexp(s, 1)
            if symmetric:
                lse_col = torch.logaddexp(lse_col, torch.logsumexp(s, 0))
            if weights is None:
                target_row[r0:r1] = s.diagonal(r0)
                if symmetric:
                    target_col[r0:r1] = s.diagonal(r0)
            else:
                w = weights[r0:r1].float()
                target_row[r0:r1] = (w * s).sum(1) / w.sum(1)
                if symmetric:
                    target_col += (w * s).sum(0) / col_norm
        rows = lse_row - target_row
        if symmetric:
            rows = (rows + (lse_col - target_col)) / 2
        ctx.save_for_backward(a, b, weights, lse_row, lse_col if symmetric else None, col_norm)
        ctx.args = (inv_t, symmetric, block)
        return rows

    @staticmethod
    @once_differentiable("contrastive_loss")
    @runs_without_autocast
    def backward(ctx, grad_rows):
        a, b, weights, lse_row, lse_col, col_norm = ctx.saved_tensors
        inv_t, symmetric, block = ctx.args
        n = a.shape[0]
        half = 0.5 if symmetric else 1.0
        g = grad_rows.float() * half          # d(total)/d(row term i) = d(total)/d(col term i)
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.empty(a.shape, dtype=torch.float32, device=a.device) if need_a else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        af, bf = a.float(), b.float()   # once (no copy for float32), not once per block
        for r0, r1 in _blocks(n, block):
            s = (af[r0:r1] @ bf.t()).mul_(inv_t)
            # row term: g_i (softmax(S_i) - w~_i); column term: g_j (softmax(S_:,j)_i - w~'_ij);
            # two block-sized buffers in all (s is reused for the column term)
            ds = (s - lse_row[r0:r1, None]).exp_().mul_(g[r0:r1, None])
            if symmetric:
                ds += s.sub_(lse_col[None, :]).exp_().mul_(g[None, :])
            if weights is None:
                idx = torch.arange(r0, r1, device=a.device)
                ds[idx - r0, idx] -= g[r0:r1] * (2.0 if symmetric else 1.0)
            else:
                w = weights[r0:r1].float()
                ds -= w / w.sum(1, keepdim=True) * g[r0:r1, None]
                if symmetric:
                    ds -= w / col_norm[None, :] * g[None, :]
            ds.mul_(inv_t)
            if need_a:
                grad_a[r0:r1] = ds @ bf
            if need_b:
                grad_b.addmm_(ds.t(), af[r0:r1])
        return (grad_a.to(a.dtype) if need_a else None, grad_b.to(b.dtype) if need_b else None,
                None, None, None, None)


@torch.library.register_fake("fastloss::contrastive_forward")
def _fake_contrastive_forward(a, b, inv_t, symmetric, block_rows, keep):
    n = a.shape[0]
    kept = (n, n) if keep and block_rows >= n else (0, 0)
    f32 = dict(dtype=torch.float32)
    return (a.new_empty((n,), **f32), a.new_empty((n,), **f32),
            a.new_empty((n if symmetric else 0,), **f32), a.new_empty(kept, **f32))


@torch.library.register_fake("fastloss::contrastive_backward")
def _fake_contrastive_backward(grad_rows, a, b, lse_row, lse_col, s_kept, inv_t, symmetric,
                               block_rows, grad_mask):
    return (a.new_empty(a.shape if grad_mask[0] else (0,), dtype=torch.float32),
            b.new_empty(b.shape if grad_mask[1] else (0,), dtype=torch.float32))


@torch.library.register_fake("fastloss::contrastive_loss")
def _fake_contrastive_loss(a, b, inv_t, symmetric, block_rows, reduction, round_loss=False):
    torch._check(a.dim() == 2 and b.shape == a.shape, lambda: "a and b must be [B, D] of the same shape")
    return fake_loss(a, (a.shape[0],) if reduction == 0 else (), round_loss)


_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def _temperature_tensor(fn: str, T: Tensor, a: Tensor) -> Tensor:
    """A tensor temperature, checked: one floating element, on a's device (or a 0-d CPU
    tensor, as torch takes for a scalar), finite and > 0 where its value can be read."""
    if T.numel() != 1 or not T.is_floating_point():
        raise ValueError(f"{fn}: T must be a number or a one-element floating tensor, got a "
                         f"{T.dtype} tensor of shape {tuple(T.shape)}")
    if T.device != a.device and not (T.device.type == "cpu" and T.dim() == 0):
        raise ValueError(f"{fn}: T is on {T.device} but a is on {a.device}")
    if T.device != a.device and T.requires_grad and torch.is_grad_enabled():
        # (its gradient, formed on a's device, would be copied to the CPU: a wait for the device
        # in every backward, and the optimizer's step on the CPU)
        raise ValueError(f"{fn}: T requires grad on {T.device} but a is on {a.device}: move T "
                         f"(nn.ContrastiveLoss's logit_scale: the module) to a's device")
    if values_readable(T):
        _check_temperature(fn, float(T.detach()))
    return T.reshape(()).float()


def _check_temperature(fn: str, T: float) -> None:
    require_finite(fn, T=T)
    if not T > 0:
        raise ValueError(f"{fn}: T must be > 0, got {T}")


def contrastive_loss(a: Tensor, b: Tensor, T: Union[float, Tensor] = 0.07,
                     weights: Optional[Tensor] = None, symmetric: bool = True,
                     reduction: str = "mean", block_rows: Optional[int] = None) -> Tensor:
    """InfoNCE / CLIP loss between paired embeddings (see the module docstring).

    Args:
        a, b: ``[B, D]`` embeddings, used as given: normalise them first for cosine
            similarities (NT-Xent / CLIP do; ``multi_similarity_loss`` and ``tcm_loss``
            normalise inside). The negatives of ``a_i`` are the other ``b_j`` only (CLIP's
            loss), not SimCLR's 2B x 2B NT-Xent with negatives in its own view.
        T: temperature > 0: a number, or a one-element floating tensor, which may require grad
            (CLIP's learnt temperature, e.g. ``T = 1 / logit_scale.exp()``): then ``a / T`` is
            formed in float32 by torch (one ``[B, D]`` operation, which autograd
            differentiates for ``T``) and the loss taken at temperature 1, so the value is read
            on no device (its ``> 0`` check runs for CPU tensors only; on a GPU a ``T <= 0``
            gives a meaningless loss rather than an error).
        weights: optional ``[B, B]`` non-negative CWCL weights (every row and column must have a
            positive sum); no gradient flows to them.
        symmetric: average the ``a -> b`` and ``b -> a`` terms (True) or keep ``a -> b`` only.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``: row ``i``'s term, averaged with
            column ``i``'s when symmetric).
        block_rows: rows of ``a`` per block (None: 64 MiB of float32 similarities).
    """
    fn = "contrastive_loss"
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if a.dim() != 2 or b.shape != a.shape:
        raise ValueError(f"{fn}: a and b must be [B, D] of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16) or b.dtype != a.dtype:
        # (float64 too: the kernels compute in float32, which a float64 result would hide)
        raise ValueError(f"{fn}: a and b must share a dtype among float32, float16 and bfloat16, got "
                         f"{a.dtype} and {b.dtype}")
    if isinstance(T, Tensor):
        t = _temperature_tensor(fn, T, a)
        loss = contrastive_loss(a.float() / t, b.float(), 1.0, weights, symmetric, reduction, block_rows)
        return as_loss_dtype(loss, a)
    _check_temperature(fn, T)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    n = a.shape[0]
    if weights is not None:
        if tuple(weights.shape) != (n, n):
            raise ValueError(f"{fn}: weights must be [{n}, {n}], got {tuple(weights.shape)}")
        if weights.device != a.device:
            raise ValueError(f"{fn}: weights is on {weights.device} but a is on {a.device}")
        refuse_grad(fn, "weights", weights, "the CWCL weights (computed beforehand, as constants)")
        if not weights.is_floating_point():  # (a bool / integer mask of positives: its values)
            weights = weights.float()
        # (a zero row sum divides 0 by 0)
        if n and values_readable(weights):
            w = weights.detach()
            lo, hi = torch.aminmax(w)  # (one pass; a NaN makes hi NaN)
            if bool(lo < 0) or not bool(torch.isfinite(hi)):
                raise ValueError(f"{fn}: weights must be finite and >= 0")
            if bool((w.sum(1) <= 0).any()) or (symmetric and bool((w.sum(0) <= 0).any())):
                raise ValueError(f"{fn}: every row of weights (and column, when symmetric) needs a "
                                 f"positive sum")
    block_rows = as_int(block_rows)
    if block_rows is None:
        block_rows = max(1, _BLOCK_BYTES // (4 * max(n, 1)))
    elif not (isinstance(block_rows, int) and not isinstance(block_rows, bool) and block_rows > 0):
        raise ValueError(f"{fn}: block_rows must be a positive int or None, got {block_rows!r}")
    if weights is None and has_kernel(a):
        # one op with its C++ autograd formula (pair_losses_op.cpp): contrastive_forward's blocks
        # (clip_rows per block: row and column log-sum-exps, diagonal), the reduction, and
        # contrastive_backward (clip_rows_grad_ per block; S handed over when it is one block)
        return call_rounding(torch.ops.fastloss.contrastive_loss, a, a, b, 1.0 / float(T), bool(symmetric),
                             block_rows, _REDUCTION[reduction])
    rows = _Contrastive.apply(a, b, weights, 1.0 / float(T), bool(symmetric), block_rows)
    if reduction == "mean":
        return as_loss_dtype(rows.mean(), a)
    if reduction == "sum":
        return as_loss_dtype(rows.sum(), a)
    return as_loss_dtype(rows, a)
