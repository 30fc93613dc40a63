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


class LoRAFusedQKV(nn.Module):
    """Mixin for an attention module whose child ``nn.Linear`` (``mosa_qkv_name``) projects to
    ``[q; k; v]`` (timm towers): LoRA on its q and/or v rows.

    During the attention's forward the child's weight is replaced by ``W + [dq; 0; dv]``, so the
    library's own code runs unchanged, whether it calls the child or reads its weight (EVA's
    ``F.linear(x, self.qkv.weight, ...)``). ``_z3_leaf`` tells DeepSpeed ZeRO-3 to gather the
    attention's whole subtree (the child's weight and the LoRA factors) around its forward.
    """

    mosa_qkv_name: str
    _z3_leaf = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        qkv = getattr(self, self.mosa_qkv_name)
        weight = qkv.weight
        d = weight.shape[0] // 3
        parts = [torch.zeros(d, weight.shape[1], dtype=weight.dtype, device=weight.device)] * 3
        for i, name in ((0, "mosa_lora_q"), (2, "mosa_lora_v")):
            if hasattr(self, name):
                parts[i] = getattr(self, name).delta().to(weight.dtype)
        qkv._parameters["weight"] = weight + torch.cat(parts, dim=0)  # type: ignore[assignment]  # (3D, in)
        try:
            return super().forward(*args, **kwargs)
        finally:
            qkv._parameters["weight"] = weight


_FUSED_CLASSES: dict[type, type] = {}


def lora_fused_qkv_class(cls: type) -> type:
    """The attention class ``cls`` with :class:`LoRAFusedQKV` mixed in (one per class)."""
    if issubclass(cls, LoRAFusedQKV):
        return cls
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAFusedQKV, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]
