"""The pretrained tower of the transfer study: a small ViT trained from scratch in plain torch on
Fashion-MNIST classes 0-4, saved once in the study folder and reused by every run."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.eval import evaluate
from mosa_scale.study.tasks import Split

log = logging.getLogger(__name__)

TOWER = dict(
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=28,
    patch_size=7,
    num_channels=1,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
INFO = "pretrain.json"


def cosine(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def accuracy(model: nn.Module, data: Split, batch: int = 500) -> float:
    """Top-1 of ``model`` in eval mode (MoSA layers use merged weights there)."""
    model.eval()
    batches = ({"image": data.x[i : i + batch], "label": data.y[i : i + batch]} for i in range(0, len(data), batch))
    result = evaluate(model, batches, num_classes=int(data.y.max()) + 1)
    model.train()
    return result.correct / len(data)


class Pretrain(nn.Module):
    """``transformers.ViTModel`` (:data:`TOWER`) and a 5-way head on the mean patch token."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.vit = ViTModel(ViTConfig(**TOWER), add_pooling_layer=False)
        self.head = nn.Linear(TOWER["hidden_size"], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 5)
        h = self.vit(pixel_values=x).last_hidden_state  # (B, 1 + 16, D)
        return self.head(h[:, 1:].mean(1))  # mean of patch tokens, as the adapted backbone pools


def pretrain(
    train: Split, test: Split, out_dir: Path, *, epochs: int, batch: int = 128, seed: int = 0
) -> dict[str, Any]:
    """Trains :class:`Pretrain` (AdamW 1e-3, wd 0.05, 5% warm-up then cosine, horizontal flips) and
    saves the ViT with ``save_pretrained`` into ``out_dir``; returns what it measured."""
    torch.manual_seed(seed)
    model = Pretrain()
    steps = epochs * (len(train) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, max(1, steps // 20)))
    g = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train) - batch + 1, batch):
            idx = perm[i : i + batch]
            xb = train.x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)  # (B, 1, 28, 28)
            loss = F.cross_entropy(model(xb), train.y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
        log.info(
            "pretraining: epoch %d/%d done (%d steps, %.0f s, last loss %.3f)",
            epoch + 1,
            epochs,
            step,
            time.perf_counter() - t0,
            float(loss.detach()),
        )
    model.vit.save_pretrained(str(out_dir))
    return {
        "epochs": epochs,
        "steps": step,
        "batch": batch,
        "samples": len(train),
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "test_top1_classes_0-4": accuracy(model, test),
    }


def ensure_tower(directory: Path, train: Split, test: Split, *, epochs: int, seed: int = 0) -> dict[str, Any]:
    """The pretrained tower in ``directory``: reused when it is complete there, else trained and
    saved (into a temporary sibling first, so a killed pretraining leaves nothing half-written).

    Returns:
        The pretraining record (``pretrain.json`` in ``directory``).
    """
    info = directory / INFO
    if info.is_file():
        record = json.loads(info.read_text())
        log.info(
            "reusing the pretrained tower in %s (test top-1 on classes 0-4: %.2f%%)",
            directory,
            100 * record["test_top1_classes_0-4"],
        )
        return record
    log.info("pretraining the tower: %d epochs on %d images of Fashion-MNIST classes 0-4", epochs, len(train))
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record = pretrain(train, test, tmp, epochs=epochs, seed=seed)
    (tmp / INFO).write_text(json.dumps(record, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    log.info(
        "pretrained in %.0f s: test top-1 on classes 0-4 %.2f%%",
        record["seconds"],
        100 * record["test_top1_classes_0-4"],
    )
    return record
