"""Fused classification losses over logits ``[N, C]`` with class-index targets ``[N]``.

Every loss's forward kernel reads each row of logits once (twice for the adaptive LDR loss)
and keeps the loss of every row plus two small per-row statistics; its backward kernel reads
the logits once more and writes the gradient once; no ``[N, C]`` probability tensor is kept
between the two. One op (``torch.ops.fastloss.<name>_loss``) runs the forward, the reduction
and a C++ autograd formula; that formula calls the ``<name>_forward`` / ``<name>_backward``
ops, which torch.compile sees (their fake kernels are below). The ``_forward`` ops also carry
an autograd formula of their own (registered below) for direct use.

Common arguments, mirroring :func:`torch.nn.functional.cross_entropy`:

* ``logits``: float32, float16 or bfloat16 ``[N, C]``, any row stride (a view whose classes
  are not contiguous is copied once). Accumulation is float32. As with ``F.cross_entropy``,
  ``[N, C, d1, ...]`` logits (with ``[N, d1, ...]`` targets; ``reduction="none"`` gives
  ``[N, d1, ...]``) and unbatched ``[C]`` logits (a 0-d target) work too: their classes are
  moved last, a copy unless the memory is channels-last.
* ``target``: int64 (or int32) ``[N]``. Rows equal to ``ignore_index`` get loss 0 and
  gradient 0 and leave the mean. On the CPU a target outside ``[0, C)`` raises; on CUDA it
  gives that row a NaN loss (checking it would need a host synchronisation).
* ``weight``: optional per-class weights ``[C]``; row ``i``'s loss is multiplied by
  ``weight[target[i]]`` and ``mean`` divides by the sum of those weights, as torch does.
  No gradient flows to ``weight``.
* ``reduction``: ``"none"`` (``[N]``), ``"sum"`` or ``"mean"``. The result has the logits'
  dtype, or float32 under ``torch.autocast`` (as torch's losses). An empty batch gives what torch gives (``mean`` of nothing is NaN).
* ``inplace_backward``: opt-in. The backward writes the gradient over the logits' own
  memory instead of allocating an ``[N, C]`` tensor (the logits' values are gone after
  backward; autograd's version counter then stops any other op that saved them from
  silently using the overwritten values). Logits whose classes are not contiguous are
  copied first, and the copy takes the gradient.
* ``grad_in_forward``: opt-in. When the logits require grad, the forward also makes the
  gradient (each row read once: its statistics, then its gradient while the row is in cache)
  and the backward returns it, scaled when the incoming gradient is not 1 (on the CPU after
  reading it; on CUDA on the device, rows whose factor is exactly 1 neither read nor written,
  without a host synchronisation; with a loss scale, as AMP's GradScaler applies, every
  backward pays that extra pass). The gradient is held from the forward on. With
  ``inplace_backward`` too, the forward writes it over the logits (gone from then on, even if
  no backward follows, a leaf that requires grad included; no ``[N, C]`` allocation, also when
  the incoming gradient scales it). Ignored under ``torch.compile``. Its CUDA kernel ran on an
  H200 (2026-11-29, no faster than the default's two kernels there: the rows' second read came
  from HBM); since then it keeps each row's first ~220 KB in shared memory (not yet measured).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import require_finite
from ._autograd import once_differentiable, refuse_grad
from ._dtypes import call_rounding, fake_loss

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_weight(fn: str, weight: Optional[Tensor]) -> None:
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a Tensor or None, got {type(weight).__name__}")


# ---- autograd and fake kernels: the same for every row loss --------------------------------
#
# forward(logits, target, weight, *scalars, inplace_backward) -> (row_loss, stat0, stat1)
# backward(grad_row_loss, logits, target, weight, stat0, stat1, *scalars) -> grad_logits
# backward_(...same...) -> (), the gradient written over the logits

_LOSS_OPS = ("cross_entropy", "comp_sum", "ldr", "spherical_z", "stablemax")


def _check_fake(logits, target, weight):
    """The argument checks of losses_op.cpp, for tracing (torch.compile, meta tensors)."""
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    torch._check(logits.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    torch._check(target.dim() == 1, lambda: f"target must be 1-D [N], got shape {tuple(target.shape)}")
    torch._check(target.dtype in (torch.int64, torch.int32, torch.uint8),
                 lambda: f"target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    torch._check(target.shape[0] == logits.shape[0],
                 lambda: f"target has {target.shape[0]} entries but logits has {logits.shape[0]} rows")
    for name, t in (("target", target), ("weight", weight)):
        torch._check(t is None or t.device == logits.device,
                     lambda: f"{name} is on {t.device} but logits is on {logits.device}")
    torch._check(weight is None or (weight.dim() == 1 and weight.shape[0] == logits.shape[1]),
                 lambda: f"weight must be 1-D with one entry per class ({logits.shape[1]}), "
                         f"got shape {tuple(weight.shape)}")


def _fake_forward(logits, target, weight, *scalars):
    _check_fake(logits, target, weight)
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(3))


def _fake_backward(grad_loss, logits, target, weight, stat0, stat1, *scalars):
    _check_fake(logits, target, weight)
    return logits.new_empty(logits.shape)  # contiguous, like the real kernel's output


def _fake_backward_inplace(grad_loss, logits, target, weight, stat0, stat1, *scalars):
    _check_fake(logits, target, weight)


def _logits_grad(name: str, inplace: bool, args: tuple) -> Tensor:
    """Run a loss's backward op; in place, the gradient overwrites (and is) the logits."""
    if not inplace:
        return getattr(torch.ops.fastloss, f"{name}_backward").default(*args)
    logits = args[1]
    getattr(torch.ops.fastloss, f"{name}_backward_").default(*args)
    # Bump the logits' version so that an op which saved them for its own backward raises
    # ("modified by an inplace operation") instead of reading gradients.
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(logits)
    return logits


