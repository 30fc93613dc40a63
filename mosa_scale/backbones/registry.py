"""Backbone registry: one builder per ``BackboneConfig.family``, selected by config only."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from mosa_scale.backbones.base import (
    Backbone,
    BackboneConfig,
    BuildArgs,
    finalize_backbone,
    resolve_dtype,
)
from mosa_scale.backbones.construct import ShardHooks

logger = logging.getLogger(__name__)

BuilderFn = Callable[[BackboneConfig, BuildArgs], Backbone]

_BUILDERS: dict[str, BuilderFn] = {}


def register_backbone(family: str) -> Callable[[BuilderFn], BuilderFn]:
    """Register ``fn`` as the builder of ``family``.

    Args:
        family: The ``BackboneConfig.family`` value the builder serves.

    Returns:
        A decorator that registers and returns the builder unchanged.

    Raises:
        ValueError: If ``family`` already has a builder.
    """

    def deco(fn: BuilderFn) -> BuilderFn:
        if family in _BUILDERS and _BUILDERS[family] is not fn:
            raise ValueError(f"backbone family {family!r} is already registered")
        _BUILDERS[family] = fn
        return fn

    return deco


def registered_families() -> list[str]:
    """Families that have a builder."""
    return sorted(_BUILDERS)


def build_backbone(
    cfg: BackboneConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    meta: bool = False,
    shard: ShardHooks | None = None,
) -> Backbone:
    """Build the frozen tower described by ``cfg``.

    The tower is constructed directly in its dtype (no full-precision copy) and pretrained
    weights are read tensor by tensor from a memory map.

    Args:
        cfg: The backbone config; ``cfg.family`` selects the builder.
        device: Where the weights are created (ignored when ``meta`` or ``shard``).
        dtype: dtype of the frozen weights; ``None`` uses ``cfg.precision``. An explicit dtype
            wins over ``cfg.precision``.
        meta: Build on the meta device: shapes only, nothing allocated (parameter counting,
            planning). Random init only.
        shard: Build partitioned across ranks (ZeRO-3; the engine's ``ZeroShard``): every
            module's weights are partitioned as it is built and checkpoint tensors are written
            straight into each rank's partition, so no rank holds the whole tower. The result
            (random or pretrained) equals the replicated build's.

    Returns:
        The frozen backbone: every parameter has ``requires_grad=False``.

    Raises:
        ValueError: Unknown family, unsupported dtype, or ``meta`` with ``pretrained``.
        FileNotFoundError: ``cfg.pretrained`` names a path that does not exist.
        RuntimeError: An OpenCLIP tag could not be fetched (e.g. offline).
    """
    builder = _BUILDERS.get(cfg.family)
    if builder is None:
        raise ValueError(f"family={cfg.family!r} has no registered builder; registered: {registered_families()}")
    dt = resolve_dtype(cfg, dtype)
    if meta and cfg.pretrained is not None:
        raise ValueError(
            "meta=True builds an empty skeleton and cannot load weights: "
            f"set pretrained=None (got {cfg.pretrained!r}) or meta=False"
        )
    if meta and shard is not None:
        raise ValueError("meta=True and shard: a meta skeleton holds nothing to partition; pass one of them")
    args = BuildArgs(device=torch.device("meta") if meta else torch.device(device), dtype=dt, meta=meta, shard=shard)
    return finalize_backbone(builder(cfg, args), dt, args.device)
