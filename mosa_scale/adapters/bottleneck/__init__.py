"""Bottleneck adapter methods: ``parallel``, ``sequential`` and ``houlsby`` (dense or MoSA)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mosa_scale.adapters.bottleneck.config import BottleneckConfig
from mosa_scale.adapters.bottleneck.layer import AddAdapter, BottleneckAdapter, HandOff, TapInput
from mosa_scale.adapters.factory import InjectContext, projection, split_flags
from mosa_scale.adapters.registry import register_method
from mosa_scale.adapters.wrap import wrap


@dataclass(frozen=True)
class BottleneckMethod:
    """One bottleneck style: where it goes and its defaults (MOSA_SPEC section 1).

    Attributes:
        places: ``(adapter name on the block, BlockSites field of the sublayer it adds to)``.
        parallel: The adapter reads the residual stream before the pre-FFN norm (the input of
            ``site.ln2``) instead of the sublayer's output.
    """

    name: str
    act: str
    layer_norm: bool
    default_scale: float
    default_dropout: float
    places: tuple[tuple[str, str], ...] = (("mosa_adapter", "mlp"),)
    parallel: bool = False
    config_class: type[BottleneckConfig] = BottleneckConfig

    def build(self, dim: int, block: int, prefix: str, cfg: BottleneckConfig, ctx: InjectContext) -> BottleneckAdapter:
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
        self, model: nn.Module, site, block: int, cfg: BottleneckConfig, ctx: InjectContext
    ) -> dict[str, nn.Module]:
        blk = model.get_submodule(site.block)
        handoff = None
        if self.parallel:
            handoff = HandOff()
            wrap(model, site.ln2, lambda m: TapInput(m, handoff))
        added: dict[str, nn.Module] = {}
        for child, where in self.places:
            adapter = self.build(ctx.width, block, f"{site.block}.{child}", cfg, ctx)
            wrapper = wrap(model, getattr(site, where), lambda m, a=adapter: AddAdapter(m, a, handoff))
            added[f"{site.block}.{child}"] = wrapper.attach(blk, child, adapter)
        return added


PARALLEL = register_method(
    BottleneckMethod("parallel", act="gelu", layer_norm=True, default_scale=0.1, default_dropout=0.1, parallel=True)
)
SEQUENTIAL = register_method(
    BottleneckMethod("sequential", act="relu", layer_norm=True, default_scale=1.0, default_dropout=0.0)
)
HOULSBY = register_method(
    BottleneckMethod(
        "houlsby",
        act="silu",
        layer_norm=False,
        default_scale=1.0,
        default_dropout=0.0,
        places=(("mosa_adapter_attn", "attn"), ("mosa_adapter_mlp", "mlp")),
    )
)

__all__ = ["BottleneckAdapter", "BottleneckConfig", "BottleneckMethod", "HOULSBY", "PARALLEL", "SEQUENTIAL"]
