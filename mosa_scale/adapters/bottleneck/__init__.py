"""Bottleneck adapter methods: ``parallel``, ``sequential`` and ``houlsby`` (dense or MoSA)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mosa_scale.adapters.bottleneck.layer import BottleneckAdapter
from mosa_scale.adapters.config import AdapterConfig
from mosa_scale.adapters.factory import InjectContext, projection, split_flags
from mosa_scale.adapters.registry import register_method


@dataclass(frozen=True)
class BottleneckMethod:
    """One bottleneck style: where it hooks in and its defaults (MOSA_SPEC section 1)."""

    name: str
    act: str
    layer_norm: bool
    default_scale: float
    default_dropout: float

    def build(self, dim: int, block: int, prefix: str, cfg: AdapterConfig, ctx: InjectContext) -> BottleneckAdapter:
        n = cfg.experts_for(block)
        split_down, split_up = split_flags(cfg, n)
        r = cfg.bottleneck
        common = dict(num_experts=n, cfg=cfg, ctx=ctx, bias=True)
        down = projection(dim, r, init="kaiming", split=split_down, name=f"{prefix}.down", **common)
        up = projection(r, dim, init="zeros", split=split_up, name=f"{prefix}.up", **common)
        scale = self.default_scale if cfg.scale is None else cfg.scale
        dropout = self.default_dropout if cfg.dropout is None else cfg.dropout
        return BottleneckAdapter(
            down, up, dim=dim, act=self.act, layer_norm=self.layer_norm, scale=scale, dropout=dropout
        )

    def inject_block(
        self, model: nn.Module, site, block: int, cfg: AdapterConfig, ctx: InjectContext
    ) -> dict[str, nn.Module]:
        blk = model.get_submodule(site.block)
        added: dict[str, nn.Module] = {}
        if self.name == "houlsby":
            for where, target in (("attn", site.attn), ("mlp", site.mlp)):
                adapter = self.build(ctx.width, block, f"{site.block}.mosa_adapter_{where}", cfg, ctx)
                blk.add_module(f"mosa_adapter_{where}", adapter)
                model.get_submodule(target).register_forward_hook(adapter.add_from_output)
                added[f"{site.block}.mosa_adapter_{where}"] = adapter
            return added
        adapter = self.build(ctx.width, block, f"{site.block}.mosa_adapter", cfg, ctx)
        blk.add_module("mosa_adapter", adapter)
        if self.name == "parallel":
            model.get_submodule(site.ln2).register_forward_pre_hook(adapter.stash_input)
            model.get_submodule(site.mlp).register_forward_hook(adapter.add_from_stash)
        else:
            model.get_submodule(site.mlp).register_forward_hook(adapter.add_from_output)
        added[f"{site.block}.mosa_adapter"] = adapter
        return added


PARALLEL = register_method(
    BottleneckMethod("parallel", act="gelu", layer_norm=True, default_scale=0.1, default_dropout=0.1)
)
SEQUENTIAL = register_method(
    BottleneckMethod("sequential", act="relu", layer_norm=True, default_scale=1.0, default_dropout=0.0)
)
HOULSBY = register_method(
    BottleneckMethod("houlsby", act="silu", layer_norm=False, default_scale=1.0, default_dropout=0.0)
)

__all__ = ["BottleneckAdapter", "BottleneckMethod", "HOULSBY", "PARALLEL", "SEQUENTIAL"]
