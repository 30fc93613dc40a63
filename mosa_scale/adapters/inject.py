"""Adapter injection into a frozen tower by wrapping its modules (undone by
:func:`~mosa_scale.adapters.wrap.remove_adapters`), with a report of what was added."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mosa_scale.adapters.config import AdapterConfig
from mosa_scale.adapters.factory import InjectContext, is_adapter_name
from mosa_scale.adapters.registry import get_method
from mosa_scale.sparse.linear import SparseExpertLinear
from mosa_scale.sparse.routing import Router

log = logging.getLogger(__name__)


@dataclass
class InjectionReport:
    """What injection added: one row per adapter module."""

    method: str
    rows: list[dict] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r["params"] for r in self.rows)

    def format(self) -> str:
        lines = [f"adapter method {self.method}: {len(self.rows)} modules, {self.trainable:,} trainable values"]
        for r in self.rows:
            split = ", ".join(f"{n} N={k}" for n, k in r["split"]) or "dense"
            lines.append(f"  block {r['block']:>3}  {r['module']:<60} {r['params']:>10,}  {split}")
        return "\n".join(lines)


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters selected by the adapter-name contract (:func:`is_adapter_name`)."""
    return [(n, p) for n, p in model.named_parameters() if is_adapter_name(n)]


def inject_adapters(
    model: nn.Module,
    sites: Sequence,
    cfg: AdapterConfig,
    *,
    seed: int,
    router: Router | None,
    width: int,
    dtype: torch.dtype = torch.float32,
) -> InjectionReport:
    """Freezes ``model`` and adds the configured adapters to its blocks.

    Args:
        model: The frozen tower (module names in ``sites`` are relative to it).
        sites: One :class:`~mosa_scale.backbones.base.BlockSites` per block, in depth order.
        cfg: Adapter configuration.
        seed: The run seed (``train.seed``); with each parameter's qualified name it seeds the
            adapter init and the MoSA partition.
        router: Shared router for MoSA layers (required when any block has N >= 2).
        width: Feature width of the residual stream.
        dtype: Dtype of the adapter parameters (fp32 even on a bf16 tower).

    Raises:
        ValueError: when ``cfg.blocks`` / ``cfg.mosa_blocks`` name blocks the tower does not have.
    """
    for name in ("blocks", "mosa_blocks"):
        wanted = getattr(cfg, name) or ()
        bad = [i for i in wanted if i >= len(sites)]
        if bad:
            raise ValueError(f"adapter.{name}: blocks {bad} do not exist; the backbone has {len(sites)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    method = get_method(cfg.method)
    ctx = InjectContext(seed=seed, router=router, width=width, dtype=dtype)
    report = InjectionReport(method=cfg.method)
    for block, site in enumerate(sites):
        if not cfg.carries_adapter(block):
            continue
        for name, module in method.inject_block(model, site, block, cfg, ctx).items():
            module.to(dtype)
            for p in module.parameters():
                p.requires_grad_(True)
            split = [(n, m.num_experts) for n, m in module.named_modules() if isinstance(m, SparseExpertLinear)]
            report.rows.append(
                {"block": block, "module": name, "params": sum(p.numel() for p in module.parameters()), "split": split}
            )
    log.info("%s", report.format())
    return report