def _make_autograd(name: str):
    def setup_context(ctx, inputs, output):
        logits, target, weight, *scalars, inplace = inputs
        _, stat0, stat1 = output
        ctx.save_for_backward(logits, target, weight, stat0, stat1)
        ctx.scalars = scalars
        ctx.inplace = inplace
        ctx.mark_non_differentiable(stat0, stat1)

    @once_differentiable(f"{name}_forward")  # (the op called: torch.ops.fastloss.<name>_forward)
    def backward(ctx, grad_loss, _grad_stat0, _grad_stat1):
        logits, target, weight, stat0, stat1 = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = _logits_grad(name, ctx.inplace, (grad_loss, logits, target, weight,
                                                            stat0, stat1, *ctx.scalars))
        return (grad_logits, None, None) + (None,) * (len(ctx.scalars) + 1)

    return setup_context, backward


for _name in _LOSS_OPS:
    torch.library.register_fake(f"fastloss::{_name}_forward")(_fake_forward)
    torch.library.register_fake(f"fastloss::{_name}_backward")(_fake_backward)
    torch.library.register_fake(f"fastloss::{_name}_backward_")(_fake_backward_inplace)
    _setup, _backward = _make_autograd(_name)
    torch.library.register_autograd(f"fastloss::{_name}_forward", _backward, setup_context=_setup)


def _fake_loss(logits, target, weight, ignore_index, reduction, *scalars, round_loss=False):
    _check_fake(logits, target, weight)
    shape = (logits.shape[0],) if reduction == 0 else ()
    return fake_loss(logits, shape, round_loss)


def _fake_forward_grad(grad_loss, logits, target, weight, *scalars):
    _check_fake(logits, target, weight)
    n = logits.shape[0]
    stats = tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(3))
    return stats + (logits.new_empty(logits.shape),)


def _fake_forward_grad_inplace(grad_loss, logits, target, weight, *scalars):
    return _fake_forward_grad(grad_loss, logits, target, weight, *scalars)[:3]


