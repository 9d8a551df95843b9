"""Vocabulary-parallel linear + cross-entropy: the LM head's weight sharded along the vocabulary
over the ranks of a ``torch.distributed`` process group (as tensor parallelism shards it).

Part of the linear-losses family (:mod:`fastloss.ops.linear_losses`). Every rank holds the
same ``hidden [N, D]`` and ``target [N]`` and its own contiguous slice of the vocabulary,
``weight_shard [V_r, D]`` (rank 0 the first ``V_0`` classes, rank 1 the next ``V_1``, ...;
shards may differ in size). The loss and the gradients equal those of
:func:`fastloss.ops.linear_cross_entropy` on the whole ``weight``:

* forward: each rank forms its logits block by block (never ``[N, V_r]`` at once) and keeps
  three numbers per token: the log-sum-exp of its classes, the target's logit when the target
  is one of its classes, and the (class-weighted) sum of its logits (label smoothing only);
  one ``all_gather`` of those ``[N, 3]`` statistics gives every rank the whole loss;
* backward: each rank forms its blocks again and returns the gradient of its own
  ``weight_shard`` (and ``bias_shard``); ``hidden``'s gradient, a sum over the shards, is
  all-reduced, as the input gradient of a column-parallel linear layer is.

The per-block math runs as torch operations on float32 blocks (not the fused kernels of the
single-process op, which need whole rows). Collectives work with NCCL (CUDA tensors) and with
gloo (CPU tensors). Not traceable by torch.compile (it calls torch.distributed directly).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .losses import _check_reduction, cross_entropy_scalars

_FN = "vocab_parallel_linear_cross_entropy"
_DEFAULT_BLOCK_BYTES = 64 << 20


def _shard_layout(weight_shard: Tensor, group, vocab_size: Optional[int]) -> tuple[int, int, int]:
    """(first class of this shard, total classes, rank) from every rank's (V_r, D)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([weight_shard.shape[0], weight_shard.shape[1]], dtype=torch.int64,
                        device=weight_shard.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    sizes = [int(x[0]) for x in every]
    dims = {int(x[1]) for x in every}
    if len(dims) != 1:
        raise ValueError(f"{_FN}: the weight shards have different D across the ranks: "
                         f"{[int(x[1]) for x in every]}")
    total = sum(sizes)
    if vocab_size is not None and total != vocab_size:
        raise ValueError(f"{_FN}: the weight shards of the {world} ranks hold {sizes} classes, "
                         f"{total} in all, but vocab_size is {vocab_size}")
    return sum(sizes[:rank]), total, rank


def _block_logits(h: Tensor, w: Tensor, b: Optional[Tensor], softcap: float):
    """float32 logits of a block (after the soft cap), and d(capped)/d(raw) for the backward."""
    x = (h @ w.t() if b is None else torch.addmm(b, h, w.t())).float()
    if not softcap:
        return x, None
    z = torch.tanh(x / softcap)
    dz = 1.0 - z * z
    return z.mul_(softcap), dz


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, group, first, total, ignore_index,
                reduction, smoothing, z_scale, softcap, block):
        n, v_r = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        valid = target != ignore_index
        local_t = target - first
        mine = valid & (local_t >= 0) & (local_t < v_r)
        idx = local_t.clamp(0, max(v_r - 1, 0))  # gathered only where `mine`: no host sync
        w_local = class_weight[first:first + v_r] if class_weight is not None else None
        stats = torch.zeros(n, 3, dtype=torch.float32, device=dev)  # lse_r, z_y (mine), sum w z
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            z, _ = _block_logits(hidden[r0:r1], weight, bias, softcap)
            stats[r0:r1, 0] = torch.logsumexp(z, dim=1)
            stats[r0:r1, 1] = z.gather(1, idx[r0:r1, None]).squeeze(1) * mine[r0:r1]
            if smoothing:
                stats[r0:r1, 2] = (z @ w_local) if w_local is not None else z.sum(1)
        every = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, stats, group=group)
        every = torch.stack(every)                        # [world, N, 3]
        lse = torch.logsumexp(every[:, :, 0], dim=0)
        z_y = every[:, :, 1].sum(0)
        sum_wz = every[:, :, 2].sum(0)

        safe_t = torch.where(valid, target, 0)
        w_y = (class_weight[safe_t] if class_weight is not None
               else torch.ones(n, device=dev)) * valid
        w_total = class_weight.sum() if class_weight is not None else torch.tensor(float(total), device=dev)
        rows = w_y * ((1.0 - smoothing) * (lse - z_y) + z_scale * lse * lse)
        if smoothing:
            rows = rows + (smoothing / total) * (w_total * lse - sum_wz) * valid
        if reduction == "none":
            loss = rows
            denom = None
        elif reduction == "sum":
            loss = rows.sum()
            denom = None
        else:
            denom = w_y.sum()
            loss = rows.sum() / denom
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse, w_y, denom)
        ctx.args = (group, first, total, ignore_index, reduction, smoothing, z_scale, softcap,
                    block, w_total)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, target, class_weight, lse, w_y, denom = ctx.saved_tensors
        group, first, total, ignore_index, reduction, smoothing, z_scale, softcap, block, w_total = ctx.args
        n, v_r = hidden.shape[0], weight.shape[0]
        g = grad.float()
        if reduction == "mean":
            g = torch.where(denom != 0, g / denom, 0.0)
        g = g.expand(n) if g.dim() == 0 else g            # d(total)/d(row loss)
        # d(row)/d(z_k) = a p_k - (1-eps) w_y [k = y] - (eps/V) w_k, with p = softmax(z)
        a = g * (w_y * (1.0 - smoothing + 2.0 * z_scale * lse) + (smoothing / total) * w_total
                 * (target != ignore_index))
        hit = g * w_y * (1.0 - smoothing)
        local_t = target - first
        mine = (target != ignore_index) & (local_t >= 0) & (local_t < v_r)
        idx = local_t.clamp(0, max(v_r - 1, 0))
        hit = hit * mine
        w_local = class_weight[first:first + v_r] if class_weight is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(v_r, dtype=torch.float32, device=weight.device) if need_b else None
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            z, dz = _block_logits(hidden[r0:r1], weight, bias, softcap)
            gz = z.sub_(lse[r0:r1, None]).exp_().mul_(a[r0:r1, None])
            gz.scatter_add_(1, idx[r0:r1, None], -hit[r0:r1, None])
            if smoothing:
                step = (smoothing / total) * g[r0:r1, None] * (target[r0:r1, None] != ignore_index)
                gz -= step * (w_local[None, :] if w_local is not None else 1.0)
            if dz is not None:
                gz.mul_(dz)
            if need_h:
                grad_h[r0:r1] = (gz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(gz.t(), hidden[r0:r1].float())
            if need_b:
                grad_b += gz.sum(0)
        if need_h:  # hidden's gradient is the sum of every shard's part
            dist.all_reduce(grad_h, group=group)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None) + (None,) * 11


