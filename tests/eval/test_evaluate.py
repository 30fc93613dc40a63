"""The one evaluation loop (the trainer's and the eval tool's): counts, padding, the batch limit, the probe."""

from __future__ import annotations

import torch
from torch import nn

from mosa_scale.eval import evaluate


class Pick(nn.Module):
    """Predicts the class written in pixel [0, 0, 0] of each image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3)
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()


def batch(preds: list[int], labels: list[int], valid: list[bool]) -> dict[str, torch.Tensor]:
    image = torch.zeros(len(preds), 3, 2, 2)
    image[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.float32)
    return {"image": image, "label": torch.tensor(labels), "valid": torch.tensor(valid)}


BATCHES = [
    batch([0, 1, 2, 0], [0, 1, 1, -100], [True, True, True, False]),  # 2 of 3 right, one padding slot
    batch([2, 2], [2, 0], [True, True]),  # 1 of 2 right
    batch([1], [1], [True]),
]


def test_counts_per_class_and_skips_padding():
    r = evaluate(Pick(), BATCHES, num_classes=3, keep_logits=True)
    assert (r.correct, r.samples) == (4, 6) and r.top1 == 4 / 6
    assert r.per_class == {
        0: {"top1": 0.5, "samples": 2},
        1: {"top1": 2 / 3, "samples": 3},
        2: {"top1": 1.0, "samples": 1},
    }
    assert r.logits.shape == (6, 3) and r.labels.tolist() == [0, 1, 1, 2, 0, 1]


def test_the_batch_limit_drains_or_stops_and_the_probe_sees_the_first_batch():
    read: list[int] = []

    def source():
        for i, b in enumerate(BATCHES):
            read.append(i)
            yield b

    seen = []

    def probe(x: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
        seen.append(x.shape[0])
        return {"first": float(logits.sum())}

    drained = evaluate(Pick(), source(), num_classes=3, max_batches=1, probe=probe)
    assert (drained.correct, drained.samples) == (2, 3) and read == [0, 1, 2]  # the rest read, not counted
    assert seen == [4] and drained.extra == {"first": 4.0}
    read.clear()
    stopped = evaluate(Pick(), source(), num_classes=3, max_batches=1, drain=False)
    assert (stopped.correct, stopped.samples) == (2, 3) and read == [0, 1] and stopped.extra == {}  # batch 2 unread
