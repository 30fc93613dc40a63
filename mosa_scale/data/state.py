"""The resume state of a loader: a small dict of plain ints and strings.

It records the position in the epoch (batches consumed) and everything the sample order
depends on, so a resume under a different layout is refused instead of silently reading other
samples. The position is identical on every rank: the engine may store rank 0's copy.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["STATE_VERSION", "check_resume_state", "next_epoch", "make_state"]

STATE_VERSION = 1

# Fields that fix the sample order of an epoch; a resume must match them all.
_LAYOUT = ("seed", "world_size", "num_workers", "batch_size", "resampled", "train", "shards", "num_batches")


def make_state(
    *,
    epoch: int,
    batch: int,
    num_batches: int,
    seed: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    resampled: bool,
    train: bool,
    shards: str,
) -> dict[str, int | str]:
    """Build a resume state.

    Args:
        epoch: Epoch number.
        batch: Batches of this epoch already handed to the trainer.
        num_batches: Batches per rank in this epoch.
        seed: Run seed.
        world_size: Number of ranks.
        num_workers: Dataloader workers per rank.
        batch_size: Samples per batch.
        resampled: Resampled mode.
        train: Training (shuffled, augmented) or evaluation order.
        shards: Fingerprint of the shard list and sizes.

    Returns:
        The state dict.
    """
    return {
        "version": STATE_VERSION,
        "epoch": epoch,
        "batch": batch,
        "num_batches": num_batches,
        "seed": seed,
        "world_size": world_size,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "resampled": int(resampled),
        "train": int(train),
        "shards": shards,
    }


def check_resume_state(state: Mapping[str, int | str], expected: Mapping[str, int | str]) -> int:
    """Validate a saved state against the loader being built; return the batch to start at.

    Args:
        state: State saved by `StreamLoader.state_dict()`.
        expected: State of the new loader at batch 0 (from `make_state`).

    Returns:
        The number of batches to skip.

    Raises:
        ValueError: Wrong version, another epoch, or a layout that changes the sample order
            (all differences listed).
    """
    missing = [k for k in ("version", "epoch", "batch", *_LAYOUT) if k not in state]
    if missing:
        raise ValueError(f"data resume state lacks {missing}; it was not written by StreamLoader.state_dict()")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"data resume state version {state['version']} is not {STATE_VERSION}")
    if state["epoch"] != expected["epoch"]:
        raise ValueError(
            f"data resume state is for epoch {state['epoch']}, the loader is for "
            f"epoch {expected['epoch']}; use next_epoch(state) to pick the epoch"
        )
    diffs = [f"{k}: saved {state[k]!r}, now {expected[k]!r}" for k in _LAYOUT if state[k] != expected[k]]
    if diffs:
        raise ValueError(
            "cannot resume exactly, the sample order depends on settings that "
            "changed (" + "; ".join(diffs) + "); restore them, or restart the "
            "epoch without the resume state"
        )
    batch = int(state["batch"])
    if not 0 <= batch <= int(state["num_batches"]):
        raise ValueError(f"data resume state batch {batch} is outside 0..{state['num_batches']}")
    return batch


def next_epoch(state: Mapping[str, int | str] | None) -> tuple[int, Mapping[str, int | str] | None]:
    """Epoch to build the next loader for, and the state to resume it with.

    Args:
        state: Saved state, or None for a fresh run.

    Returns:
        (epoch, state or None): a finished epoch moves on to the next one from its start.
    """
    if state is None:
        return 0, None
    if int(state["batch"]) >= int(state["num_batches"]):
        return int(state["epoch"]) + 1, None
    return int(state["epoch"]), state
