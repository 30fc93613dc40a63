"""Pure, seeded planning of one epoch: which reader gets which shards, how many batches each
reader yields, and where each reader starts after a resume.

A *reader* is one (rank, dataloader worker) pair. Everything here is a pure function of its
arguments, so every rank computes the same plan without talking to the others.

This replaces webdataset's `split_by_node` / `split_by_worker` (+ `with_epoch`): those hand each
reader every n-th shard but know nothing of sample counts, so with uneven shards the ranks end
after different numbers of batches (or an epoch is cut and repeated), and a resume cannot know
where each worker stood. The plan reads the counts of the index, pads every rank to the same
number of batches, and gives each worker its resume position.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from mosa_scale.seeding import derive_seed

__all__ = [
    "EpochPlan",
    "plan_epoch",
    "resume_point",
    "round_robin",
    "shard_order",
]


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Order of the shards for one epoch, the same on every rank.

    Args:
        num_shards: Number of shards.
        seed: Run seed.
        epoch: Epoch number.
        shuffle: Shuffle (training) or keep the given order (evaluation).

    Returns:
        A permutation of `range(num_shards)`.
    """
    order = list(range(num_shards))
    if shuffle:
        random.Random(derive_seed("shards", seed, epoch, stream="data")).shuffle(order)
    return order


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch.

    Attributes:
        num_batches: Batches this rank yields; the same on every rank.
        worker_batches: Batches yielded by each logical worker of this rank (sums to
            `num_batches`).
        worker_shards: Shard indices read by each logical worker, in reading order (empty
            tuples in resampled mode, where workers draw shards themselves).
        worker_samples: Samples the index promises to each worker (None in resampled mode).
    """

    num_batches: int
    worker_batches: tuple[int, ...]
    worker_shards: tuple[tuple[int, ...], ...]
    worker_samples: tuple[int, ...] | None


def _reader_shards(order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, ...]:
    # Split by node, then by worker: reader (r, w) takes every (world*W)-th shard.
    return tuple(order[rank::world_size][worker::num_workers])


def _water_fill(counts: list[int], extra: int) -> list[int]:
    # Give padding batches to the workers with the fewest batches first (ties: lowest id).
    counts = list(counts)
    for _ in range(extra):
        counts[counts.index(min(counts))] += 1
    return counts


def plan_epoch(
    shard_sizes: Sequence[int] | None,
    *,
    num_shards: int,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    resampled: bool,
    samples_per_epoch: int | None,
) -> EpochPlan:
    """Plan one epoch for one rank.

    Non-resampled: shards are ordered by `shard_order`, split over ranks then workers; each
    worker yields ceil(samples / batch_size) batches (the last one padded); ranks with fewer
    batches than the busiest rank get whole padding batches, so every rank yields the same
    number of batches and no rank waits on a collective that others never reach.

    Resampled: each rank yields ceil(samples_per_epoch / (world_size * batch_size)) batches,
    spread evenly over its workers; each worker draws shards with replacement.

    Args:
        shard_sizes: Samples in each shard (required unless resampled).
        num_shards: Number of shards.
        rank: This rank.
        world_size: Number of ranks.
        num_workers: Dataloader workers per rank (0 counts as one reader in-process).
        batch_size: Samples per batch.
        seed: Run seed.
        epoch: Epoch number.
        shuffle: Shuffle shard order (training).
        resampled: Draw shards with replacement.
        samples_per_epoch: Samples per epoch over all ranks (resampled mode).

    Returns:
        The plan of this rank.

    Raises:
        ValueError: Too few shards for world_size x workers readers, or missing sizes.
    """
    readers = max(1, num_workers)
    if resampled:
        if not samples_per_epoch or samples_per_epoch <= 0:
            raise ValueError(
                "resampled mode needs samples_per_epoch > 0 (set it in the data "
                "spec, or provide an index.json with sample counts)"
            )
        total = math.ceil(samples_per_epoch / (world_size * batch_size))
        per = tuple(total // readers + (1 if w < total % readers else 0) for w in range(readers))
        return EpochPlan(total, per, tuple(() for _ in range(readers)), None)
    if shard_sizes is None:
        raise ValueError("non-resampled mode needs the sample count of every shard")
    if num_shards < world_size * readers:
        raise ValueError(
            f"{num_shards} shard(s) cannot feed {world_size} rank(s) x {readers} worker(s) = "
            f"{world_size * readers} readers without resampling: write more, smaller shards "
            f"(tools/make_shards.py --samples-per-shard), use fewer dataloader workers, or set "
            f"resampled=True"
        )
    order = shard_order(num_shards, seed=seed, epoch=epoch, shuffle=shuffle)
    rank_counts: list[list[int]] = []
    mine: tuple[tuple[int, ...], ...] = ()
    samples: tuple[int, ...] = ()
    for r in range(world_size):
        shards = tuple(_reader_shards(order, r, world_size, w, readers) for w in range(readers))
        sizes = tuple(sum(shard_sizes[i] for i in s) for s in shards)
        rank_counts.append([math.ceil(n / batch_size) for n in sizes])
        if r == rank:
            mine, samples = shards, sizes
    total = max(sum(c) for c in rank_counts)
    per = _water_fill(rank_counts[rank], total - sum(rank_counts[rank]))
    return EpochPlan(total, tuple(per), mine, samples)


def round_robin(counts: Sequence[int], start: int = 0) -> list[int]:
    """Worker id of each batch, in the order a `DataLoader` (in_order=True) delivers them.

    The loader asks workers in turn 0, 1, ..., W-1, 0, ...; a worker that has run out is
    skipped. `start` rotates the first worker asked.

    Args:
        counts: Batches each worker yields.
        start: Worker asked first.

    Returns:
        A list of length sum(counts) of worker ids.
    """
    left = list(counts)
    order: list[int] = []
    w = start % max(1, len(left))
    while any(left):
        if left[w]:
            order.append(w)
            left[w] -= 1
        w = (w + 1) % len(left)
    return order


def resume_point(counts: Sequence[int], start_batch: int) -> tuple[tuple[int, ...], int]:
    """Where each worker resumes after `start_batch` batches of the round-robin were consumed.

    Args:
        counts: Batches each worker yields in the whole epoch.
        start_batch: Batches already consumed (0 <= start_batch <= sum(counts)).

    Returns:
        (batches each worker must skip, worker that delivers the next batch). Rotating the
        dataloader so that this worker is asked first reproduces the uninterrupted order.

    Raises:
        ValueError: If start_batch is out of range.
    """
    total = sum(counts)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch={start_batch} is outside the epoch's 0..{total} batches")
    order = round_robin(counts)
    skip = [0] * len(counts)
    for w in order[:start_batch]:
        skip[w] += 1
    return tuple(skip), (order[start_batch] if start_batch < total else 0)
