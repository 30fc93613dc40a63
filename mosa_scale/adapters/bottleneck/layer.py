"""Bottleneck adapters (MOSA_SPEC section 1): parallel (AdaptFormer), sequential (Pfeiffer), Houlsby,
and the wrappers that put them into a block.

The same adapter module serves the dense baseline, MoSA training (Down/Up may be
:class:`~mosa_scale.sparse.linear.SparseExpertLinear`) and the merged adapter (plain
``nn.Linear``), so a merged state dict loads into a dense-built adapter with no MoSA code. The
adapter is a child of the block (``<block>.mosa_adapter``); the wrappers only call it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosa_scale.adapters.factory import CastIO
from mosa_scale.adapters.wrap import Wrapper, map_first

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class BottleneckAdapter(CastIO):
    """``s * Up(Dropout(act(Down(LN_a(x)))))``.

    Args:
        down: ``(dim -> r)`` projection.
        up: ``(r -> dim)`` projection.
        dim: Feature width (for LN_a).
        act: ``gelu``, ``relu`` or ``silu``.
        layer_norm: Whether to apply a fresh trainable LayerNorm first.
        scale: Output scale s.
        dropout: Dropout probability after the activation.
    """

    def __init__(
        self, down: nn.Module, up: nn.Module, *, dim: int, act: str, layer_norm: bool, scale: float, dropout: float
    ) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.down, self.up = down, up
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = self.down(self.ln(x))  # (B, T, D) -> (B, T, r)
        h = self.up(self.dropout(self.act(h)))  # (B, T, r) -> (B, T, D)
        return h * self.scale if self.scale != 1.0 else h


class HandOff:
    """The residual stream h of the current block call, from the pre-FFN norm (which receives it)
    to the FFN wrapper (which needs it): put once per call, taken once, so nothing outlives the
    block's forward (a recomputed block puts and takes again)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("parallel adapter: the FFN ran without its pre-FFN norm running first")
        return value


class TapInput(Wrapper):
    """The pre-FFN norm, handing its input h (the stream after attention) to the FFN wrapper."""

    def __init__(self, base: nn.Module, handoff: HandOff) -> None:
        super().__init__(base)
        self.__dict__["handoff"] = handoff

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # (B, T, D) -> base's output
        self.handoff.value = x
        return self.base_layer(x, *args, **kwargs)


class AddAdapter(Wrapper):
    """A sublayer plus an adapter term: ``y + A(y)`` (sequential on the FFN, Houlsby on attention
    and FFN) or, with a hand-off, ``FFN(LN2(h)) + A(h)`` (parallel). ``y`` is the output, or its
    first element when the sublayer returns a tuple.

    Args:
        base: The sublayer.
        adapter: The adapter module (registered on the block by the caller, not here).
        handoff: For the parallel adapter: where the pre-FFN norm left h.
    """

    def __init__(self, base: nn.Module, adapter: nn.Module, handoff: HandOff | None = None) -> None:
        super().__init__(base)
        self.__dict__["adapter"] = adapter
        self.__dict__["handoff"] = handoff

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # (B, T, D) -> (B, T, D)
        out = self.base_layer(*args, **kwargs)
        if self.handoff is None:
            return map_first(out, lambda y: y + self.adapter(y))
        h = self.handoff.take()
        return map_first(out, lambda y: y + self.adapter(h))
