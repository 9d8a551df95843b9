"""Vocabulary-parallel linear + cross-entropy: the LM head's weight sharded along the vocabulary
over the ranks of a ``torch.distributed`` process group (as tensor parallelism shards it).

Part of the linear-losses family (:mod:`fastloss.ops.linear_losses`). Every rank holds the
same ``hidden [N, D]`` and ``target [N]`` and its own contiguous slice of the vocabulary,
``weight_shard [V_r, D]`` (rank 0 the first ``V_0`` classes, rank 1 the next ``V_1``, ...;
shards may differ in size). The loss and the gradients equal those of
:func:`fastloss.ops.linear_cross_entropy` on the whole ``weight``:

* forward: each rank forms its logits tile by tile (never ``[N, V_r]`` at once) and keeps
  three numbers per token: the log-sum-exp of its classes, the target's logit when the target
  is one of its classes, and the (class-weighted) sum of its logits (label smoothing only);
  one ``all_gather`` of those ``[N, 3]`` statistics gives every rank the whole loss;
* backward: each rank forms its tiles again and returns the gradient of its own
  ``weight_shard`` (and ``bias_shard``); ``hidden``'s gradient, a sum over the shards, is
  all-reduced, as the input gradient of a column-parallel linear layer is.

The tiles are a few hundred classes or more by every row, or by a thousand-odd rows where every
row would pass the tile's budget (the ``linear_ce_tile_*`` ops,
``csrc/linear_losses/linear_ce_tiles_op.cpp``: a GEMM per tile, then float32 torch math on it
on the CPU, one kernel pass over the tile in the inputs' dtype on CUDA);
:func:`fastloss.ops.linear_cross_entropy` with ``low_memory=True`` is the same computation on
one process. Collectives work with NCCL (CUDA tensors) and with gloo (CPU tensors).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._autograd import once_differentiable, refuse_grad
from ._checks import as_int
from ._dtypes import as_loss_dtype, cast_for_autocast
from .losses import _check_reduction, cross_entropy_scalars

_FN = "vocab_parallel_linear_cross_entropy"


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


def filter_threshold(fn: str, filter_eps, dtype: torch.dtype, label_smoothing: float) -> float:
    """Gradient filtering's threshold from the user's ``filter_eps``: None -> 0 (off: exact
    gradients), ``"auto"`` -> ``torch.finfo(dtype).eps / 32`` (Cut Cross-Entropy's default:
    2^-12 for bfloat16, 2^-15 for float16, 2^-28 for float32), else a finite float >= 0.
    Refused with label smoothing: its term, the same sign in every class and below any useful
    threshold, would be left out wholesale, not approximated."""
    if filter_eps is None:
        return 0.0
    if label_smoothing:
        raise ValueError(f"{fn}: filter_eps cannot be used with label_smoothing: the smoothing "
                         f"term of every class is below any useful threshold and would be left "
                         f"out wholesale, not approximated")
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"{fn}: filter_eps must be None, 'auto' or a float >= 0, got {filter_eps!r}")
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, numbers.Real) or \
            not math.isfinite(filter_eps) or filter_eps < 0:
        raise ValueError(f"{fn}: filter_eps must be None, 'auto' or a finite float >= 0, got {filter_eps!r}")
    return float(filter_eps)


# ---- fake kernels of the tile ops (linear_losses/linear_ce_tiles_op.cpp) ------------------------

@torch.library.register_fake("fastloss::linear_ce_tile_stats")
def _fake_stats(hidden, weight, bias, target, class_weight, class_offset, softcap, weighted_sum,
                tile_cols, tile_rows=0):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                 lambda: "hidden must be [N, D] and weight [V, D]")
    return hidden.new_empty((hidden.shape[0], 3), dtype=torch.float32)


@torch.library.register_fake("fastloss::linear_ce_tile_grads")
def _fake_grads(hidden, weight, bias, target, class_weight, class_offset, softcap, lse, coef,
                smoothing, grad_mask, tile_cols, tile_rows=0, filter_eps=0.0):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                 lambda: "hidden must be [N, D] and weight [V, D]")
    n, d = hidden.shape
    v = weight.shape[0]
    f32 = torch.float32
    with_bias = grad_mask[2] and bias is not None
    return (hidden.new_empty((n, d) if grad_mask[0] else (0,), dtype=f32),
            weight.new_empty((v, d) if grad_mask[1] else (0,)),
            hidden.new_empty((v,) if with_bias else (0,), dtype=bias.dtype if with_bias else f32))


# ---- the loss over tiles of the vocabulary, on one process or over a group's shards -------------

class TiledCrossEntropy(torch.autograd.Function):
    """Cross-entropy of hidden @ weight.T + bias where weight holds the classes
    [first, first + V_r) of a vocabulary of `total`: on one process (parallel=False: first = 0,
    total = V_r) or as one rank's shard (parallel=True: statistics gathered over `group`).

    forward(hidden [N, D], weight [V_r, D], bias [V_r] or None, target [N] int64,
            class_weight [total] float32 or None, group, parallel, first, total, ignore_index,
            reduction, label_smoothing, lse_square_scale, softcap (0: none), tile_cols,
            filter_eps (0: exact gradients; see filter_threshold))
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, group, parallel, first, total,
                ignore_index, reduction, smoothing, z_scale, softcap, tile, filter_eps=0.0):
        n, v_r = hidden.shape[0], weight.shape[0]
        valid = target != ignore_index
        w_local = class_weight[first:first + v_r] if class_weight is not None else None
        stats = torch.ops.fastloss.linear_ce_tile_stats(hidden, weight, bias, target, w_local,
                                                        first, softcap, smoothing != 0, tile)
        if parallel:
            every = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
            dist.all_gather(every, stats, group=group)
            every = torch.stack(every)                   # [world, N, 3]
            lse = torch.logsumexp(every[:, :, 0], dim=0)
            z_y, sum_wz = every[:, :, 1].sum(0), every[:, :, 2].sum(0)
        else:
            lse, z_y, sum_wz = stats.unbind(1)
        safe_t = torch.where(valid, target, 0)
        w_y = (class_weight[safe_t] if class_weight is not None
               else torch.ones(n, device=hidden.device)) * valid
        w_total = (class_weight.sum() if class_weight is not None
                   else torch.full((), float(total), device=hidden.device))  # (a fill: no copy)
        rows = w_y * ((1.0 - smoothing) * (lse - z_y) + z_scale * lse * lse)
        if smoothing:
            rows = rows + (smoothing / total) * (w_total * lse - sum_wz) * valid
        denom = w_y.sum() if reduction == "mean" else None
        loss = rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.sum() / denom
        ctx.save_for_backward(hidden, weight, bias, target, w_local, lse, w_y, w_total, denom)
        # (one process: the backward reads `total` off the saved weight, so that no size of a
        # torch.compile(dynamic=True) graph is kept on ctx, which dynamo could not wire)
        ctx.args = (group, parallel, first, total if parallel else None, ignore_index, reduction,
                    smoothing, z_scale, softcap, tile, filter_eps)
        # float32 (the caller gives the dtype: _dtypes.py); a copy: torch 2.11's torch.compile
        # gave zero gradients when this returned `loss` itself (2.13 / 2.14 did not)
        return loss.clone()

    @staticmethod
    @once_differentiable("linear_cross_entropy (low_memory=True) / vocab_parallel_linear_cross_entropy")
    def backward(ctx, grad):
        hidden, weight, bias, target, w_local, lse, w_y, w_total, denom = ctx.saved_tensors
        group, parallel, first, total, ignore_index, reduction, smoothing, z_scale, softcap, tile, eps = ctx.args
        total = total if parallel else weight.shape[0]
        valid = target != ignore_index
        g = grad.float()
        if reduction == "mean":
            g = torch.where(denom != 0, g / denom, 0.0)
        g = g.expand(hidden.shape[0]) if g.dim() == 0 else g   # d(total)/d(row loss)
        # d(row)/d(z_k) = a p_k - (1-eps) w_y [k = y] - (eps/V) w_k, with p = softmax(z)
        a = g * (w_y * (1.0 - smoothing + 2.0 * z_scale * lse) + (smoothing / total) * w_total * valid)
        coef = torch.stack([a, g * w_y * (1.0 - smoothing), (smoothing / total) * g * valid], 1)
        need = list(ctx.needs_input_grad[:3])
        need[2] = need[2] and bias is not None
        gh, gw, gb = torch.ops.fastloss.linear_ce_tile_grads(
            hidden, weight, bias, target, w_local, first, softcap, lse, coef, smoothing != 0,
            need, tile, 0, eps)
        if parallel and need[0]:  # hidden's gradient is the sum of every shard's part
            dist.all_reduce(gh, group=group)
        return (gh.to(hidden.dtype) if need[0] else None, gw if need[1] else None,
                gb if need[2] else None) + (None,) * 13


