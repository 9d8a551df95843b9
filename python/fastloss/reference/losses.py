"""Plain eager reference implementations of the fastloss classification losses.

These functions are the oracle that the hand-written kernels are tested
against.  They are written straight from each paper's formula with
vectorized PyTorch tensor ops (no per-row Python loops), so autograd
provides the backward pass.  They favour readability over speed.

Common semantics (mirroring ``torch.nn.functional.cross_entropy``):

* ``logits`` is ``[N, C]`` of any floating dtype, ``target`` is ``[N]`` int64.
* Rows whose target equals ``ignore_index`` contribute 0 to the loss (and get
  a zero gradient) and are excluded from the ``"mean"`` denominator.
* ``weight`` is an optional per-class weight ``[C]``; row ``i``'s loss is
  multiplied by ``w[y_i]`` (label-smoothed cross-entropy uses ``w_k`` in the
  smoothing term, exactly like PyTorch).
* ``reduction``: ``"none"`` returns the ``[N]`` vector (ignored rows are 0),
  ``"sum"`` its sum, ``"mean"`` the sum divided by ``sum_i w[y_i]`` over the
  non-ignored rows (their count when ``weight`` is None).  An empty batch, or
  one where every row is ignored, gives ``nan`` for ``"mean"`` (0/0).
* ``compute_dtype`` (keyword only, default float64): inputs are cast to it
  and all the math is done in it; the result has that dtype.  ``None`` means
  "compute in the logits' own dtype" (the eager baseline).

This module deliberately imports only ``torch`` and ``math``.
"""

import math

import torch

__all__ = [
    "cross_entropy",
    "comp_sum_loss",
    "ldr_loss",
    "ldr_adaptive_lambda",
    "spherical_z_loss",
    "stablemax",
    "stablemax_cross_entropy",
]

_REDUCTIONS = ("none", "sum", "mean")


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )


