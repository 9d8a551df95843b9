"""Metric-driven and imbalance losses: AnyLoss (Han, Moniz and Chawla, 2024) and the
self-adjusting Dice loss (Li et al., ACL 2020; ``dice_loss``, its docstring has the formula).

``anyloss(scores, target, metric, L=73.0, beta=1.0, from_logits=True)``: a confusion matrix made
differentiable by the amplification ``A(p) = 1 / (1 + exp(-L (p - 1/2)))`` of the predicted
probabilities ``p`` (``sigmoid(scores)`` when ``from_logits``), with binary targets ``y``:

    TP = sum y A(p),  FN = sum y (1 - A(p)),  FP = sum (1 - y) A(p),  TN = sum (1 - y)(1 - A(p))

and the loss ``1 - metric(TP, FN, FP, TN)`` for ``metric`` in ``"f1"``, ``"fbeta"`` (``beta``),
``"accuracy"``, ``"balanced_accuracy"`` ((TPR + TNR) / 2) and ``"gmean"`` (sqrt(TPR TNR)).
``scores`` ``[N]`` is one binary task; ``[N, K]`` is ``K`` labels (multi-label): one confusion
matrix per label and the mean of their losses. Sums over the batch, so there is no per-example
reduction. CPU and CUDA tensors run the kernels of ``csrc/metric_losses`` (the cells summed in
one read of the scores, the gradient in one more); other devices use torch operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._devices import has_kernel
from ._checks import require_finite, values_readable
from ._autograd import once_differentiable, refuse_grad
from ._dtypes import as_loss_dtype, call_rounding, fake_loss

_METRICS = ("f1", "fbeta", "accuracy", "balanced_accuracy", "gmean")


def _metric(tp, fn_, fp, tn, metric, beta):
    if metric in ("f1", "fbeta"):
        b2 = 1.0 if metric == "f1" else beta * beta
        return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn_ + fp)
    if metric == "accuracy":
        return (tp + tn) / (tp + tn + fp + fn_)
    tpr, tnr = tp / (tp + fn_), tn / (tn + fp)
    return (tpr + tnr) / 2 if metric == "balanced_accuracy" else torch.sqrt(tpr * tnr)


def _within_unit_interval(t: Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return not (bool(lo < 0) or bool(hi > 1))


def anyloss(scores: Tensor, target: Tensor, metric: str = "f1", L: float = 73.0, beta: float = 1.0,
            from_logits: bool = True) -> Tensor:
    """AnyLoss (see the module docstring).

    Args:
        scores: ``[N]`` or ``[N, K]`` logits (``from_logits``) or probabilities in [0, 1].
        target: binary targets of the same shape (0/1, bool or float).
        metric: ``"f1"``, ``"fbeta"``, ``"accuracy"``, ``"balanced_accuracy"``, ``"gmean"``.
        L: the amplification scale (the paper uses 73).
        beta: F-beta's beta (``metric="fbeta"``).
    """
    fn = "anyloss"
    if metric not in _METRICS:
        raise ValueError(f"{fn}: metric must be one of {_METRICS}, got {metric!r}")
    require_finite(fn, L=L, beta=beta)
    if not L > 0:
        raise ValueError(f"{fn}: L must be > 0, got {L}")
    if metric == "fbeta" and not beta > 0:
        raise ValueError(f"{fn}: beta must be > 0, got {beta}")
    if not isinstance(scores, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{fn}: scores and target must be Tensors")
    if scores.dim() not in (1, 2) or target.shape != scores.shape:
        raise ValueError(f"{fn}: scores must be [N] or [N, K] and target the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(target.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{fn}: scores must be floating point, got {scores.dtype}")
    refuse_grad(fn, "target", target, "the targets")
    # (the label count spelled out: reshape cannot infer it for an empty batch)
    y = target.to(torch.float32).reshape(scores.shape[0], scores.shape[1] if scores.dim() == 2 else 1)
    # as dice_loss (elsewhere a target or probability outside [0, 1] gives a meaningless metric)
    if y.numel() and values_readable(scores):  # (aminmax: one pass each; a NaN passes)
        if not _within_unit_interval(y):
            raise ValueError(f"{fn}: target must hold binary targets in [0, 1]")
        if not from_logits and not _within_unit_interval(scores.detach()):
            raise ValueError(f"{fn}: scores must be probabilities in [0, 1] with from_logits=False")
    if has_kernel(scores):  # one op with its C++ autograd formula (metric_losses_op.cpp)
        return call_rounding(torch.ops.fastloss.anyloss, scores, scores.reshape(y.shape), y, _METRICS.index(metric),
                             float(L), float(beta), bool(from_logits))
    tp, fn_, fp, tn = _confusion_sums_torch(scores.float().reshape(y.shape), y, L, from_logits)
    return as_loss_dtype((1 - _metric(tp, fn_, fp, tn, metric, beta)).mean(), scores)


def _confusion_sums_torch(s, y, L, from_logits):
    """The four cells of each column in torch operations (devices without a fastloss kernel)."""
    p = torch.sigmoid(s) if from_logits else s
    a = torch.sigmoid(L * (p - 0.5))                 # the amplified probability A(p)
    return (y * a).sum(0), (y * (1 - a)).sum(0), ((1 - y) * a).sum(0), ((1 - y) * (1 - a)).sum(0)


# The CPU kernels (csrc/metric_losses): fake kernels for torch.compile, and autograd. Each
# backward recomputes what it needs from the inputs, so the forward keeps nothing N x C.

@torch.library.register_fake("fastloss::confusion_sums")
def _fake_confusion(scores, target, L, from_logits):
    torch._check(scores.dim() == 2 and target.shape == scores.shape,
                 lambda: "scores and target must be [N, K] of the same shape")
    return scores.new_empty((4, scores.shape[1]), dtype=torch.float32)


@torch.library.register_fake("fastloss::confusion_sums_backward")
def _fake_confusion_backward(grad_sums, scores, target, L, from_logits):
    return scores.new_empty(scores.shape)


_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


@torch.library.register_fake("fastloss::dice_loss")
def _fake_dice_loss(logits, target, softmax, alpha, gamma, smooth, ignore_index, reduction, round_loss=False):
    return fake_loss(logits, (logits.shape[0],) if reduction == 0 else (), round_loss)


@torch.library.register_fake("fastloss::anyloss")
def _fake_anyloss(scores, target, metric, L, beta, from_logits, round_loss=False):
    _fake_confusion(scores, target, L, from_logits)
    return fake_loss(scores, (), round_loss)


def _setup_saving_inputs(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = inputs[2:]


@once_differentiable("anyloss")
def _confusion_backward(ctx, grad_sums):
    scores, target = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fastloss.confusion_sums_backward(grad_sums, scores, target, *ctx.args)
    return grad, None, None, None


torch.library.register_autograd("fastloss::confusion_sums", _confusion_backward,
                                setup_context=_setup_saving_inputs)

for _form in ("sigmoid", "softmax"):
    torch.library.register_fake(f"fastloss::dice_{_form}_forward")(
        lambda logits, target, *args: logits.new_empty((logits.shape[0],), dtype=torch.float32))
    torch.library.register_fake(f"fastloss::dice_{_form}_backward")(
        lambda grad_rows, logits, target, *args: logits.new_empty(logits.shape))

    @once_differentiable("dice_loss")
    def _dice_backward(ctx, grad_rows, _form=_form):
        logits, target = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            backward = getattr(torch.ops.fastloss, f"dice_{_form}_backward")
            grad = backward(grad_rows, logits, target, *ctx.args)
        return (grad, None) + (None,) * len(ctx.args)

    torch.library.register_autograd(f"fastloss::dice_{_form}_forward", _dice_backward,
                                    setup_context=_setup_saving_inputs)


# --- self-adjusting Dice loss ------------------------------------------------------------------

def _dice_terms(pt, y, gamma, smooth):
    """1 - DSC per element and A = d(1 - DSC)/d pt, for the decayed probability pt."""
    den = pt + y + gamma + smooth
    num = 2 * pt * y + gamma
    return 1 - num / den, -(2 * y * den - num) / (den * den)


class _SigmoidDice(torch.autograd.Function):
    """Elementwise (binary / multi-label) form; the backward uses d pt / d x = p q^a (q - a p)
    with q = sigmoid(-x) computed directly, finite for any logit."""

    @staticmethod
    def forward(ctx, x, y, alpha, gamma, smooth):
        xf = x.float()
        p = torch.sigmoid(xf)
        terms, _ = _dice_terms(_pow_of_log(F.logsigmoid(-xf), alpha) * p, y, gamma, smooth)
        ctx.save_for_backward(xf, y)
        ctx.args = (alpha, gamma, smooth, x.dtype)
        return terms

    @staticmethod
    @once_differentiable("dice_loss")
    def backward(ctx, grad_terms):
        xf, y = ctx.saved_tensors
        alpha, gamma, smooth, dtype = ctx.args
        p, q = torch.sigmoid(xf), torch.sigmoid(-xf)
        qa = _pow_of_log(F.logsigmoid(-xf), alpha)
        _, a = _dice_terms(qa * p, y, gamma, smooth)
        return (grad_terms * a * p * qa * (q - alpha * p)).to(dtype), None, None, None, None


class _SoftmaxDice(torch.autograd.Function):
    """Multi-class form over softmax probabilities p (rows of logits z), one-hot y. With
    G_c = A_c p_c q_c^(a-1) (q_c - a p_c), q = 1 - p, the gradient is G_j - p_j sum_c G_c. For
    the row's largest class (where q may round to 0 in float32) q is the sum of the other
    classes' probabilities and its term is carried as H = G q, so the result stays finite when
    the softmax saturates: d/dz_j = G_j - p_j S - (p_j / q) H (j not the largest), H - p S (the
    largest), S the sum of G over the other classes."""

    @staticmethod
    def forward(ctx, z, target, alpha, gamma, smooth):
        zf = z.float()
        y = torch.zeros_like(zf).scatter_(1, target[:, None], 1.0)
        p, q, qa, _, _ = _softmax_and_complement(zf, alpha)
        terms, _ = _dice_terms(qa * p, y, gamma, smooth)
        ctx.save_for_backward(zf, target)
        ctx.args = (alpha, gamma, smooth, z.dtype)
        return terms

    @staticmethod
    @once_differentiable("dice_loss")
    def backward(ctx, grad_terms):
        zf, target = ctx.saved_tensors
        alpha, gamma, smooth, dtype = ctx.args
        y = torch.zeros_like(zf).scatter_(1, target[:, None], 1.0)
        p, q, qa, top, ratio = _softmax_and_complement(zf, alpha)
        _, a = _dice_terms(qa * p, y, gamma, smooth)
        a = a * grad_terms
        is_top = torch.zeros_like(zf, dtype=torch.bool).scatter_(1, top[:, None], True)
        # G_c for the classes other than the largest (q_c >= 1/2 there: q^(a-1) is finite)
        g = torch.where(is_top, 0.0, a * p * q.pow(alpha - 1) * (q - alpha * p))
        q_top, qa_top, p_top, a_top = (t.gather(1, top[:, None]) for t in (q, qa, p, a))
        h = a_top * p_top * qa_top * (q_top - alpha * p_top)  # G_top q_top
        s_other = g.sum(1, keepdim=True)
        grad = torch.where(is_top, h - p * s_other, g - p * s_other - ratio * h)
        return grad.to(dtype), None, None, None, None


def _pow_of_log(log_q, alpha):
    """q^alpha from log q (0^0 = 1, as the kernels' pow01)."""
    return torch.ones_like(log_q) if alpha == 0 else torch.exp(alpha * log_q)


def _softmax_and_complement(z, alpha):
    """p = softmax(z), q = 1 - p accurately (for the largest class: the others' share), q^alpha
    (the largest class's from log q: its q may be subnormal or below float32's range where
    q^alpha is not small), the largest class, and e_j / sum_{i != top} e_i (p_j / q_top) for
    the other classes (relative to their own maximum, so that it stays exact where that sum
    underflows)."""
    top = z.argmax(1)
    m = z.gather(1, top[:, None])
    is_top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top[:, None], True)
    others = z.masked_fill(is_top, float("-inf"))
    m2 = others.amax(1, keepdim=True).clamp_min(torch.finfo(z.dtype).min)   # (C = 1: no others)
    e2 = torch.exp(others - m2)
    rest2 = e2.sum(1, keepdim=True)                     # >= 1 unless no other class has a share
    rest = rest2 * torch.exp(m2 - m)
    total = rest + 1.0
    e = torch.exp(z - m)
    p = e / total
    q = torch.where(is_top, rest / total, 1 - p)
    log_q_top = m2 - m + torch.log(rest2) - torch.log1p(rest)
    qa = torch.where(is_top, _pow_of_log(log_q_top, alpha), q.pow(alpha))
    ratio = torch.where(rest2 > 0, e2 / rest2.clamp_min(torch.finfo(z.dtype).tiny), 0.0)
    return p, q, qa, top, ratio


