"""Resume checkpoints: DeepSpeed's sharded save without the frozen backbone, a ``latest`` pointer
that is replaced atomically only after every rank has finished writing, per-rank RNG and data state."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mosa_scale.engine.deepspeed_engine import barrier

log = logging.getLogger(__name__)
LATEST = "latest"


def _tag(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, *, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep: int = 2) -> Path:
    """Writes checkpoint ``step`` and then points ``latest`` at it; keeps the newest ``keep``."""
    tag = _tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rank_state, ckpt_dir / tag / f"rank{rank:05d}_state.pt")
    barrier()  # every rank's shards are on disk before `latest` moves
    if rank == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_dir / tag


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


def load(engine: Any, ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Loads the checkpoint ``latest`` points at; None when there is none.

    Returns:
        (client state saved by rank 0, this rank's RNG and data state).

    Raises:
        FileNotFoundError: when ``latest`` names a checkpoint whose files are missing.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = ckpt_dir / tag / f"rank{rank:05d}_state.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no {rank_file.name}: it was written by fewer "
                                "ranks than this run has, or is damaged")
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_state = torch.load(rank_file, weights_only=False)  # our own file: RNG states are numpy tuples
    return client, rank_state
