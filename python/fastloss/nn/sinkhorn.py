"""``SinkhornLoss``: the entropic optimal-transport loss between point clouds
(:func:`fastloss.ops.wasserstein`), optionally debiased into the Sinkhorn divergence."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops

_REDUCTIONS = ("mean", "sum", "none")
# what forward passes on to ops.sinkhorn (return_plan: a loss has no plan to return)
_SOLVER_KWARGS = ("method", "max_iter", "tol", "warmup_iters", "sparsity", "warn")


class SinkhornLoss(nn.Module):
    """OT_eps(x, y) with ground cost ``||x_i - y_j||^p`` between point clouds ``x`` ``[B, n, d]``
    (or ``[n, d]``) and ``y`` ``[B, m, d]``, weights ``a``, ``b`` (uniform when omitted).

    ``debias=True`` (the default, as geomloss's ``SamplesLoss``) returns the Sinkhorn divergence
    ``OT_eps(x, y) - (OT_eps(x, x) + OT_eps(y, y)) / 2`` (Feydy et al., 2019), which is zero when
    the two weighted clouds are equal and is what a loss to be minimised usually wants (its
    self terms by the symmetric update of :func:`fastloss.ops.self_transport_cost`, which only
    takes ``max_iter``, ``tol`` and ``warn`` of the solver's arguments); with ``debias=False``
    it is ``OT_eps(x, y)`` itself, which is not minimised at ``x = y``.
    ``reduction`` over the batch: ``"mean"``, ``"sum"`` or ``"none"``. Other keyword arguments
    (``method``, ``max_iter``, ``tol``, ``warmup_iters``, ``sparsity``, ``warn``) go to
    :func:`fastloss.ops.sinkhorn`.

    geomloss's ``SamplesLoss("sinkhorn", p=2, blur=s)`` takes the cost ``|x - y|^2 / 2`` and
    ``eps = s^2``: it equals ``SinkhornLoss(p=2, eps=2 * s**2, reduction="none") / 2`` (one value
    per batch entry, as geomloss returns them)."""

    def __init__(self, p: int = 2, eps: float = 0.05, debias: bool = True, reduction: str = "mean",
                 **solver_kwargs) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"SinkhornLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if p not in (1, 2):
            raise ValueError(f"SinkhornLoss: p must be 1 or 2, got {p}")
        if not eps > 0:
            raise ValueError(f"SinkhornLoss: eps must be > 0, got {eps}")
        unknown = sorted(set(solver_kwargs) - set(_SOLVER_KWARGS))
        if unknown:  # (at construction: they would otherwise fail at the first call)
            hint = (" (geomloss's blur s: p = 2 is SinkhornLoss(eps=2 * s**2) / 2, geomloss halving "
                    "the cost; p = 1 is eps=s; see the docstring)" if "blur" in unknown else "")
            raise TypeError(f"SinkhornLoss: unexpected keyword argument(s) {unknown}; the solver takes "
                            f"{list(_SOLVER_KWARGS)}{hint}")
        self.p, self.eps, self.debias, self.reduction = p, eps, debias, reduction
        self.solver_kwargs = solver_kwargs

    def _ot(self, x, y, a, b):
        return ops.wasserstein(x, y, a, b, p=self.p, eps=self.eps, **self.solver_kwargs)

    def _self_ot(self, x, a):
        # the symmetric update (ops.self_transport_cost): alternating Sinkhorn iterations stall
        # on these problems once max C / eps is large
        kw = {k: v for k, v in self.solver_kwargs.items() if k in ("max_iter", "tol", "warn")}
        return ops.self_transport_cost(x, a, p=self.p, eps=self.eps, **kw)

    def forward(self, x: Tensor, y: Tensor, a: Optional[Tensor] = None,
                b: Optional[Tensor] = None) -> Tensor:
        loss = self._ot(x, y, a, b)
        if self.debias:
            loss = loss - 0.5 * (self._self_ot(x, a) + self._self_ot(y, b))
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}, debias={self.debias}, reduction={self.reduction!r}"
