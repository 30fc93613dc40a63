"""LoRA / MoSA-LoRA on attention q and v (``method: lora``)."""

from __future__ import annotations

from torch import nn

from mosa_scale.adapters.factory import InjectContext, projection, split_flags
from mosa_scale.adapters.lora.config import LoRAConfig
from mosa_scale.adapters.lora.layer import LoRA, LoRALinear, LoRAMultiheadAttention, LoRAQKVLinear, current_weight
from mosa_scale.adapters.registry import register_method
from mosa_scale.adapters.wrap import wrap


class LoRAMethod:
    """LoRA rank r = ``bottleneck``; A is the Down projection, B the Up projection for ``share``."""

    name = "lora"
    config_class = LoRAConfig

    def build(self, in_f: int, out_f: int, block: int, prefix: str, cfg: LoRAConfig, ctx: InjectContext) -> LoRA:
        n = cfg.experts_for(block)
        split_a, split_b = split_flags(cfg, n)
        common = dict(num_experts=n, cfg=cfg, ctx=ctx, bias=False)
        a = projection(in_f, cfg.bottleneck, init="kaiming", split=split_a, name=f"{prefix}.a", **common)
        b = projection(cfg.bottleneck, out_f, init="zeros", split=split_b, name=f"{prefix}.b", **common)
        return LoRA(
            a, b, scale=1.0 if cfg.scale is None else cfg.scale, dropout=0.0 if cfg.dropout is None else cfg.dropout
        )

    def inject_block(
        self, model: nn.Module, site, block: int, cfg: LoRAConfig, ctx: InjectContext
    ) -> dict[str, nn.Module]:
        if site.qkv_fused is not None:
            mha = model.get_submodule(site.qkv_fused)
            if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
                raise TypeError(
                    f"{site.qkv_fused}: LoRA on a fused in-projection needs nn.MultiheadAttention "
                    f"with one in_proj_weight, got {type(mha).__name__}"
                )
            return self._fused(
                model, site.qkv_fused, LoRAMultiheadAttention, mha.embed_dim, mha.embed_dim, block, cfg, ctx
            )
        if site.qkv_linear is not None:
            linear = model.get_submodule(site.qkv_linear)
            if type(linear) is not nn.Linear or linear.out_features % 3:
                raise TypeError(
                    f"{site.qkv_linear}: LoRA on a fused qkv projection needs an nn.Linear with 3 x d "
                    f"outputs, got {type(linear).__name__}"
                )
            d = linear.out_features // 3
            return self._fused(model, site.qkv_linear, LoRAQKVLinear, linear.in_features, d, block, cfg, ctx)
        added: dict[str, nn.Module] = {}
        for t in cfg.lora_targets:
            path = getattr(site, t)
            if path is None:
                raise ValueError(f"block {block}: the backbone names no {t!r} projection for LoRA")
            linear = model.get_submodule(path)
            if type(linear) is not nn.Linear:
                raise TypeError(f"{path}: LoRA wraps nn.Linear, got {type(linear).__name__}")
            lora = self.build(linear.in_features, linear.out_features, block, f"{path}.mosa_lora", cfg, ctx)
            wrap(model, path, lambda m, lora=lora: LoRALinear(m, lora))
            added[f"{path}.mosa_lora"] = lora
        return added

    def _fused(
        self, model: nn.Module, path: str, cls: type, in_f: int, out_f: int, block: int, cfg: LoRAConfig, ctx
    ) -> dict[str, nn.Module]:
        """LoRA on the q and/or v rows of one fused projection (children ``mosa_lora_q/v``)."""
        wrapper = wrap(model, path, cls)
        added: dict[str, nn.Module] = {}
        for t in cfg.lora_targets:
            lora = self.build(in_f, out_f, block, f"{path}.mosa_lora_{t}", cfg, ctx)
            wrapper.add_module(f"mosa_lora_{t}", lora)
            added[f"{path}.mosa_lora_{t}"] = lora
        return added


LORA = register_method(LoRAMethod())

__all__ = [
    "LORA",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "LoRAMethod",
    "LoRAMultiheadAttention",
    "LoRAQKVLinear",
    "current_weight",
]
