"""Assembles backbone + adapters + head into the trained classifier."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mosa_scale.adapters import InjectionReport, inject_adapters
from mosa_scale.backbones import Backbone, build_backbone, build_head, build_openclip_zeroshot
from mosa_scale.backbones.base import stream_width
from mosa_scale.backbones.construct import ShardHooks
from mosa_scale.config.run import RunConfig
from mosa_scale.sparse import Router

log = logging.getLogger(__name__)

# state-dict name prefixes of the classifier's two parts: adapter (and MoSA layer) names are
# relative to the tower, the head's tensors are ``mosa_head.weight`` / ``mosa_head.bias``
TOWER_PREFIX, HEAD_PREFIX = "tower.", "mosa_head."


class AdaptedClassifier(nn.Module):
    """The frozen tower (with adapters inside it) and the trainable head ``mosa_head``."""

    def __init__(self, tower: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.mosa_head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C)
        features = self.tower(pixels)  # (B, D)
        head_dtype = next(self.mosa_head.parameters()).dtype  # bf16 when DeepSpeed casts the module
        return self.mosa_head(features.to(head_dtype)).float()


def build_model(
    cfg: RunConfig, router: Router | None, *, num_classes: int, meta: bool = False, shard: ShardHooks | None = None
) -> tuple[AdaptedClassifier, Backbone, InjectionReport]:
    """Builds the frozen backbone, injects the configured adapters and adds the head.

    Everything random here is a function of the config: a random-init tower is drawn under
    ``torch.manual_seed(train.seed)`` (the caller's RNG state is left as it was), so every rank,
    a resumed run and a later evaluation rebuild the same tower. With ``shard`` (ZeRO-3) the
    tower is partitioned as it is built and equals the replicated build; adapters and head are
    built whole (DeepSpeed partitions them when the engine starts).
    """
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        if cfg.head.kind == "zeroshot":
            backbone, head = build_openclip_zeroshot(cfg.model, list(cfg.head.class_names or ()))
        else:
            backbone = build_backbone(cfg.model, meta=meta, shard=shard)
            gen = torch.Generator().manual_seed(cfg.train.seed)
            head = build_head("linear", backbone.width, num_classes, generator=gen)
    report = inject_adapters(
        backbone.model, backbone.sites, cfg.adapter, seed=cfg.train.seed, router=router, width=_stream_width(backbone)
    )
    return AdaptedClassifier(backbone.model, head), backbone, report


def _stream_width(backbone: Backbone) -> int:
    """Width of the residual stream (the pre-FFN norm's size), which may differ from the
    pooled feature width of a projected tower."""
    return stream_width(backbone.model, backbone.sites[0])