_LOSS_OP = {}  # name -> the op overload (one attribute lookup a call, not an f-string and two)
for _name in _LOSS_OPS:
    torch.library.register_fake(f"fastloss::{_name}_loss")(_fake_loss)
    _LOSS_OP[_name] = getattr(torch.ops.fastloss, f"{_name}_loss").default
    torch.library.register_fake(f"fastloss::{_name}_forward_grad")(_fake_forward_grad)
    torch.library.register_fake(f"fastloss::{_name}_forward_grad_")(_fake_forward_grad_inplace)

_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}


_PUBLIC_NAME = {"cross_entropy": "cross_entropy", "comp_sum": "comp_sum_loss", "ldr": "ldr_loss",
                "spherical_z": "spherical_z_loss", "stablemax": "stablemax_cross_entropy"}


def _as_rows(fn: str, logits, target):
    """F.cross_entropy's other layouts as rows of classes: unbatched ``[C]`` logits with a 0-d
    target, and ``[N, C, d1, ...]`` logits with ``[N, d1, ...]`` targets (the classes moved
    last: a copy, unless the logits are channels-last, where it is a view). Returns the rows,
    their targets, and the shape of ``reduction="none"``'s result (None: ``[N, C]`` as given)."""
    if isinstance(logits, Tensor) and isinstance(target, Tensor) and target.is_floating_point():
        raise ValueError(f"{fn}: target must hold class indices (int64, int32 or uint8; probability "
                         f"targets are not supported), got {target.dtype} {tuple(target.shape)}")
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor) or logits.dim() == 2:
        return logits, target, None  # (the op's own checks name what is wrong)
    if logits.dim() == 0:
        raise ValueError(f"{fn}: logits must be [N, C], [N, C, d1, ...] or unbatched [C], got a "
                         f"0-d tensor")
    classes = logits.shape[0 if logits.dim() == 1 else 1]
    if classes == 0:
        raise ValueError(f"{fn}: logits must have at least one class, got shape {list(logits.shape)}")
    if logits.dim() == 1:
        if target.dim() != 0:
            raise ValueError(f"{fn}: unbatched logits [C] take a 0-d target, got shape "
                             f"{tuple(target.shape)}")
        return logits.unsqueeze(0), target.reshape(1), ()
    want = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != want:
        raise ValueError(f"{fn}: target must be {list(want)} for logits of shape "
                         f"{list(logits.shape)} ([N, C, d1, ...]), got {list(target.shape)}")
    return logits.movedim(1, -1).reshape(-1, classes), target.reshape(-1), want


def _row_loss(logits, target, weight, name, reduction, ignore_index, inplace, grad_in_forward,
              *scalars):
    # One op: forward, reduction and its C++ autograd formula (losses_op.cpp), which calls the
    # *_forward / *_backward ops below autograd; torch.compile traces it into those.
    refuse_grad(_PUBLIC_NAME[name], "weight", weight, "the class weights (as F.cross_entropy)")
    logits, target, shape = _as_rows(_PUBLIC_NAME[name], logits, target)
    if grad_in_forward and torch.compiler.is_compiling():
        grad_in_forward = False  # (the plain path: the hand-over of its backward is tested eager only)
    # (the op rounds the loss to the logits' dtype itself outside autocast, as torch's losses
    # return it: a cast here cost a 16-bit call a second op and autograd node)
    out = call_rounding(_LOSS_OP[name], logits, logits, target, weight, ignore_index,
                        _REDUCTION_CODE[reduction], *scalars, inplace, grad_in_forward)
    return out.reshape(shape) if shape is not None and reduction == "none" else out


# ---- each loss's scalars, checked (shared with the fused linear losses) ---------------------

def cross_entropy_scalars(fn: str, label_smoothing: float, lse_square_scale: float,
                          softcap: Optional[float]) -> tuple:
    require_finite(fn, lse_square_scale=lse_square_scale, softcap=softcap)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{fn}: softcap must be None or > 0, got {softcap}")
    if lse_square_scale < 0:   # (a negative z-loss rewards large log-sum-exps: an unbounded loss)
        raise ValueError(f"{fn}: lse_square_scale must be >= 0, got {lse_square_scale}")
    return float(label_smoothing), float(lse_square_scale), float(softcap or 0.0)


