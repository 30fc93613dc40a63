"""Evaluate a merged adapter on webdataset shards in one process (CPU or GPU), without DeepSpeed.

The model is the run's classifier rebuilt with dense adapters (``num_experts=1``) and loaded with
the merged tensors, so no MoSA code runs (MOSA_SPEC section 5).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosa_scale.adapters import is_adapter_name
from mosa_scale.backbones import Backbone
from mosa_scale.ckpt.export import check_fits, load_merged
from mosa_scale.config.run import RunConfig
from mosa_scale.data import DataSpec, build_loader
from mosa_scale.model.assembly import build_model

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Top-1 overall and per class (``correct`` of ``samples``); ``logits``/``labels`` only when asked for."""

    top1: float
    samples: int
    per_class: dict[int, dict[str, float]]
    correct: int = 0
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "samples": self.samples,
            "per_class": {str(c): v for c, v in sorted(self.per_class.items())},
            **self.extra,
        }


def load_merged_classifier(
    adapter_dir: str | Path, *, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Backbone, RunConfig]:
    """The run's classifier with dense adapters holding the merged weights, in eval mode.

    A backbone trained from random init ("random" source, tests and smoke runs) is rebuilt from
    the config's seed exactly as the training run built it (``build_model``).

    Args:
        adapter_dir: A merged adapter directory.
        pretrained: Where the backbone weights are on this machine (default: the config's
            ``model.pretrained``).
        device: Where to put the model.

    Raises:
        ValueError: when the merged tensors do not fit the model the config builds.
    """
    state, manifest, cfg = load_merged(adapter_dir)
    model_cfg = cfg.model if pretrained is None else dataclasses.replace(cfg.model, pretrained=pretrained)
    dense = dataclasses.replace(cfg.adapter, num_experts=1, experts_per_block={}, mosa_blocks=None)
    cfg = dataclasses.replace(cfg, model=model_cfg, adapter=dense)
    num_classes = check_fits(adapter_dir, state, manifest, cfg)  # on the meta device, before building
    model, backbone, _ = build_model(cfg, None, num_classes=num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if is_adapter_name(k)]
    if missing or unexpected:
        raise ValueError(
            f"{adapter_dir}: the merged tensors do not fit the model its config builds: missing "
            f"{missing[:4]}, unexpected {unexpected[:4]}"
        )
    return model.to(device).eval(), backbone, cfg


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    num_classes: int,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    drain: bool = True,
    keep_logits: bool = False,
    probe: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
) -> EvalResult:
    """Top-1 and per-class accuracy of ``model`` over loader batches (slots with ``valid=False``
    are padding and are not counted); the one evaluation loop, of the trainer and of the eval tool.

    Args:
        model: The classifier, already in the mode to evaluate (eval: merged MoSA weights).
        batches: Loader batches (``image``, ``label``, optionally ``valid``).
        num_classes: Classes of the head.
        device: Where the images go.
        max_batches: Evaluate only the first batches.
        drain: After ``max_batches``, read the rest of ``batches`` without evaluating it (the
            loader's readers end cleanly and its skip counts cover the split); the trainer stops
            instead (every rank at the same batch, the rest of the split unread).
        keep_logits: Return the logits and labels too.
        probe: Called once, with the first batch's images and logits (on ``device``); the numbers
            it returns go into ``extra`` (the trainer's merged-vs-stochastic gap).
    """
    correct = torch.zeros(num_classes, dtype=torch.int64)
    total = torch.zeros(num_classes, dtype=torch.int64)
    all_logits, all_labels = [], []
    extra: dict[str, Any] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            if drain:
                continue
            break
        x = batch["image"].to(device)
        y = batch["label"]
        valid = batch["valid"] if "valid" in batch else y >= 0
        out = model(x)  # (B, C)
        if probe is not None and i == 0:
            extra.update(probe(x, out))
        logits = out.float().cpu()
        y, pred = y[valid], logits[valid].argmax(-1)
        total += torch.bincount(y, minlength=num_classes)[:num_classes]
        correct += torch.bincount(y[pred == y], minlength=num_classes)[:num_classes]
        if keep_logits:
            all_logits.append(logits[valid])
            all_labels.append(y)
    n = int(total.sum())
    per_class = {
        c: {"top1": float(correct[c]) / float(total[c]), "samples": int(total[c])}
        for c in range(num_classes)
        if total[c] > 0
    }
    return EvalResult(
        top1=float(correct.sum()) / max(n, 1),
        samples=n,
        per_class=per_class,
        correct=int(correct.sum()),
        logits=torch.cat(all_logits) if keep_logits and all_logits else None,
        labels=torch.cat(all_labels) if keep_logits and all_labels else None,
        extra=extra,
    )


def evaluate_adapter(
    adapter_dir: str | Path,
    data: str,
    *,
    split: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    pretrained: str | None = None,
    max_batches: int | None = None,
    keep_logits: bool = False,
) -> EvalResult:
    """Evaluates a merged adapter on webdataset shards (one process, eval transform).

    Args:
        adapter_dir: A merged adapter directory.
        data: Shard spec: a folder (with index.json), a brace pattern, ``pipe:`` ...
        split: Split of a folder with index.json (e.g. ``val``).
        batch_size: Samples per forward.
        device: ``cpu`` or ``cuda[:i]``.
        workers: Reader processes (0 reads in this process).
        pretrained: Backbone weights on this machine (default: the config's).
        max_batches: Evaluate only the first batches.
        keep_logits: Return the logits and labels too.

    Raises:
        ValueError: bad data arguments or an adapter that does not fit its config.
    """
    model, backbone, cfg = load_merged_classifier(adapter_dir, pretrained=pretrained, device=device)
    img = backbone.image
    loader = build_loader(
        DataSpec(shards=data, split=split),
        image_size=cfg.data.image_size or img.size,
        mean=img.mean,
        std=img.std,
        train=False,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        num_workers=workers,
        seed=cfg.train.seed,
        epoch=0,
        num_classes=int(model.mosa_head.weight.shape[0]),
    )
    result = evaluate(
        model,
        loader,
        num_classes=int(model.mosa_head.weight.shape[0]),
        device=device,
        max_batches=max_batches,
        keep_logits=keep_logits,
    )
    result.extra = {"adapter": str(adapter_dir), "data": data, "split": split, "skipped": loader.skipped}
    log.info("top1 %.4f over %d samples", result.top1, result.samples)
    return result
