"""Final linear layer + classification loss, fused: the ``[N, V]`` logits are never stored.

``linear_cross_entropy(hidden, weight, target, ...)`` equals
``cross_entropy(hidden @ weight.T + bias, target, ...)`` (:mod:`fastloss.ops.losses`), and so
on for each loss of that module. The op (``linear_losses_op.cpp``) forms the logits for one
block of rows at a time with a GEMM into one reused buffer, runs the row-loss kernels on the
block, turns it in place into d(loss)/d(logits), and folds that into ``grad_hidden`` and
``grad_weight`` with two more GEMMs. Extra memory: one block (by default as many rows as fit
the size of a float32 ``grad_weight``, clamped to 16-256 MiB of logits, on CUDA to 1 GiB but
at most half the rows; ``block_rows`` to choose), plus float32 accumulators for ``grad_weight`` and
``grad_bias`` (of reduced-precision weights). For ``reduction`` mean or sum with gradients
wanted, the gradients are computed in the forward (three GEMMs in all, as unfused); for
``"none"`` the backward forms every block again (four).

Common arguments:

* ``hidden``: ``[..., D]`` float32, float16 or bfloat16 (leading dimensions are flattened).
* ``weight``: ``[V, D]``, as ``nn.Linear`` stores it; ``bias``: optional ``[V]``; both in
  ``hidden``'s dtype (under ``torch.autocast`` all three are cast as ``F.linear`` would be).
* ``target``: class indices ``[...]`` matching ``hidden``'s leading dimensions.
* ``class_weight``: optional per-class weights ``[V]`` (``weight=`` of ``F.cross_entropy``).
* ``ignore_index``, ``reduction``: as in :func:`torch.nn.functional.cross_entropy`;
  ``"none"`` returns the target's shape. The loss has ``hidden``'s dtype, or float32 under
  autocast (as ``F.cross_entropy`` after ``F.linear`` gives it).
* ``block_rows``: rows of logits formed at once (None: as many as fit a float32 ``grad_weight``'s
  size, 16-256 MiB; on CUDA up to 1 GiB, at most half the rows); with ``low_memory=True``, classes per tile instead.

Gradients flow to ``hidden``, ``weight`` and ``bias``. The logits of a block have ``hidden``'s
dtype, as unfused ``hidden @ weight.T`` would; every reduction over classes is float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._autograd import refuse_grad
from ._checks import as_int, values_readable
from ._dtypes import as_loss_dtype, call_rounding, cast_for_autocast, fake_loss
from .losses import (
    _check_reduction,
    _REDUCTION_CODE,
    comp_sum_scalars,
    cross_entropy_scalars,
    ldr_scalars,
    spherical_z_scalars,
)

# LossKind codes of csrc/losses/loss_params.h
_KIND = {"cross_entropy": 0, "comp_sum": 1, "ldr": 2, "spherical_z": 3, "stablemax": 4}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---- fake kernels (shapes for torch.compile and meta tensors) -------------------------------

def _check_fake(hidden, weight, target, bias, class_weight):
    """The argument checks of linear_losses_op.cpp that depend on shapes and dtypes only
    (ValueError, as the op's)."""
    check = torch._check_value
    check(hidden.dim() == 2, lambda: f"hidden must be 2-D [N, D], got {tuple(hidden.shape)}")
    check(weight.dim() == 2, lambda: f"weight must be 2-D [V, D], got {tuple(weight.shape)}")
    check(weight.shape[0] > 0, lambda: "weight must have at least one row (class)")
    check(weight.shape[1] == hidden.shape[1],
          lambda: f"hidden has D = {hidden.shape[1]} but weight has {weight.shape[1]} columns")
    check(hidden.dtype in _FLOATS, lambda: f"hidden must be float32/16 or bfloat16, got {hidden.dtype}")
    check(weight.dtype == hidden.dtype, lambda: f"weight is {weight.dtype} but hidden is {hidden.dtype}")
    check(target.dim() == 1 and target.shape[0] == hidden.shape[0],
          lambda: f"target must be [{hidden.shape[0]}], got {tuple(target.shape)}")
    check(target.dtype in (torch.int64, torch.int32, torch.uint8),
          lambda: f"target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    check(bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.dtype == hidden.dtype),
          lambda: f"bias must be [{weight.shape[0]}] of hidden's dtype")
    check(class_weight is None or (class_weight.dim() == 1 and class_weight.shape[0] == weight.shape[0]),
          lambda: f"class_weight must be [{weight.shape[0]}]")


@torch.library.register_fake("fastloss::linear_loss_forward")
def _fake_forward(hidden, weight, target, bias, class_weight, kind, scalars, ignore_index,
                  grad_mask, block_rows):
    _check_fake(hidden, weight, target, bias, class_weight)
    n, d = hidden.shape
    v = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    rows = tuple(hidden.new_empty((n,), **f32) for _ in range(3))
    return rows + (hidden.new_empty((n if grad_mask[0] else 0, d)),
                   hidden.new_empty((v, d) if grad_mask[1] else (0,), **f32),
                   hidden.new_empty((v,) if grad_mask[2] and bias is not None else (0,), **f32))


@torch.library.register_fake("fastloss::linear_loss_backward")
def _fake_backward(grad_loss, hidden, weight, target, bias, class_weight, stat0, stat1, kind,
                   scalars, ignore_index, grad_mask, block_rows):
    _check_fake(hidden, weight, target, bias, class_weight)
    n, d = hidden.shape
    v = weight.shape[0]
    bias_dtype = bias.dtype if bias is not None else torch.float32
    return (hidden.new_empty((n if grad_mask[0] else 0, d)),
            weight.new_empty((v, d) if grad_mask[1] else (0,)),
            hidden.new_empty((v,) if grad_mask[2] and bias is not None else (0,), dtype=bias_dtype))


@torch.library.register_fake("fastloss::linear_loss")
def _fake_loss(hidden, weight, target, bias, class_weight, kind, scalars, ignore_index,
               reduction, block_rows, round_loss=False):
    _check_fake(hidden, weight, target, bias, class_weight)
    return fake_loss(hidden, (hidden.shape[0],) if reduction == 0 else (), round_loss)


# ---- the call shared by the public functions -------------------------------------------------

def _linear_loss(fn: str, kind: str, hidden: Tensor, weight: Tensor, target: Tensor,
                 bias: Optional[Tensor], class_weight: Optional[Tensor], ignore_index: int,
                 reduction: str, block_rows: Optional[int], scalars: tuple,
                 low_memory: bool = False, filter_eps=None) -> Tensor:
    _check_reduction(fn, reduction)
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("class_weight", class_weight)):
        if t is not None and not isinstance(t, Tensor):  # (cut-cross-entropy's 5th argument is ignore_index)
            raise TypeError(f"{fn}: {name} must be a Tensor or None, got {type(t).__name__} (the "
                            f"arguments after bias are best given by keyword)")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must be [..., D] (at least 1-D), got a 0-d tensor")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{fn}: target must have hidden's leading shape {tuple(hidden.shape[:-1])} "
                         f"(hidden is [..., D]), got {tuple(target.shape)}")
    block_rows = as_int(block_rows)
    if block_rows is not None and not (isinstance(block_rows, int) and not isinstance(block_rows, bool)
                                       and block_rows > 0):
        raise ValueError(f"{fn}: block_rows must be a positive int or None, got {block_rows!r}")
    refuse_grad(fn, "class_weight", class_weight, "the class weights (as F.cross_entropy)")
    if filter_eps is not None and not low_memory:
        raise ValueError(f"{fn}: filter_eps (gradient filtering) applies to low_memory=True, whose "
                         f"backward forms the logits again tile by tile; the default path is exact")
    hidden, weight, bias = cast_for_autocast(hidden, weight, bias)  # (as F.linear)
    # (the row count spelled out: reshape cannot infer it when D = 0)
    h, t = hidden.reshape(target.numel(), hidden.shape[-1]), target.reshape(-1)
    if low_memory:
        _check_tile_inputs(fn, h, weight, t, bias, class_weight, ignore_index)
        from .vocab_parallel import TiledCrossEntropy, filter_threshold
        eps = filter_threshold(fn, filter_eps, h.dtype, scalars[0])  # (scalars: smoothing first)
        cw = class_weight.float() if class_weight is not None else None
        out = as_loss_dtype(TiledCrossEntropy.apply(h, weight, bias, t.long(), cw, None, False, 0,
                                                    weight.shape[0], ignore_index, reduction, *scalars,
                                                    block_rows or 0, eps), h)
    else:  # (the op rounds a 16-bit loss itself: _dtypes.call_rounding)
        out = call_rounding(torch.ops.fastloss.linear_loss.default, h, h, weight, t, bias, class_weight,
                            _KIND[kind], [float(x) for x in scalars], ignore_index,
                            _REDUCTION_CODE[reduction], block_rows or 0)
    return out.reshape(target.shape) if reduction == "none" else out