def comp_sum_scalars(fn: str, tau: float) -> tuple:
    require_finite(fn, tau=tau)
    if not tau >= 0:
        raise ValueError(f"{fn}: tau must be >= 0, got {tau}")
    return (float(tau),)


def ldr_scalars(fn: str, lam: float, margin: float, adaptive: bool, alpha: float) -> tuple:
    require_finite(fn, lam=lam, margin=margin, alpha=alpha)
    if not lam > 0:
        raise ValueError(f"{fn}: lam must be > 0, got {lam}")
    if adaptive and not alpha > 1:
        raise ValueError(f"{fn}: alpha must be > 1 for the adaptive loss, got {alpha}")
    return float(lam), float(margin), bool(adaptive), float(alpha)


def spherical_z_scalars(fn: str, a: float, b: float, eps: float) -> tuple:
    require_finite(fn, a=a, b=b, eps=eps)
    if not a > 0:
        raise ValueError(f"{fn}: a must be > 0, got {a}")
    if not eps >= 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    return float(a), float(b), float(eps)


# ---- public functions ----------------------------------------------------------------------

def cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                  softcap: Optional[float] = None,
                  inplace_backward: bool = False, grad_in_forward: bool = False) -> Tensor:
    r"""Cross-entropy, fused: equal to :func:`torch.nn.functional.cross_entropy` plus two options.

    Per row, with :math:`z` the (optionally soft-capped) logits, :math:`\epsilon` the label
    smoothing and :math:`w` the class weights (1 when ``weight`` is None):

    .. math:: \ell = w_y[(1-\epsilon)(\mathrm{lse}(z) - z_y) + s\,\mathrm{lse}(z)^2]
              + \frac{\epsilon}{C}\sum_k w_k(\mathrm{lse}(z) - z_k)

    Args:
        lse_square_scale: ``s``, the PaLM z-loss coefficient (``s * logsumexp^2`` per row,
            weighted by ``w_y`` like the rest of the row's loss). 0 disables it.
        softcap: ``c`` > 0 replaces the logits by ``c * tanh(logits / c)`` (Gemma 2) inside
            the kernel, gradient included. None disables it.
    """
    _check_reduction("cross_entropy", reduction)
    _check_weight("cross_entropy", weight)
    return _row_loss(logits, target, weight, "cross_entropy", reduction, ignore_index,
                     bool(inplace_backward), bool(grad_in_forward),
                     *cross_entropy_scalars("cross_entropy", label_smoothing, lse_square_scale, softcap))


def comp_sum_loss(logits: Tensor, target: Tensor, tau: float, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  inplace_backward: bool = False, grad_in_forward: bool = False) -> Tensor:
    r"""Comp-sum loss of Mao, Mohri and Zhong (ICML 2023).

    .. math:: \ell = \Phi_\tau\Big(\sum_{k\ne y} e^{f_k - f_y}\Big),\quad
              \Phi_1(u) = \log(1+u),\quad \Phi_\tau(u) = \frac{(1+u)^{1-\tau} - 1}{1-\tau}

    ``tau = 0``: sum-exponential loss; ``tau = 1``: logistic loss (= cross-entropy);
    ``1 < tau < 2``: generalized cross-entropy; ``tau = 2``: mean absolute error
    (:math:`1 - p_y`). Any ``tau >= 0``. For ``tau < 1`` the loss grows like
    :math:`e^{(1-\tau)(\mathrm{lse} - f_y)}` and overflows to inf for badly wrong rows at
    extreme logits, as the formula does.
    """
    _check_reduction("comp_sum_loss", reduction)
    _check_weight("comp_sum_loss", weight)
    return _row_loss(logits, target, weight, "comp_sum", reduction, ignore_index,
                     bool(inplace_backward), bool(grad_in_forward), *comp_sum_scalars("comp_sum_loss", tau))