def dice_loss(logits: Tensor, target: Tensor, alpha: float = 1.0, gamma: float = 1.0,
              smooth: float = 0.0, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Self-adjusting Dice loss (Li et al., "Dice Loss for Data-imbalanced NLP Tasks").

    For each prediction ``p`` of a class with target ``y`` in {0, 1}, the paper's
    self-adjusting Dice coefficient decays easy examples by ``(1 - p)^alpha``:

    .. math:: \\tilde p = (1 - p)^\\alpha p, \\qquad
              \\mathrm{DSC} = \\frac{2 \\tilde p y + \\gamma}{\\tilde p + y + \\gamma + \\mathrm{smooth}}

    and the loss of an example is ``1 - DSC`` summed over its classes (the official code's sum
    over classes), averaged over examples. ``gamma`` is the paper's smoothing constant added to
    numerator and denominator (it is what lets negatives, ``y = 0``, contribute
    ``1 - gamma / (p~ + gamma)``); ``smooth`` is added to the denominator only and is needed
    only with ``gamma = 0`` (the plain Dice ``2 p y / (p + y)``), where ``p = y = 0`` would be
    0 / 0. ``alpha = 0`` gives the unweighted Dice; the paper's authors tune ``alpha`` in
    {0.1, 0.01, 0.001} with ``gamma = 1``. Per-example form: the official code's batch-level
    denominators are not used.

    Two input forms:

    * ``target`` of ``logits``' shape: binary or multi-label, ``p = sigmoid(logits)``, ``target``
      in [0, 1] (0/1, bool or soft); ``[N]`` is ``N`` binary examples, ``[N, K]`` is ``N``
      examples of ``K`` labels.
    * integer ``target`` ``[N]`` with ``logits`` ``[N, C]``: multi-class, ``p = softmax(logits)``,
      one-hot ``y``; rows whose target is ``ignore_index`` are skipped (``"mean"`` divides by
      the rows kept, as ``F.cross_entropy``).

    Target values are checked on the CPU (a clear error); CUDA tensors are not (that would wait
    for the device on every call; fastloss's ``cross_entropy`` does not either): a row with a
    target outside [0, 1] or a class outside [0, C) gets a NaN loss.

    The backward is written out so that it stays finite when a probability saturates to 1 in
    float32 (the ``(1 - p)^(alpha - 1)`` factor of the naive derivative is infinite there).
    CPU and CUDA tensors run the kernels of ``csrc/metric_losses`` (the CPU reads a row from
    memory once in the forward and once in the backward, which recomputes the row's softmax
    statistics; on CUDA the softmax form reads it twice forward and three times backward, from
    cache for all but the first; nothing ``N x C`` is kept in between); other devices use torch
    operations. Float32 math.

    Args:
        logits: ``[N]``, ``[N, K]`` (sigmoid) or ``[N, C]`` (softmax) float32/16 or bfloat16.
        target: see above.
        alpha: decay exponent >= 0. gamma: smoothing constant >= 0. smooth: denominator term >= 0.
        ignore_index: multi-class rows to skip.
        reduction: over examples, ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``).
    """
    fn = "dice_loss"
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    for name, v in (("alpha", alpha), ("gamma", gamma), ("smooth", smooth)):
        if not (isinstance(v, (int, float)) and v >= 0 and v < float("inf")):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v!r}")
    if gamma == 0 and smooth == 0:
        raise ValueError(f"{fn}: gamma and smooth are both 0: a negative predicted as 0 would be "
                         "0 / 0; give one of them a positive value")
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{fn}: logits and target must be Tensors")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{fn}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if target.device != logits.device:
        raise ValueError(f"{fn}: target is on {target.device} but logits is on {logits.device}")
    if target.shape == logits.shape and logits.dim() in (1, 2):
        refuse_grad(fn, "target", target, "the targets")  # (soft targets: no gradient is given)
        y = target.to(torch.float32)
        x = logits if logits.dim() == 2 else logits[:, None]
        # CUDA kernels: no check here (it would wait for the device twice per call); a target
        # outside [0, 1] gives that row a NaN loss
        on_gpu_kernel = x.is_cuda and has_kernel(x)
        if (y.numel() and not on_gpu_kernel and not torch.compiler.is_compiling() and not y.is_meta
                and not _within_unit_interval(y)):
            raise ValueError(f"{fn}: a target of logits' shape holds binary targets in [0, 1]")
        args = (float(alpha), float(gamma), float(smooth))
        if has_kernel(x):  # one op with its C++ autograd formula (metric_losses_op.cpp)
            return call_rounding(torch.ops.fastloss.dice_loss, logits, x, y.reshape(x.shape), False, *args,
                                 int(ignore_index), _REDUCTION[reduction])
        rows = _SigmoidDice.apply(x, y.reshape(x.shape), *args).sum(1)
        keep = None
    elif logits.dim() == 2 and target.shape == logits.shape[:1]:
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(f"{fn}: a target [N] for logits [N, C] holds integer classes, got "
                             f"{target.dtype}")
        args = (float(alpha), float(gamma), float(smooth))
        # the CPU kernel's op checks the classes itself; the CUDA kernel gives a row whose
        # target is out of range a NaN loss (a check here would wait for the device)
        if has_kernel(logits):
            return call_rounding(torch.ops.fastloss.dice_loss, logits, logits, target, True, *args,
                                 int(ignore_index), _REDUCTION[reduction])
        keep = target != ignore_index
        bad = keep & ((target < 0) | (target >= logits.shape[1]))
        if not bad.is_meta and bool(bad.any()):
            raise ValueError(f"{fn}: target holds values outside [0, C = {logits.shape[1]}) "
                             f"that are not ignore_index ({ignore_index})")
        t = torch.where(keep, target, 0).long()
        rows = torch.where(keep, _SoftmaxDice.apply(logits, t, *args).sum(1), 0.0)
    else:
        raise ValueError(f"{fn}: logits [N] or [N, K] with target of the same shape, or logits "
                         f"[N, C] with integer target [N]; got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if reduction == "none":
        return as_loss_dtype(rows, logits)
    if reduction == "sum":
        return as_loss_dtype(rows.sum(), logits)
    count = rows.shape[0] if keep is None else keep.sum()
    return as_loss_dtype(rows.sum() / count, logits)