def _check_tile_inputs(fn, hidden, weight, target, bias, class_weight, ignore_index):
    """The argument checks of the block op (linear_losses_op.cpp), for the tiled path."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight must be [V, D] with V >= 1 and D = {hidden.shape[1]} "
                         f"(hidden's), got {tuple(weight.shape)}")
    if hidden.dtype not in _FLOATS or weight.dtype != hidden.dtype:
        raise ValueError(f"{fn}: hidden and weight must share a dtype among float32, float16, "
                         f"bfloat16, got {hidden.dtype} and {weight.dtype}")
    v = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (v,) or bias.dtype != hidden.dtype):
        raise ValueError(f"{fn}: bias must be [{v}] of hidden's dtype, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if class_weight is not None and (tuple(class_weight.shape) != (v,) or not class_weight.is_floating_point()):
        # (an integer tensor too, as the default path and F.cross_entropy refuse it)
        raise ValueError(f"{fn}: class_weight must be 1-D with one entry per class ({v}), floating, got "
                         f"{class_weight.dtype} {tuple(class_weight.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"{fn}: target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    for name, x in (("weight", weight), ("target", target), ("bias", bias), ("class_weight", class_weight)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{fn}: {name} is on {x.device} but hidden is on {hidden.device}")
    if values_readable(target):
        t = target.long()  # (a uint8 target against ignore_index -100 would wrap it to 156)
        bad = (t != ignore_index) & ((t < 0) | (t >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{fn}: target[{i}] = {int(target[i])} is not a class index in "
                             f"[0, {v}) nor ignore_index ({ignore_index})")


# ---- public functions ----------------------------------------------------------------------

def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                         bias: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None,
                         block_rows: Optional[int] = None, low_memory: bool = False,
                         filter_eps=None) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target, ...)`` without the logits tensor.

    ``hidden`` comes first and ``weight`` is ``nn.Linear``'s ``[V, D]`` (Liger's fused module
    takes the weight first); the loss has ``hidden``'s dtype outside autocast, as torch's losses
    (cut-cross-entropy returns float32); no ``shift``: slice ``hidden[:, :-1]`` and
    ``target[:, 1:]`` for next-token targets.

    The loss options (label smoothing, the PaLM z-loss ``lse_square_scale``, Gemma's
    ``softcap``) are those of :func:`fastloss.ops.cross_entropy`.

    ``low_memory=True`` goes by tiles of the vocabulary instead of blocks of rows: every row
    at once, a few hundred classes at a time (``block_rows`` then gives the classes per tile;
    None: as many as fit 2 MiB of float32 logits (CPU) or 256 MiB of logits in the inputs'
    dtype (CUDA, where one kernel pass does each tile's row work)), so that the extra
    memory beyond the gradients is that one tile; the logits are formed twice (in forward and in backward), four
    GEMMs instead of three. The same computation as
    :func:`fastloss.ops.vocab_parallel_linear_cross_entropy` on one process.

    ``filter_eps`` (``low_memory=True`` only; default None: exact gradients) turns on Cut
    Cross-Entropy's gradient filtering: in the backward, the classes of a tile (in chunks of
    128 on the CPU, 256 on CUDA) whose every gradient entry is at most ``filter_eps`` times its
    row's softmax coefficient (for plain cross-entropy: every probability at most
    ``filter_eps``) are left out of the two gradient GEMMs, so peaked softmaxes cost less; each
    row's target entry is added on its own, never left out. ``"auto"`` takes
    ``torch.finfo(dtype).eps / 32`` of the inputs' dtype (2^-12 for bfloat16), as CCE does. An
    approximation: each left-out entry is below that bound. The loss and ``grad_bias`` stay
    exact. Not with ``label_smoothing`` (its term, the same sign in every class and below any
    useful threshold, would be left out wholesale). With 16-bit weights it keeps a float32
    ``[tile, D]`` sum of ``grad_weight``'s tile; on CUDA it waits for the device twice a tile.
    """
    fn = "linear_cross_entropy"
    return _linear_loss(fn, "cross_entropy", hidden, weight, target, bias, class_weight,
                        ignore_index, reduction, block_rows,
                        cross_entropy_scalars(fn, label_smoothing, lse_square_scale, softcap),
                        low_memory=bool(low_memory), filter_eps=filter_eps)


