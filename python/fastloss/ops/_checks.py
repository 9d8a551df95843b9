"""Checks of the ops' scalar arguments shared across families."""
from __future__ import annotations

import math
import operator

import torch


def values_readable(t) -> bool:
    """Whether a check may read ``t``'s values: on the CPU (free; on a GPU it would wait for the
    device, a meta tensor has none) and not while torch.compile traces (data-dependent)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def require_finite(fn: str, **values) -> None:
    """ValueError naming the first of ``values`` that is not a finite number (None is let
    through: it means "not used"). An infinite or NaN hyperparameter (a temperature, a margin,
    a scale) would otherwise turn every loss into NaN without a word. Not while torch.compile
    traces (a dynamic scalar there is symbolic; the eager call checks it)."""
    if torch.compiler.is_compiling():
        return
    for name, v in values.items():
        if v is None:
            continue
        try:
            finite = math.isfinite(v)
        except OverflowError:  # (an int past float's range)
            finite = False
        except (TypeError, ValueError, RuntimeError):  # (a string, a tensor of several values)
            raise TypeError(f"{fn}: {name} must be a number, got {type(v).__name__}") from None
        if not finite:
            raise ValueError(f"{fn}: {name} must be a finite number, got {v}")



def as_int(v):
    """``v`` as a Python int where it is an integer of another type (a NumPy integer, anything
    with ``__index__`` but a bool), else ``v`` as it is: the ops' integer arguments go through it
    before their checks, so that ``k=np.int64(3)`` works as in torch's own ops."""
    if isinstance(v, (bool, int)) or not hasattr(type(v), "__index__"):
        return v
    try:
        return operator.index(v)
    except TypeError:
        return v