def vocab_parallel_linear_cross_entropy(
        hidden: Tensor, weight_shard: Tensor, target: Tensor, bias_shard: Optional[Tensor] = None,
        group: Optional[dist.ProcessGroup] = None, *, vocab_size: Optional[int] = None,
        class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
        label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
        softcap: Optional[float] = None, tile_cols: Optional[int] = None,
        filter_eps=None) -> Tensor:
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
        tile_cols: classes per tile (None: as many as fit 2 MiB of float32 logits (CPU) or
            256 MiB of logits in the inputs' dtype (CUDA) for all the rows, at least 512; the
            rows then come in blocks that keep the tile within that budget).
        filter_eps: gradient filtering, as in :func:`fastloss.ops.linear_cross_entropy`
            (``low_memory=True``); None (default) gives exact gradients.
        Other arguments as :func:`fastloss.ops.linear_cross_entropy`.

    Returns the same value on every rank; backward gives each rank its own shard's gradient
    and the full gradient of ``hidden``.
    """
    _check_reduction(_FN, reduction)
    smoothing, z_scale, cap = cross_entropy_scalars(_FN, label_smoothing, lse_square_scale, softcap)
    refuse_grad(_FN, "class_weight", class_weight, "the class weights (as F.cross_entropy)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_FN}: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_FN}: {name} must be a Tensor, got {type(t).__name__}")
    if bias_shard is not None and not isinstance(bias_shard, Tensor):
        raise TypeError(f"{_FN}: bias_shard must be a Tensor or None, got {type(bias_shard).__name__} "
                        "(the process group is the fifth argument, group=)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        if group == dist.GroupMember.NON_GROUP_MEMBER:   # (what new_group gives the ranks outside it)
            raise ValueError(f"{_FN}: this rank ({dist.get_rank()}) is not a member of group: call the "
                             "op on the group's ranks only")
        raise TypeError(f"{_FN}: group must be a torch.distributed ProcessGroup or None (the world), "
                        f"got {type(group).__name__}")
    # the shard and its bias cast as F.linear casts them under autocast (as linear_cross_entropy
    # does; float32 master weights under autocast had been refused)
    hidden, weight_shard, bias_shard = cast_for_autocast(hidden, weight_shard, bias_shard)
    if hidden.dim() < 1:
        raise ValueError(f"{_FN}: hidden must be [..., D] (at least 1-D), got a 0-d tensor")
    if weight_shard.dim() != 2 or hidden.shape[-1] != weight_shard.shape[1]:
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
    tile_cols = as_int(tile_cols)
    if tile_cols is not None and not (isinstance(tile_cols, int) and not isinstance(tile_cols, bool)
                                      and tile_cols > 0):
        raise ValueError(f"{_FN}: tile_cols must be a positive int or None, got {tile_cols!r}")
    eps = filter_threshold(_FN, filter_eps, hidden.dtype, smoothing)
    cw = class_weight.float() if class_weight is not None else None
    out = TiledCrossEntropy.apply(h, weight_shard, bias_shard, t, cw, group, True, first, total,
                                  ignore_index, reduction, smoothing, z_scale, cap, tile_cols or 0, eps)
    out = as_loss_dtype(out, hidden)
    return out.reshape(target.shape) if reduction == "none" else out