def linear_comp_sum_loss(hidden: Tensor, weight: Tensor, target: Tensor, tau: float,
                         bias: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         block_rows: Optional[int] = None) -> Tensor:
    """:func:`fastloss.ops.comp_sum_loss` of ``hidden @ weight.T + bias``, fused."""
    fn = "linear_comp_sum_loss"
    return _linear_loss(fn, "comp_sum", hidden, weight, target, bias, class_weight, ignore_index,
                        reduction, block_rows, comp_sum_scalars(fn, tau))


def linear_ldr_loss(hidden: Tensor, weight: Tensor, target: Tensor, lam: float,
                    margin: float = 1.0, adaptive: bool = False, alpha: float = 2.0,
                    bias: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
                    ignore_index: int = -100, reduction: str = "mean",
                    block_rows: Optional[int] = None) -> Tensor:
    """:func:`fastloss.ops.ldr_loss` (LDR-KL or ALDR-KL) of ``hidden @ weight.T + bias``, fused."""
    fn = "linear_ldr_loss"
    return _linear_loss(fn, "ldr", hidden, weight, target, bias, class_weight, ignore_index,
                        reduction, block_rows, ldr_scalars(fn, lam, margin, adaptive, alpha))


def linear_spherical_z_loss(hidden: Tensor, weight: Tensor, target: Tensor, a: float, b: float,
                            eps: float = 1e-6, bias: Optional[Tensor] = None,
                            class_weight: Optional[Tensor] = None, ignore_index: int = -100,
                            reduction: str = "mean",
                            block_rows: Optional[int] = None) -> Tensor:
    """:func:`fastloss.ops.spherical_z_loss` of ``hidden @ weight.T + bias``, fused."""
    fn = "linear_spherical_z_loss"
    return _linear_loss(fn, "spherical_z", hidden, weight, target, bias, class_weight,
                        ignore_index, reduction, block_rows, spherical_z_scalars(fn, a, b, eps))


def linear_stablemax_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                                   bias: Optional[Tensor] = None,
                                   class_weight: Optional[Tensor] = None,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   block_rows: Optional[int] = None) -> Tensor:
    """:func:`fastloss.ops.stablemax_cross_entropy` of ``hidden @ weight.T + bias``, fused."""
    return _linear_loss("linear_stablemax_cross_entropy", "stablemax", hidden, weight, target,
                        bias, class_weight, ignore_index, reduction, block_rows, ())