def _prepare(logits, target, weight, ignore_index, compute_dtype):
    """Cast the inputs and build the masks shared by every loss.

    Returns ``(x, safe_target, valid, w)`` where ``x`` is the logits in the
    compute dtype, ``safe_target`` is the target with ignored rows replaced by
    class 0 (so that gathers never index out of range), ``valid`` is the
    boolean mask of non-ignored rows and ``w`` is the class weight in the
    compute dtype (or None).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must be 1-D [N] with N={logits.shape[0]}, got shape {tuple(target.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got {logits.dtype}")

    dtype = logits.dtype if compute_dtype is None else compute_dtype
    x = logits.to(dtype)

    target = target.long()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))

    w = None
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
            raise ValueError(
                f"weight must be 1-D [C] with C={logits.shape[1]}, got shape {tuple(weight.shape)}"
            )
        w = weight.to(device=x.device, dtype=dtype)
    return x, safe_target, valid, w


def _gather_rows(values, safe_target):
    """values[i, safe_target[i]] for every row i, shape [N]."""
    return values.gather(1, safe_target.unsqueeze(1)).squeeze(1)


def _target_weight(w, safe_target, valid, dtype):
    """w[y_i] for non-ignored rows and 0 for ignored rows, shape [N]."""
    if w is None:
        w_y = torch.ones(safe_target.shape, dtype=dtype, device=safe_target.device)
    else:
        w_y = w[safe_target]
    return torch.where(valid, w_y, torch.zeros_like(w_y))


def _reduce(per_row, valid, w_y, reduction):
    """Zero the ignored rows, then reduce as F.cross_entropy does.

    ``per_row`` must already include the class weight.  ``w_y`` is the
    (already masked) target weight used as the "mean" denominator.
    """
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / w_y.sum()  # 0/0 -> nan for an empty / fully ignored batch


# ---------------------------------------------------------------------------
# 1. Cross-entropy (+ label smoothing, lse^2 "z-loss", logit soft-capping)
# ---------------------------------------------------------------------------


def cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    *,
    compute_dtype=torch.float64,
):
    """Softmax cross-entropy with optional label smoothing, lse^2 penalty and softcap.

    z = softcap * tanh(logits / softcap) (or z = logits), lse = logsumexp(z).
    Per row::

        (1 - eps) * w_y * (lse - z_y)
        + (eps / C) * sum_k w_k * (lse - z_k)
        + lse_square_scale * w_y * lse ** 2

    With ``lse_square_scale == 0`` and ``softcap is None`` this is exactly
    ``torch.nn.functional.cross_entropy`` (weight, label smoothing and
    ignore_index included).
    """
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")

    x, t, valid, w = _prepare(logits, target, weight, ignore_index, compute_dtype)
    num_classes = x.shape[1]
    w_y = _target_weight(w, t, valid, x.dtype)

    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - _gather_rows(z, t)  # -log softmax(z)_y

    per_row = (1.0 - label_smoothing) * w_y * nll
    if label_smoothing != 0.0:
        neg_log_probs = lse.unsqueeze(1) - z  # [N, C]: -log softmax(z)_k
        if w is not None:
            neg_log_probs = neg_log_probs * w.unsqueeze(0)
        per_row = per_row + (label_smoothing / num_classes) * neg_log_probs.sum(dim=-1)
    if lse_square_scale != 0.0:
        per_row = per_row + lse_square_scale * w_y * lse * lse

    return _reduce(per_row, valid, w_y, reduction)


# ---------------------------------------------------------------------------
# 2. Comp-sum losses (Mao, Mohri, Zhong, ICML 2023)
# ---------------------------------------------------------------------------


def comp_sum_loss(
    logits,
    target,
    tau,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    compute_dtype=torch.float64,
):
    """Comp-sum loss Phi_tau(u) with u = sum_{k != y} exp(f_k - f_y).

    Phi_1(u) = log(1 + u) and Phi_tau(u) = ((1 + u)^(1 - tau) - 1) / (1 - tau)
    otherwise.  Since 1 + u = exp(lse - f_y), with d = lse - f_y this is
    ``d`` for tau == 1 and ``expm1((1 - tau) * d) / (1 - tau)`` otherwise.
    tau = 0: sum exponential loss, tau = 1: cross-entropy,
    tau = 2: 1 - softmax(f)_y (mean absolute error).
    """
    _check_reduction(reduction)
    tau = float(tau)
    if not (tau >= 0.0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")

    x, t, valid, w = _prepare(logits, target, weight, ignore_index, compute_dtype)
    w_y = _target_weight(w, t, valid, x.dtype)

    d = torch.logsumexp(x, dim=-1) - _gather_rows(x, t)  # log(1 + u) >= 0
    if tau == 1.0:
        phi = d
    else:
        phi = torch.expm1((1.0 - tau) * d) / (1.0 - tau)

    return _reduce(w_y * phi, valid, w_y, reduction)


# ---------------------------------------------------------------------------
# 3. LDR-KL / ALDR-KL (Zhu, Ying, Yang, ICML 2023)
# ---------------------------------------------------------------------------


def _ldr_margins(x, safe_target, margin):
    """d_k = f_k - f_y + margin * [k != y], shape [N, C]."""
    classes = torch.arange(x.shape[1], device=x.device)
    not_target = (classes.unsqueeze(0) != safe_target.unsqueeze(1)).to(x.dtype)
    return x - _gather_rows(x, safe_target).unsqueeze(1) + margin * not_target


def _ldr_lambda_from_margins(d, lam, alpha):
    """Per-row adaptive lambda of ALDR-KL, computed from d and detached.

    p0 = softmax(d / lam), KL = KL(p0 || uniform) = sum_k p0_k log(K p0_k),
    lam_i = lam * (1 - KL / (alpha * log K)); lam_i = lam when K == 1.
    """
    num_classes = d.shape[1]
    d = d.detach()
    if num_classes <= 1:
        return torch.full(d.shape[:1], lam, dtype=d.dtype, device=d.device)
    log_k = math.log(num_classes)
    log_p0 = torch.log_softmax(d / lam, dim=-1)
    # xlogy: a masked (-inf) class has p0 = 0 and contributes 0 * log 0 = 0
    kl = torch.special.xlogy(log_p0.exp(), log_p0.exp()).sum(dim=-1) + log_k
    return lam * (1.0 - kl / (alpha * log_k))


def _check_lam(lam):
    lam = float(lam)
    if not (lam > 0.0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    return lam


def _check_alpha(alpha):
    alpha = float(alpha)
    if not (alpha > 1.0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 1, got {alpha}")
    return alpha


def ldr_adaptive_lambda(
    logits,
    target,
    lam,
    margin=1.0,
    alpha=2.0,
    *,
    compute_dtype=torch.float64,
):
    """Per-row lambda_i [N] of ALDR-KL (detached, in the compute dtype).

    Rows whose target is outside [0, C) (e.g. an ignore_index) get ``lam``.
    """
    lam = _check_lam(lam)
    alpha = _check_alpha(alpha)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    dtype = logits.dtype if compute_dtype is None else compute_dtype
    x = logits.detach().to(dtype)
    target = target.long()
    in_range = (target >= 0) & (target < x.shape[1])
    safe_target = torch.where(in_range, target, torch.zeros_like(target))
    lam_i = _ldr_lambda_from_margins(_ldr_margins(x, safe_target, margin), lam, alpha)
    return torch.where(in_range, lam_i, torch.full_like(lam_i, lam))


def ldr_loss(
    logits,
    target,
    lam,
    margin=1.0,
    adaptive=False,
    alpha=2.0,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    compute_dtype=torch.float64,
):
    """Label-distributionally-robust KL loss (LDR-KL) and its adaptive variant.

    d_k = f_k - f_y + margin * [k != y], K = C.

    * LDR-KL:  lam * log((1/K) sum_k exp(d_k / lam)) = lam * (logsumexp(d / lam) - log K)
    * ALDR-KL: with lam_i = ldr_adaptive_lambda(...) treated as a constant,
      lam_i * (logsumexp(d / lam_i) - log K) - (alpha log K / (2 lam)) (lam_i - lam)^2.

    ``alpha`` is only used (and validated) when ``adaptive`` is True.
    """
    _check_reduction(reduction)
    lam = _check_lam(lam)
    if adaptive:
        alpha = _check_alpha(alpha)

    x, t, valid, w = _prepare(logits, target, weight, ignore_index, compute_dtype)
    w_y = _target_weight(w, t, valid, x.dtype)
    log_k = math.log(x.shape[1]) if x.shape[1] > 0 else 0.0

    d = _ldr_margins(x, t, margin)
    if not adaptive:
        per_row = lam * (torch.logsumexp(d / lam, dim=-1) - log_k)
    else:
        lam_i = _ldr_lambda_from_margins(d, lam, alpha)  # detached
        robust = lam_i * (torch.logsumexp(d / lam_i.unsqueeze(1), dim=-1) - log_k)
        per_row = robust - (alpha * log_k / (2.0 * lam)) * (lam_i - lam) ** 2

    return _reduce(w_y * per_row, valid, w_y, reduction)


# ---------------------------------------------------------------------------
# 4. Spherical Z-loss (de Brebisson and Vincent, ICLR 2016)
# ---------------------------------------------------------------------------


def spherical_z_loss(
    logits,
    target,
    a,
    b,
    eps=1e-6,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    compute_dtype=torch.float64,
):
    """Z-loss: (1/a) * softplus(a * (b - z_y)), z = (f - mean f) / sqrt(var f + eps).

    ``var`` is the population variance over the C classes.  With eps == 0
    a row of identical logits gives 0/0 = nan (as the formula does).
    """
    _check_reduction(reduction)
    a = float(a)
    if not (a > 0.0 and math.isfinite(a)):
        raise ValueError(f"a must be a finite number > 0, got {a}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    x, t, valid, w = _prepare(logits, target, weight, ignore_index, compute_dtype)
    w_y = _target_weight(w, t, valid, x.dtype)

    mu = x.mean(dim=-1)
    var = ((x - mu.unsqueeze(1)) ** 2).mean(dim=-1)
    sigma = torch.sqrt(var + eps)
    z_y = (_gather_rows(x, t) - mu) / sigma
    u = a * (b - z_y)
    # softplus(u) = log(1 + exp(u)), computed exactly (F.softplus linearises
    # above its threshold, which is not accurate enough for an oracle).
    per_row = torch.logaddexp(torch.zeros_like(u), u) / a

    return _reduce(w_y * per_row, valid, w_y, reduction)


# ---------------------------------------------------------------------------
# 5. StableMax cross-entropy (Prieto et al., "Grokking at the edge of
#    numerical stability")
# ---------------------------------------------------------------------------


def _stablemax_s(x):
    """s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0.

    torch.where differentiates both branches, so each branch is made finite
    everywhere: the negative branch uses min(x, 0) so 1 - min(x, 0) >= 1.
    The positive branch is plain x + 1 (finite, derivative 1 everywhere; using
    clamp(x, min=0) instead would give a zero derivative at exactly x == 0,
    while the true derivative of s at 0 is 1 from both sides).
    """
    negative_branch = 1.0 / (1.0 - x.clamp(max=0))
    positive_branch = x + 1.0
    return torch.where(x >= 0, positive_branch, negative_branch)


def stablemax(logits, dim=-1, *, compute_dtype=torch.float64):
    """StableMax(x)_k = s(x_k) / sum_j s(x_j) along ``dim``."""
    dtype = logits.dtype if compute_dtype is None else compute_dtype
    s = _stablemax_s(logits.to(dtype))
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    compute_dtype=torch.float64,
):
    """-log StableMax(x)_y = log(sum_j s(x_j)) - log(s(x_y))."""
    _check_reduction(reduction)
    x, t, valid, w = _prepare(logits, target, weight, ignore_index, compute_dtype)
    w_y = _target_weight(w, t, valid, x.dtype)

    s = _stablemax_s(x)
    per_row = torch.log(s.sum(dim=-1)) - torch.log(_gather_rows(s, t))

    return _reduce(w_y * per_row, valid, w_y, reduction)
