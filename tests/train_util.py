"""The few-step training loop of the in-process tests: the trainer's step without the engine."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.sparse import Router


def train_steps(
    model: nn.Module, router: Router, opt: torch.optim.Optimizer, data: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """One step per ``(x, y)`` batch of ``data``: routed forward, cross-entropy, backward, ``opt.step()``."""
    for step, (x, y) in enumerate(data):
        router.begin_step(step)  # step i draws step i's experts
        with router.forward_pass():
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