def ldr_loss(logits: Tensor, target: Tensor, lam: float, margin: float = 1.0,
             adaptive: bool = False, alpha: float = 2.0, weight: Optional[Tensor] = None,
             ignore_index: int = -100, reduction: str = "mean",
             inplace_backward: bool = False, grad_in_forward: bool = False) -> Tensor:
    r"""LDR-KL loss, or its adaptive form ALDR-KL (Zhu, Ying and Yang, ICML 2023).

    With :math:`d_k = f_k - f_y + c\,[k \ne y]` (``c = margin``) and :math:`K = C`:

    .. math:: \ell = \lambda \log\Big(\frac{1}{K}\sum_k e^{d_k/\lambda}\Big)

    ``adaptive=True`` gives each row its own temperature
    :math:`\lambda_i = \lambda\,(1 - \mathrm{KL}(p\,\|\,u) / (\alpha \log K))`, with
    :math:`p = \mathrm{softmax}(d/\lambda)` and :math:`u` uniform (the maximiser of
    :math:`-\lambda_i \mathrm{KL} - \frac{\alpha\log K}{2\lambda}(\lambda_i-\lambda)^2`, one
    step from :math:`\lambda` since this op keeps no state between calls), and the loss
    :math:`\lambda_i \log(\frac1K\sum_k e^{d_k/\lambda_i}) - \frac{\alpha\log K}{2\lambda}(\lambda_i-\lambda)^2`.
    :math:`\lambda_i` is held constant in the gradient, as in the authors' code. Needs
    ``alpha > 1`` (then :math:`\lambda_i \ge \lambda(1 - 1/\alpha) > 0`).
    """
    _check_reduction("ldr_loss", reduction)
    _check_weight("ldr_loss", weight)
    return _row_loss(logits, target, weight, "ldr", reduction, ignore_index,
                     bool(inplace_backward), bool(grad_in_forward), *ldr_scalars("ldr_loss", lam, margin, adaptive, alpha))


def spherical_z_loss(logits: Tensor, target: Tensor, a: float, b: float, eps: float = 1e-6,
                     weight: Optional[Tensor] = None, ignore_index: int = -100,
                     reduction: str = "mean",
                     inplace_backward: bool = False, grad_in_forward: bool = False) -> Tensor:
    r"""Z-loss of de Brébisson and Vincent (2016), shift- and scale-invariant.

    With the row's mean :math:`\mu` and population variance :math:`\sigma^2`:

    .. math:: z_y = \frac{f_y - \mu}{\sqrt{\sigma^2 + \epsilon}},\qquad
              \ell = \frac{1}{a}\,\mathrm{softplus}\big(a\,(b - z_y)\big)

    ``eps`` (added to the variance) keeps rows of equal logits finite; 0 gives the paper's
    exact scale invariance.
    """
    _check_reduction("spherical_z_loss", reduction)
    _check_weight("spherical_z_loss", weight)
    return _row_loss(logits, target, weight, "spherical_z", reduction, ignore_index,
                     bool(inplace_backward), bool(grad_in_forward), *spherical_z_scalars("spherical_z_loss", a, b, eps))


def stablemax_cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                            ignore_index: int = -100, reduction: str = "mean",
                            inplace_backward: bool = False, grad_in_forward: bool = False) -> Tensor:
    r"""Cross-entropy over StableMax instead of softmax (Prieto et al., 2025).

    .. math:: s(x) = \begin{cases} x + 1 & x \ge 0 \\ 1/(1-x) & x < 0\end{cases},\qquad
              \ell = \log\sum_j s(f_j) - \log s(f_y)
    """
    _check_reduction("stablemax_cross_entropy", reduction)
    _check_weight("stablemax_cross_entropy", weight)
    return _row_loss(logits, target, weight, "stablemax", reduction, ignore_index,
                          bool(inplace_backward), bool(grad_in_forward))


