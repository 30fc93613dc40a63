"""LoRA and MoSA-LoRA (MOSA_SPEC section 1): ``W x + scale * B A x`` on attention q and v.

Each frozen projection is stood in for by a wrapper (:class:`~mosa_scale.adapters.wrap.Wrapper`)
that keeps its state-dict keys and adds the LoRA factors as a ``mosa_lora`` child (``mosa_lora_q``
/ ``mosa_lora_v`` on a fused projection).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.adapters.factory import CastIO
from mosa_scale.adapters.wrap import Wrapper
from mosa_scale.sparse.linear import SparseExpertLinear

SLOTS = ((0, "mosa_lora_q"), (2, "mosa_lora_v"))  # row block of [q; k; v] -> child name


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


def _fused_delta(module: nn.Module, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """``[dq; 0; dv]`` ``(3 rows, cols)`` from the wrapper's ``mosa_lora_q`` / ``mosa_lora_v``."""
    parts = [torch.zeros(rows, cols, dtype=like.dtype, device=like.device)] * 3
    for i, name in SLOTS:
        if name in module._modules:
            parts[i] = module._modules[name].delta().to(like.dtype)
    return torch.cat(parts, dim=0)


class LoRALinear(Wrapper):
    """A frozen ``nn.Linear`` plus a LoRA term (child ``mosa_lora``)."""

    def __init__(self, base: nn.Linear, lora: LoRA) -> None:
        super().__init__(base)
        self.mosa_lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        return self.base_layer(x) + self.mosa_lora(x)


class LoRAQKVLinear(Wrapper):
    """A frozen ``nn.Linear`` projecting to ``[q; k; v]`` (timm towers) with LoRA on its q and/or v
    rows (children ``mosa_lora_q`` / ``mosa_lora_v``).

    Its ``weight`` reads as ``W + [dq; 0; dv]``, so the attention sees the adapted projection
    whether it calls this module or reads its weight itself (EVA's ``F.linear(x, qkv.weight,
    bias)``); the state-dict key ``weight`` still holds the frozen ``W``.
    """

    @property
    def weight(self) -> torch.Tensor:  # (3D, in)
        w = self._parameters["weight"]
        return w + _fused_delta(self, w.shape[0] // 3, w.shape[1], w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, 3D)
        return F.linear(x, self.weight, self._parameters["bias"])


class LoRAMultiheadAttention(Wrapper):
    """``nn.MultiheadAttention`` (fused in-projection, as in OpenCLIP) with LoRA on q and/or v.

    The effective in-projection ``W + [dq; 0; dv]`` is put in place of the base's
    ``in_proj_weight`` for the duration of its forward (restored in ``finally``), so the base's
    code path (including its inference fast path) runs unchanged.
    """

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        base = self.base_layer
        weight = base._parameters["in_proj_weight"]
        d = self.embed_dim
        effective = weight + _fused_delta(self, d, d, weight)  # (3D, D)
        base._parameters["in_proj_weight"] = effective  # type: ignore[assignment]
        try:
            return base(query, *args, **kwargs)
        finally:
            base._parameters["in_proj_weight"] = weight
