"""Bottleneck adapters (MOSA_SPEC section 1): parallel (AdaptFormer), sequential (Pfeiffer), Houlsby.

The same module serves the dense baseline, MoSA training (Down/Up may be
:class:`~mosa_scale.sparse.linear.SparseExpertLinear`) and the merged adapter (plain
``nn.Linear``), so a merged state dict loads into a dense-built adapter with no MoSA code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosa_scale.adapters.factory import CastIO

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
        self._stash: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = self.down(self.ln(x))  # (B, T, D) -> (B, T, r)
        h = self.up(self.dropout(self.act(h)))  # (B, T, r) -> (B, T, D)
        return h * self.scale if self.scale != 1.0 else h

    # Hooks. Bound methods (not closures) so that deepcopy of the model re-targets them.
    def stash_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Pre-hook on the pre-FFN norm: its input is the residual stream h after attention."""
        self._stash = args[0]

    def add_from_stash(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Hook on the FFN: ``FFN(LN2(h)) + s * A(h)`` (parallel)."""
        h, self._stash = self._stash, None
        if h is None:
            raise RuntimeError("parallel adapter: the FFN ran without its pre-FFN norm running first")
        return _map_first(output, lambda y: y + self(h))

    def add_from_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Hook on a sublayer: ``y + A(y)`` (sequential on the FFN, Houlsby on attention and FFN)."""
        return _map_first(output, lambda y: y + self(y))


def _map_first(output: Any, fn: Any) -> Any:
    """Applies ``fn`` to a tensor output, or to the first element of a tuple output."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)
