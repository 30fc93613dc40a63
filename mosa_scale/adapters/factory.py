"""Building blocks shared by adapter methods: projections that are dense or MoSA-split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mosa_scale.adapters.config import AdapterConfig
from mosa_scale.seeding import derive_seed
from mosa_scale.sparse.linear import SparseExpertLinear
from mosa_scale.sparse.routing import Router

ADAPTER_MARK = "mosa_"


def is_adapter_name(name: str) -> bool:
    """The single contract for what is trainable, saved, consolidated and merged: a qualified
    parameter or buffer name with a component starting with ``mosa_``."""
    return any(part.startswith(ADAPTER_MARK) for part in name.split("."))


@dataclass
class InjectContext:
    """What injection needs besides the config: the run seed, the router, the feature width, the dtype."""

    seed: int  # the run seed (train.seed): with a parameter's name it seeds its init and MoSA partition
    router: Router | None
    width: int
    dtype: torch.dtype = torch.float32
    added: dict[str, nn.Module] = field(default_factory=dict)


def kaiming_weight(out_f: int, in_f: int, *, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init, kaiming-uniform(a=sqrt(5)), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt 5) gives U(-1/sqrt(in), 1/sqrt(in))
    return (torch.rand((out_f, in_f), generator=generator) * 2 - 1) * bound


def projection(
    in_f: int,
    out_f: int,
    *,
    bias: bool,
    init: str,
    split: bool,
    num_experts: int,
    name: str,
    cfg: AdapterConfig,
    ctx: InjectContext,
) -> nn.Module:
    """A dense ``nn.Linear`` or, when ``split`` and N >= 2, a :class:`SparseExpertLinear`.

    The init is drawn from a generator seeded by (seed, name) so a MoSA and a dense adapter of the
    same config start from the same W0, on every rank.

    Args:
        init: ``kaiming`` (Down / LoRA A) or ``zeros`` (Up / LoRA B).
    """
    gen = torch.Generator().manual_seed(derive_seed("init", ctx.seed, name))
    weight = kaiming_weight(out_f, in_f, generator=gen) if init == "kaiming" else torch.zeros(out_f, in_f)
    if split and num_experts >= 2:
        if ctx.router is None:
            raise ValueError("a MoSA adapter (num_experts >= 2) needs a Router")
        return SparseExpertLinear(
            weight,
            bias=bias,
            num_experts=num_experts,
            name=name,
            seed=ctx.seed,
            mode=cfg.mode,
            split_bias=cfg.split_bias,
            router=ctx.router,
        )
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.zero_()
    return layer


def split_flags(cfg: AdapterConfig, num_experts: int) -> tuple[bool, bool]:
    """(split Down/A, split Up/B) for the config's ``share`` and this block's N."""
    if num_experts < 2:
        return False, False
    return cfg.share in ("none", "up"), cfg.share in ("none", "down")


class CastIO(nn.Module):
    """Base for adapters on a frozen tower of another dtype: fp32 inside, the tower's dtype out."""

    def _param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().__call__(x.to(self._param_dtype()), *args, **kwargs)
        return out.to(x.dtype)