def vocab_parallel_linear_cross_entropy(
        hidden: Tensor, weight_shard: Tensor, target: Tensor, bias_shard: Optional[Tensor] = None,
        group: Optional[dist.ProcessGroup] = None, *, vocab_size: Optional[int] = None,
        class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
        label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
        softcap: Optional[float] = None, block_rows: Optional[int] = None) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` with ``weight`` sharded along the classes.

    Args:
        hidden: ``[..., D]``, the same on every rank of ``group``.
        weight_shard: this rank's ``[V_r, D]`` rows of the full ``[V, D]`` weight; rank ``r``
            holds the classes after those of ranks ``0..r-1``.
        target: class indices ``[...]`` into the full vocabulary, the same on every rank.
        bias_shard: optional ``[V_r]`` slice of the bias.
        group: the process group (default: the world).
        vocab_size: optional check that the shards add up to this many classes.
        class_weight: optional ``[V]`` weights of all the classes, the same on every rank.
        Other arguments as :func:`fastloss.ops.linear_cross_entropy`.

    Returns the same value on every rank; backward gives each rank its own shard's gradient
    and the full gradient of ``hidden``.
    """
    _check_reduction(_FN, reduction)
    smoothing, z_scale, cap = cross_entropy_scalars(_FN, label_smoothing, lse_square_scale, softcap)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_FN}: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_FN}: {name} must be a Tensor, got {type(t).__name__}")
    if weight_shard.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight_shard.shape[1]:
        raise ValueError(f"{_FN}: weight_shard must be [V_r, D] with D = hidden.shape[-1] "
                         f"({hidden.shape[-1]}), got {tuple(weight_shard.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_FN}: target must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{_FN}: target must hold class indices (int64 or int32), got {target.dtype}")
    if weight_shard.dtype != hidden.dtype or (bias_shard is not None and bias_shard.dtype != hidden.dtype):
        raise ValueError(f"{_FN}: weight_shard and bias_shard must have hidden's dtype ({hidden.dtype})")
    if weight_shard.shape[0] == 0:
        raise ValueError(f"{_FN}: weight_shard must hold at least one class on every rank")
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"{_FN}: bias_shard must be [{weight_shard.shape[0]}], got {tuple(bias_shard.shape)}")
    first, total, _ = _shard_layout(weight_shard, group, vocab_size)
    if class_weight is not None and tuple(class_weight.shape) != (total,):
        raise ValueError(f"{_FN}: class_weight must be [{total}] (all the classes), got "
                         f"{tuple(class_weight.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).long()
    bad = (t != ignore_index) & ((t < 0) | (t >= total))
    if t.device.type == "cpu" and bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{_FN}: target[{i}] = {int(t[i])} is not a class index in [0, {total}) "
                         f"nor ignore_index ({ignore_index})")
    if block_rows is None:
        block_rows = max(1, _DEFAULT_BLOCK_BYTES // max(1, 4 * weight_shard.shape[0]))
    elif not (isinstance(block_rows, int) and block_rows > 0):
        raise ValueError(f"{_FN}: block_rows must be a positive int or None, got {block_rows!r}")
    cw = class_weight.float() if class_weight is not None else None
    out = _VocabParallelCE.apply(h, weight_shard, bias_shard, t, cw, group, first, total,
                                 ignore_index, reduction, smoothing, z_scale, cap, block_rows)
    return out.reshape(target.shape) if reduction == "none" else out
