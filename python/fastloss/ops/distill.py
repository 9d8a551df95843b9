"""Logit distillation losses over student and teacher logits ``[N, C]``.

``kd_loss`` (below), ``topk_kl_loss`` (OSTQuant's KL-Top) and ``pld_loss`` (Plackett-Luce
distillation); each function's docstring gives its formula.

``kd_loss(student, teacher, T, kind, beta)``, per row with ``p = softmax(student / T)`` and
``q = softmax(teacher / T)``:

* ``"forward_kl"``: ``T^2 KL(q || p)``; with ``reduction="mean"`` (the mean over rows) this is
  ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True,
  reduction="batchmean") * T^2`` (``kl_div``'s own default ``"mean"`` divides by ``N C``);
* ``"reverse_kl"``: ``T^2 KL(p || q)``;
* ``"jsd"``: ``T^2 [beta KL(q || m) + (1 - beta) KL(p || m)]`` with ``m = beta q + (1 - beta) p``,
  ``0 < beta < 1`` (the generalized Jensen-Shannon divergence; 0.5 is the symmetric one).

Gradients flow to the student only (the teacher is a target). On the CPU (``csrc/distill``),
when the student will want its gradient, ``kd_loss``'s forward makes it with the rows
(``kd_forward_grad``: both rows read while in cache, the gradient written once, scaled by the
mean's 1 / N) and the backward hands that buffer over, scaled in place unless the incoming
gradient is exactly 1; otherwise the forward keeps three floats per row and the backward reads
both rows again: no ``[N, C]`` probability tensor either way. ``kd_loss`` on CUDA tensors runs
the CUDA kernels (``kd_cuda.cu``: one read of both rows forward, two for jsd, one backward),
``topk_kl_loss`` a radix selection per row, ``pld_loss`` torch's stable sort of the teacher
(and the student gathered in that order) then a block per row for the suffix log-sum-exps and
the gradient, reading both rows in rank order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import as_int, require_finite, values_readable
from ._autograd import once_differentiable
from ._devices import has_kernel
from ._dtypes import as_loss_dtype, call_rounding, fake_loss

_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("fastloss::kd_forward")
def _fake_forward(student, teacher, kind, temperature, beta):
    torch._check(student.dim() == 2 and teacher.shape == student.shape,
                 lambda: "student and teacher must be [N, C] of the same shape")
    n = student.shape[0]
    return (student.new_empty((n,), dtype=torch.float32),
            student.new_empty((n, 3), dtype=torch.float32))


@torch.library.register_fake("fastloss::kd_backward")
def _fake_backward(grad_loss, student, teacher, stats, kind, temperature, beta):
    return student.new_empty(student.shape)


@torch.library.register_fake("fastloss::kd_forward_grad")
def _fake_forward_grad(student, teacher, kind, temperature, beta, grad_scale):
    rows, _ = _fake_forward(student, teacher, kind, temperature, beta)
    return rows, student.new_empty(student.shape)


_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


@torch.library.register_fake("fastloss::kd_loss")
def _fake_kd_loss(student, teacher, kind, temperature, beta, reduction, round_loss=False):
    _fake_forward(student, teacher, kind, temperature, beta)
    return _fake_loss(student, reduction, round_loss)


def _fake_loss(student, reduction, round_loss):
    """The *_loss ops' result: float32, or the student's dtype with round_loss (_dtypes.py)."""
    return fake_loss(student, (student.shape[0],) if reduction == 0 else (), round_loss)


@torch.library.register_fake("fastloss::topk_kl_loss")
def _fake_topk_kl_loss(student, teacher, k, temperature, renormalize, reduction, round_loss=False):
    _fake_forward(student, teacher, 0, temperature, 0.5)
    return _fake_loss(student, reduction, round_loss)


@torch.library.register_fake("fastloss::pld_loss")
def _fake_pld_loss(student, teacher, target, temperature, ignore_index, reduction, round_loss=False):
    _fake_forward(student, teacher, 0, temperature, 0.5)
    return _fake_loss(student, reduction, round_loss)


def _setup(ctx, inputs, output):
    student, teacher, kind, temperature, beta = inputs
    ctx.save_for_backward(student, teacher, output[1])
    ctx.args = (kind, temperature, beta)
    ctx.mark_non_differentiable(output[1])


@once_differentiable("kd_loss")
def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fastloss.kd_backward(grad_loss, student, teacher, stats, *ctx.args)
    return grad, None, None, None, None


torch.library.register_autograd("fastloss::kd_forward", _backward, setup_context=_setup)


# A masked class (a logit of -inf, or below -1e30) as -1e30, as the kernels take it
# (kd_cpu_impl.h's unmask): probability 0 all the same, and 0 log 0 = 0 in the KLs' terms
# instead of NaN from -inf - (-inf); NaN stays NaN (clamp keeps it).
_MASKED_LOGIT = -1.0e30


def _unmask(x):
    return x.clamp(min=_MASKED_LOGIT)


def _nan_where_all_masked(rows, student, *scaled):
    """rows, but NaN where one of the scaled (unmasked) logit rows is all masked: no
    distribution, a NaN loss and student gradient row, as the kernels give (NaN times the
    student's own row sum, so that the gradient is NaN too: through the clamp it would be 0)."""
    masked = torch.zeros_like(rows, dtype=torch.bool)
    for x in scaled:
        masked = masked | (x.amax(-1) <= _MASKED_LOGIT)   # (a NaN row goes on: NaN)
    # (the student read only in masked rows: elsewhere 0 * NaN would reach its gradient)
    poison = float("nan") * torch.where(masked[..., None], student, 0.0).sum(-1)
    return torch.where(masked, poison, rows)


def _rows_torch(student, teacher, kind, temperature, beta):
    """The same per-row losses in torch operations (devices without a fastloss kernel)."""
    s, t = _unmask(student.float() / temperature), _unmask(teacher.float() / temperature)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kind == "forward_kl":
        rows = (lt.exp() * (lt - ls)).sum(-1)
    elif kind == "reverse_kl":
        rows = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + torch.log(torch.tensor(beta)), ls + torch.log(torch.tensor(1 - beta)))
        rows = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    return _nan_where_all_masked(rows * temperature ** 2, student.float(), s, t)


