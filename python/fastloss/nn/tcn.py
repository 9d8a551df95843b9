"""Temporal convolution modules: one depthwise dilated convolution, and a TCNCA-style stack
with a streaming (one step at a time) form."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops

_ACTIVATIONS = {name: fn for name, (_code, fn) in ops.tcn.ACTIVATIONS.items()}


class DilatedConv1d(nn.Module):
    """Depthwise dilated convolution (:func:`fastloss.ops.dilated_conv1d`) with its own
    ``weight [C, K]`` and ``bias [C]``. Not ``nn.Conv1d``'s argument list (one channel count,
    no stride or padding): the arguments after ``kernel_size`` are keywords, so that
    ``nn.Conv1d``'s ``(C, C, K)`` raises instead of building a kernel of ``C`` taps."""

    def __init__(self, channels: int, kernel_size: int, *, dilation: int = 1, causal: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if kernel_size < 1 or dilation < 1:
            raise ValueError(f"DilatedConv1d: kernel_size and dilation must be >= 1, got "
                             f"{kernel_size} and {dilation}")
        if not isinstance(causal, bool):  # (at construction, not at the first call)
            raise ValueError(f"DilatedConv1d: causal must be True or False, got {causal!r}")
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(channels, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.dilation, self.causal = dilation, causal
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv1d's default initialisation for a depthwise kernel (also what a model built
        on the meta device and moved with ``to_empty`` calls, as for torch's layers)."""
        bound = 1 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dilated_conv1d(x, self.weight, self.bias, self.dilation, self.causal)

    def extra_repr(self) -> str:
        c, k = self.weight.shape
        return f"channels={c}, kernel_size={k}, dilation={self.dilation}, causal={self.causal}"


class TCN(nn.Module):
    """A stack of causal depthwise dilated convolutions whose dilation grows geometrically
    (level ``l`` has dilation ``base ** l``), each with an activation and a residual
    connection: ``x <- x + act(conv_l(x))``. The receptive field is
    ``1 + (K - 1) (base ** depth - 1) / (base - 1)`` steps (for ``base > 1``); a sequence
    shorter than that sees zeros before its start, exactly as the streaming form does.

    TCNCA (Terzic et al., 2023) replaces MEGA's FFT-computed recurrence with such a stack.
    The activation is GELU by default (MEGA's); the abstract does not fix it, so it is a
    parameter (``"gelu"``, ``"relu"``, ``"silu"`` or None).

    Streaming: ``state = tcn.init_state(batch)``, then ``y_t, state = tcn.step(x_t, state)``
    for ``x_t [B, C]``: each level keeps a ring buffer of its last ``d (K - 1)`` inputs, so a
    step costs O(depth * K * C) and gives the outputs of the full-sequence forward.
    """

    def __init__(self, channels: int, depth: int, kernel_size: int = 2, base: int = 2,
                 activation: Optional[str] = "gelu", bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if depth < 1 or base < 1:
            raise ValueError(f"TCN: depth and base must be >= 1, got {depth} and {base}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"TCN: activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        self.levels = nn.ModuleList(
            DilatedConv1d(channels, kernel_size, dilation=base ** level, causal=True, bias=bias,
                          device=device, dtype=dtype)
            for level in range(depth))
        self.activation = activation
        self.act = _ACTIVATIONS[activation]

    @property
    def receptive_field(self) -> int:
        return 1 + sum((lv.weight.shape[1] - 1) * lv.dilation for lv in self.levels)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[B, C, L]`` (channels-first or channels-last memory) -> ``[B, C, L]``."""
        for level in self.levels:  # fused on the CPU (fastloss.ops.tcn_level)
            x = ops.tcn_level(x, level.weight, level.bias, level.dilation, self.activation)
        return x

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        """The state before the first step: zero history (the zero padding of the forward)."""
        w = self.levels[0].weight
        device, dtype = device or w.device, dtype or w.dtype
        c = w.shape[0]
        return {"t": 0, "buffers": [
            torch.zeros(batch, c, (lv.weight.shape[1] - 1) * lv.dilation, device=device, dtype=dtype)
            for lv in self.levels]}

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        """One time step: ``x_t [B, C]`` -> ``(y_t [B, C], state)`` (the state is updated in
        place and returned)."""
        c = self.levels[0].weight.shape[0]
        buffers = state.get("buffers") if isinstance(state, dict) else None
        if buffers is None or len(buffers) != len(self.levels) or "t" not in state:
            raise ValueError("TCN.step: state must come from TCN.init_state (a dict with 't' and "
                             f"one buffer per level, {len(self.levels)})")
        if x_t.dim() != 2 or x_t.shape[1] != c:
            raise ValueError(f"TCN.step: x_t must be [B, {c}], got {tuple(x_t.shape)}")
        t = state["t"]
        acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32  # (the forward's math)
        for level, buf in zip(self.levels, buffers):
            k, d = level.weight.shape[1], level.dilation
            if tuple(buf.shape) != (x_t.shape[0], c, (k - 1) * d):
                raise ValueError(f"TCN.step: a level's buffer must be [{x_t.shape[0]}, {c}, "
                                 f"{(k - 1) * d}], got {tuple(buf.shape)}")
            span = (k - 1) * d
            # taps k = 0..K-1 read the inputs d (K - 1 - k) steps back; slot (t - lag) mod span
            past = [buf[:, :, (t - (k - 1 - j) * d) % span] for j in range(k - 1)] if span else []
            taps = torch.stack(past + [x_t], dim=-1)                     # [B, C, K]
            h = (taps.to(acc) * level.weight.to(acc)).sum(-1)
            if level.bias is not None:
                h = h + level.bias.to(acc)
            if span:
                buf[:, :, t % span] = x_t                                  # after reading its slot
            x_t = x_t + self.act(h.to(x_t.dtype))
        state["t"] = t + 1
        return x_t, state
