"""LoRA and MoSA-LoRA (MOSA_SPEC section 1): ``W x + scale * B A x`` on attention q and v.

The frozen projection keeps its class's behaviour and its state-dict keys: its class is swapped
for a subclass that adds the low-rank term, and the LoRA factors live in a ``mosa_lora`` child.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosa_scale.adapters.factory import CastIO
from mosa_scale.sparse.linear import SparseExpertLinear


def current_weight(module: nn.Module) -> torch.Tensor:
    """The weight a projection uses now: expert k's while training, merged in eval, or dense."""
    if isinstance(module, SparseExpertLinear):
        return module.weight_and_bias()[0]
    return module.weight


class LoRA(CastIO):
    """``scale * B(A(x))`` with A ``(r x in)`` (kaiming) and B ``(out x r)`` (zeros)."""

    def __init__(self, a: nn.Module, b: nn.Module, *, scale: float, dropout: float) -> None:
        super().__init__()
        self.a, self.b, self.scale = a, b, scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        return self.b(self.a(self.dropout(x))) * self.scale

    def delta(self) -> torch.Tensor:
        """The low-rank weight update ``scale * B @ A``, ``(out, in)``."""
        return (current_weight(self.b) @ current_weight(self.a)) * self.scale


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a LoRA term (the instance's class is swapped in place)."""

    mosa_lora: LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        return super().forward(x) + self.mosa_lora(x)


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (fused in-projection, as in OpenCLIP) with LoRA on q and/or v.

    The effective in-projection ``W + [dq; 0; dv]`` is put in place of ``in_proj_weight`` for
    the duration of the parent's forward, so the parent's code path (including its inference
    fast path) runs unchanged.
    """

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        d = self.embed_dim
        weight = self.in_proj_weight
        parts = [torch.zeros(d, d, dtype=weight.dtype, device=weight.device)] * 3
        for i, name in ((0, "mosa_lora_q"), (2, "mosa_lora_v")):
            if hasattr(self, name):
                parts[i] = getattr(self, name).delta().to(weight.dtype)
        effective = weight + torch.cat(parts, dim=0)  # (3D, D)
        self._parameters["in_proj_weight"] = effective  # type: ignore[assignment]
        try:
            return super().forward(query, *args, **kwargs)
        finally:
            self._parameters["in_proj_weight"] = weight


class LoRAQKVLinear(nn.Linear):
    """A frozen ``nn.Linear`` projecting to ``[q; k; v]`` (timm towers) with LoRA on its q and/or v
    rows (children ``mosa_lora_q`` / ``mosa_lora_v``; the instance's class is swapped in place).

    Its ``weight`` reads as ``W + [dq; 0; dv]``, so the attention sees the adapted projection
    whether it calls this module or reads its weight itself (EVA's ``F.linear(x, qkv.weight,
    bias)``); the state-dict key ``weight`` still holds the frozen ``W``.
    """

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:  # (3D, in)
        w = self._parameters["weight"]
        d = w.shape[0] // 3
        parts = [torch.zeros(d, w.shape[1], dtype=w.dtype, device=w.device)] * 3
        for i, name in ((0, "mosa_lora_q"), (2, "mosa_lora_v")):
            if name in self._modules:
                parts[i] = self._modules[name].delta().to(w.dtype)
        return w + torch.cat(parts, dim=0)