def kd_loss(student: Tensor, teacher: Tensor, T: float = 1.0, kind: str = "forward_kl",
            beta: float = 0.5, reduction: str = "mean") -> Tensor:
    """Distillation loss of ``student`` logits towards ``teacher`` logits (module docstring).

    Args:
        student, teacher: ``[N, C]`` (or ``[..., C]``, flattened), float32/16 or bfloat16.
        T: temperature > 0 (the loss is multiplied by ``T^2``).
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD mixture weight of the teacher, in (0, 1).
        reduction: over rows, ``"mean"``, ``"sum"`` or ``"none"`` (the leading shape), or
            ``"batchmean"``, ``F.kl_div``'s: the sum divided by ``student.shape[0]`` (the mean
            for ``[N, C]``; for ``[B, T, C]`` the mean divides by ``B T``, batchmean by ``B``).

    ``teacher`` holds logits (or log-probabilities: a row's shift does not change the loss),
    not the probabilities that ``F.kl_div``'s default target is (its ``log_target=True`` form).

    A ``teacher`` that requires grad (while autograd records) gets its gradient too, as with
    ``F.kl_div``: such calls take the torch-operation formula (slower; ``[N, C]`` probabilities
    kept for the backward). Detach the teacher, or run it under ``torch.no_grad()``, for the
    fused kernels.
    """
    fn = "kd_loss"
    if kind not in _KINDS:
        raise ValueError(f"{fn}: kind must be one of {list(_KINDS)}, got {kind!r}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"{fn}: beta must be in (0, 1) for jsd, got {beta}")
    if reduction not in ("none", "mean", "sum", "batchmean"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean', 'sum' or 'batchmean', got {reduction!r}")
    batchmean = reduction == "batchmean"
    if batchmean:  # the float32 sum divided, then rounded once
        reduction = "sum"
    s2, t2 = _check_pair(fn, student, teacher, T, reduction)
    lead = student.shape[:-1]
    if has_kernel(s2) and not _teacher_needs_grad(t2):  # one op with its C++ autograd formula (kd_op.cpp)
        args = (s2, t2, _KINDS[kind], float(T), float(beta), _REDUCTION[reduction])
        if batchmean:
            return as_loss_dtype(torch.ops.fastloss.kd_loss(*args) / student.shape[0], student)
        out = call_rounding(torch.ops.fastloss.kd_loss, student, *args)
        return out.reshape(lead) if reduction == "none" else out
    rows = _rows_torch(s2, t2, kind, float(T), float(beta))
    if batchmean:
        return as_loss_dtype(rows.sum() / student.shape[0], student)
    return _reduce_rows(rows, reduction, student)


# --- order-based losses: top-k KL and Plackett-Luce distillation ------------------------------

def _fake_rows_and_grad(student, compute_grad):
    n = student.shape[0]
    return (student.new_empty((n,), dtype=torch.float32),
            student.new_empty(student.shape if compute_grad else (0,)))


@torch.library.register_fake("fastloss::topk_kl_forward")
def _fake_topk(student, teacher, k, temperature, renormalize, compute_grad, grad_scale=1.0):
    torch._check(student.dim() == 2 and teacher.shape == student.shape,
                 lambda: "student and teacher must be [N, C] of the same shape")
    return _fake_rows_and_grad(student, compute_grad)


@torch.library.register_fake("fastloss::pld_forward")
def _fake_pld(student, teacher, target, temperature, ignore_index, compute_grad, grad_scale=1.0):
    torch._check(student.dim() == 2 and teacher.shape == student.shape,
                 lambda: "student and teacher must be [N, C] of the same shape")
    return _fake_rows_and_grad(student, compute_grad)


@torch.library.register_fake("fastloss::scale_rows")
def _fake_scale_rows(grad, scale):
    return grad.new_empty(grad.shape)


def _setup_rows_grad(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.compute_grad = inputs[5]
    ctx.grad_scale = inputs[6] if len(inputs) > 6 else 1.0
    ctx.mark_non_differentiable(output[1])


def _make_rows_grad_backward(op, n_args):
    @once_differentiable(op)
    def backward(ctx, grad_rows, _grad_grad):
        (grad,) = ctx.saved_tensors
        if not ctx.compute_grad:
            raise RuntimeError(f"{op} was called with compute_grad=False; call the fastloss.ops "
                               "function, which asks for the gradient when it is needed")
        if ctx.grad_scale != 1.0:  # (the C++ eager paths scale it; they have their own formula)
            raise RuntimeError(f"{op}: its autograd formula needs grad_scale=1, got {ctx.grad_scale}")
        if grad.device.type == "cpu":
            return (torch.ops.fastloss.scale_rows(grad, grad_rows),) + (None,) * (n_args - 1)
        return (grad * grad_rows[:, None].to(grad.dtype),) + (None,) * (n_args - 1)
    return backward


torch.library.register_autograd("fastloss::topk_kl_forward",
                                _make_rows_grad_backward("topk_kl_forward", 7),
                                setup_context=_setup_rows_grad)
torch.library.register_autograd("fastloss::pld_forward",
                                _make_rows_grad_backward("pld_forward", 7),
                                setup_context=_setup_rows_grad)


def _check_pair(fn, student, teacher, T, reduction):
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    require_finite(fn, T=T)
    if not T > 0:
        raise ValueError(f"{fn}: T must be > 0, got {T}")
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if student.dim() < 1:
        raise ValueError(f"{fn}: student must have a class dimension ([..., C]), got a 0-dim tensor")
    if teacher.shape != student.shape:
        raise ValueError(f"{fn}: teacher must have student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if student.dtype not in _FLOATS or teacher.dtype != student.dtype:
        raise ValueError(f"{fn}: student and teacher must share a dtype among float32, float16 "
                         f"and bfloat16, got {student.dtype} and {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"{fn}: teacher is on {teacher.device} but student is on {student.device}")
    if student.shape[-1] == 0:
        raise ValueError(f"{fn}: student and teacher need at least one class, got shape "
                         f"{tuple(student.shape)}")
    return student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])


def _teacher_needs_grad(teacher):
    """A teacher that requires grad gets its gradient, as with F.kl_div: the kernels give only
    the student's, so such calls take the torch-operation formulas (_rows_torch and siblings)."""
    return teacher.requires_grad and torch.is_grad_enabled()


def _descending_order(teacher):
    """Class order by descending teacher logit, ties towards the lower class index."""
    return torch.sort(teacher, dim=-1, descending=True, stable=True).indices


def _topk_rows_torch(s, t, k, T, renormalize):
    """The same per-row top-k KL in torch operations (devices without a fastloss kernel)."""
    idx = _descending_order(t)[:, :k]
    s32, t32 = _unmask(s.float() / T), _unmask(t.float() / T)
    if renormalize:
        ls = F.log_softmax(s32.gather(1, idx), -1)
        lt = F.log_softmax(t32.gather(1, idx), -1)
    else:
        ls = F.log_softmax(s32, -1).gather(1, idx)
        lt = F.log_softmax(t32, -1).gather(1, idx)
    return _nan_where_all_masked((lt.exp() * (lt - ls)).sum(-1) * T * T, s.float(),
                                 s32.gather(1, idx) if renormalize else s32, t32.gather(1, idx) if renormalize else t32)


def topk_kl_loss(student: Tensor, teacher: Tensor, k: int, T: float = 1.0,
                 renormalize: bool = False, reduction: str = "mean") -> Tensor:
    """KL divergence restricted to the teacher's top-k classes (OSTQuant's KL-Top).

    Per row, with ``I`` the ``k`` classes of largest teacher logit (ties towards the lower class
    index), ``p = softmax(student / T)`` and ``q = softmax(teacher / T)``:

    * ``renormalize=False`` (default, as OSTQuant's released training scripts compute it):
      ``T^2 sum_{j in I} q_j (log q_j - log p_j)``, both softmaxes over all ``C`` classes, so
      the student's probability mass outside ``I`` is still penalized through ``log p``;
    * ``renormalize=True``: ``T^2 KL(softmax(t_I / T) || softmax(s_I / T))``, both renormalized
      over ``I`` (the form other write-ups describe).

    At ``T = 1`` and ``reduction="mean"`` this is OSTQuant's loss: ``F.kl_div`` with
    ``"batchmean"`` over the ``[N, k]`` gathered columns. With ``k = C`` both forms are
    ``kd_loss(student, teacher, T)``.

    Args:
        student, teacher: ``[N, C]`` (or ``[..., C]``, flattened), float32/16 or bfloat16.
        k: number of teacher classes kept, ``1 <= k <= C``.
        T: temperature > 0 (the loss is multiplied by ``T^2``, as ``kd_loss``).
        renormalize: renormalize both distributions over the top-k classes.
        reduction: over rows, ``"mean"``, ``"sum"`` or ``"none"`` (the leading shape).

    A ``teacher`` that requires grad (while autograd records) gets its gradient too, as with
    ``F.kl_div``: such calls take the torch-operation formula (slower; ``[N, C]`` probabilities
    kept for the backward). Detach the teacher, or run it under ``torch.no_grad()``, for the
    fused kernels.

    The CPU and CUDA kernels select the top-k classes of each row in O(C) (no sort; on CUDA a
    radix selection per row) and form the loss and the student's gradient in the same call; no
    ``[N, C]`` probability tensor is made.
    """
    fn = "topk_kl_loss"
    s2, t2 = _check_pair(fn, student, teacher, T, reduction)
    k = as_int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s2.shape[1]:
        raise ValueError(f"{fn}: k must be an int in [1, C = {s2.shape[1]}], got {k!r}")
    if has_kernel(s2) and not _teacher_needs_grad(t2):  # one op with its C++ autograd formula (kd_op.cpp)
        out = call_rounding(torch.ops.fastloss.topk_kl_loss, student, s2, t2, k, float(T), bool(renormalize),
                            _REDUCTION[reduction])
        return out.reshape(student.shape[:-1]) if reduction == "none" else out
    rows = _topk_rows_torch(s2, t2, k, float(T), bool(renormalize))
    return _reduce_rows(rows, reduction, student)


def _reduce_rows(rows, reduction, student, count=None):
    """Over rows: the mean (over `count` kept rows when given), the sum, or the leading shape."""
    if reduction == "mean":
        if count is None:
            return as_loss_dtype(rows.mean(), student)
        # over no kept rows: NaN with a zero gradient, as F.cross_entropy
        total = rows.sum()
        return as_loss_dtype(torch.where(count > 0, total / count.clamp_min(1), float("nan")), student)
    if reduction == "sum":
        return as_loss_dtype(rows.sum(), student)
    return as_loss_dtype(rows.reshape(student.shape[:-1]), student)


def _pld_rows_torch(s, t, y, T, ignore_index):
    """The same per-row PLD loss in torch operations (devices without a fastloss kernel)."""
    keep = y != ignore_index
    yk = torch.where(keep, y, 0)
    t32 = t.float()
    # the target first: lift it above every other class, then order by descending teacher logit
    key = t32.scatter(1, yk[:, None], float("inf"))
    order = _descending_order(key)
    w = torch.softmax(t32 / T, -1).gather(1, order)
    so = _unmask(s.float()).gather(1, order)
    suffix_lse = torch.logcumsumexp(so.flip(-1), -1).flip(-1)
    return torch.where(keep, (w * (suffix_lse - so)).sum(-1), 0.0)


def pld_loss(student: Tensor, teacher: Tensor, target: Tensor, T: float = 1.0,
             ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Plackett-Luce distillation (PLD, "A Choice-Theoretic List-Wise Knowledge Distillation").

    Per row, the teacher-optimal ranking ``pi`` puts the target class first, then the other
    classes by descending teacher logit (ties towards the lower class index); with weights
    ``w = softmax(teacher / T)`` (the teacher's confidence in each class),

    .. math:: \\ell = \\sum_{k=1}^{C} w_{\\pi_k}\\Big(\\log\\sum_{l \\ge k} e^{s_{\\pi_l}}
              - s_{\\pi_k}\\Big)

    a weighted list-wise (ListMLE) loss that replaces cross-entropy + KD (the paper's Appendix
    C: the student logits ``s`` are not scaled, ``T`` only sharpens or flattens the weights, no
    ``T^2`` factor). Rows whose target is ``ignore_index`` are skipped; ``"mean"`` divides by
    the number of rows kept, as ``F.cross_entropy`` does.

    Args:
        student, teacher: ``[N, C]`` (or ``[..., C]``, flattened), float32/16 or bfloat16.
        target: integer classes ``[N]`` (or the leading shape); checked on the CPU, while on CUDA
            a class outside [0, C) gives that row a NaN loss (a check would wait for the device).
        T: temperature of the teacher's weights, > 0 (the paper's best ImageNet value is 1).
        ignore_index: target value of rows to skip.
        reduction: over rows, ``"mean"``, ``"sum"`` or ``"none"`` (the leading shape).

    A ``teacher`` that requires grad (while autograd records) gets its gradient too (through
    the weights ``w``; the order is piecewise constant): such calls take the torch-operation
    formula. Detach the teacher, or run it under ``torch.no_grad()``, for the fused kernels.

    The CPU kernel sorts each row once (a radix sort of the teacher logits), forms the suffix
    log-sum-exps and, in the same call, the gradient; on CUDA torch's stable sort gives the
    order and one kernel the rest (an int64 order and a float32 scratch of ``[N, C]`` in
    flight); the eager form sorts, gathers and keeps a handful of ``[N, C]`` tensors for
    autograd.
    """
    fn = "pld_loss"
    s2, t2 = _check_pair(fn, student, teacher, T, reduction)
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a Tensor, got {type(target).__name__}")
    if target.shape != student.shape[:-1]:
        raise ValueError(f"{fn}: target must have shape {tuple(student.shape[:-1])} (student's "
                         f"without the class dimension), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"{fn}: target must hold integer class indices, got {target.dtype}")
    if target.device != student.device:
        raise ValueError(f"{fn}: target is on {target.device} but student is on {student.device}")
    y = target.reshape(-1)
    if has_kernel(s2) and not _teacher_needs_grad(t2):  # one op with its C++ autograd formula (kd_op.cpp)
        out = call_rounding(torch.ops.fastloss.pld_loss, student, s2, t2, y, float(T), int(ignore_index),
                            _REDUCTION[reduction])
        return out.reshape(student.shape[:-1]) if reduction == "none" else out
    bad = (y != ignore_index) & ((y < 0) | (y >= s2.shape[1]))
    if values_readable(y):
        if bool(bad.any()):
            raise ValueError(f"{fn}: target holds values outside [0, C = {s2.shape[1]}) that are "
                             f"not ignore_index ({ignore_index})")
        rows = _pld_rows_torch(s2, t2, y, float(T), int(ignore_index))
    else:  # no host check (it would wait for the device, or break a compiled graph): NaN rows
        rows = _pld_rows_torch(s2, t2, torch.where(bad, 0, y), float(T), int(ignore_index))
        rows = torch.where(bad, float("nan"), rows)
    count = (y != ignore_index).sum() if reduction == "mean" else None
    return _reduce_rows(rows, reduction, student, count)
