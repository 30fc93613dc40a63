"""The webdataset input pipeline: one loader per (rank, epoch) with equal batch counts on every
rank, counted skips of bad data, and exact resume.

Data flow of one reader (rank r, logical worker w); [wds] marks webdataset's stages, [tv]
torchvision's:

    plan_epoch -> shards of (r, w)            (resampled: ResampledShards draws [wds])
      -> iter_shard: gopen + tar_file_iterator + group_by_keys [wds], losses counted
      -> shuffle [wds] (train) -> skip start positions (no decoding)
      -> decode [wds imagehandler] + RandomResizedCrop.get_params, resized_crop, hflip [tv]
      -> batches of fixed size, padded with invalid slots, normalize [tv]
      -> DataLoader -> StreamLoader

Every random choice (shard order, buffer, crops, flips, resampled draws) is seeded from
(seed, epoch, rank, worker, stream position), so the batches after a resume at batch s are the
batches s, s+1, ... of the uninterrupted epoch.

What stays our own, and why: the resume skip reads the raw stream of the epoch again through
the same seeded buffer and drops `skip x batch_size` samples undecoded, because a webdataset
pipeline has no position to save and restore. Batches are collated here, not by webdataset's
`batched`, because every rank must yield exactly `num_batches` full-size batches (a short or
missing batch on one rank hangs the others in the next collective), with invalid slots for
padding and corrupt samples and the losses counted per batch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from mosa_scale.data.plan import EpochPlan, plan_epoch, resume_point, round_robin
from mosa_scale.data.reader import SkipCounts, resampled_samples, sequential_samples
from mosa_scale.data.spec import DataSpec, ShardSet, resolve_shards
from mosa_scale.data.state import check_resume_state, make_state
from mosa_scale.data.transforms import (
    CorruptSample,
    ImageTransform,
    decode_image,
    parse_label,
)
from mosa_scale.seeding import derive_seed

__all__ = ["IGNORE_INDEX", "StreamLoader", "build_loader"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of invalid slots; torch's cross_entropy ignores it by default

Batch = dict[str, Any]


class _EpochStream(IterableDataset):
    """Batches of one rank for one epoch; each dataloader worker plays one logical worker."""

    def __init__(
        self,
        shards: ShardSet,
        plan: EpochPlan,
        *,
        skip: Sequence[int],
        first_worker: int,
        transform: ImageTransform,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int,
        resampled: bool,
        buffer: int,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.plan, self.skip = shards, plan, tuple(skip)
        self.first_worker, self.transform = first_worker, transform
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.seed, self.epoch, self.rank = batch_size, seed, epoch, rank
        self.resampled, self.buffer = resampled, buffer
        self.num_classes = num_classes

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = len(self.plan.worker_batches)
        if count != readers:
            raise RuntimeError(
                f"planned for {readers} reader(s) per rank but run by {count} "
                f"dataloader worker(s); iterate the StreamLoader, not its dataset"
            )
        # Rotation: the DataLoader asks physical worker 0 first, which must be the logical
        # worker that delivers the next batch of the uninterrupted epoch.
        return self._batches((self.first_worker + physical) % readers)

    def _raw(self, worker: int, counts: SkipCounts) -> Iterator[dict[str, object]]:
        urls, sizes = self.shards.urls, self.shards.sizes
        if self.resampled:
            seed = derive_seed("resample", self.seed, self.epoch, self.rank, worker, stream="data")
            return resampled_samples(urls, sizes, seed, counts)
        mine = self.plan.worker_shards[worker]
        assert sizes is not None, "non-resampled plans need shard sizes"
        return sequential_samples([urls[i] for i in mine], [sizes[i] for i in mine], counts)

    def _batches(self, worker: int) -> Iterator[Batch]:
        counts = SkipCounts()
        stream = self._raw(worker, counts)
        if self.buffer > 1:
            rng = random.Random(derive_seed("buffer", self.seed, self.epoch, self.rank, worker, stream="data"))
            # webdataset's buffer, filled before its first pick and drawing from a seeded rng
            stream = shuffle(self.buffer, initial=self.buffer, rng=rng)(stream)
        size, total, skip = self.batch_size, self.plan.worker_batches[worker], self.skip[worker]
        for _ in islice(stream, skip * size):  # resume: read but do not decode
            pass
        counts.pop()  # losses met before the resume point were reported before the restart
        for index in range(skip, total):
            items = list(islice(stream, size))
            if index == total - 1 and not self.resampled:
                for _ in stream:  # reach the end of the last shard so its losses are counted
                    counts.extra += 1
            yield self._collate(items, worker, index, counts.pop())

    def _collate(self, items: list[dict[str, object]], worker: int, index: int, skipped: dict[str, int]) -> Batch:
        size, side = self.batch_size, self.transform.size
        images = torch.zeros(size, 3, side, side, dtype=torch.uint8)  # (B, 3, H, W)
        labels = torch.full((size,), IGNORE_INDEX, dtype=torch.int64)  # (B,)
        valid = torch.zeros(size, dtype=torch.bool)  # (B,)
        keys = [""] * size
        for j, sample in enumerate(items):
            keys[j] = str(sample["__key__"])
            try:
                label = parse_label(sample)
                if self.num_classes is not None and not 0 <= label < self.num_classes:
                    raise CorruptSample(f"label {label} is outside [0, num_classes={self.num_classes})")
                image = decode_image(sample)
            except CorruptSample as exn:
                skipped["corrupt"] += 1
                logger.warning("skipping sample %s of shard %s: %s", keys[j], sample["__url__"], exn)
                continue
            position = index * size + j  # position in this worker's stream: same on resume
            rng = random.Random(
                derive_seed("augment", self.seed, self.epoch, self.rank, worker, position, stream="data")
            )
            images[j] = self.transform(image, rng)
            labels[j], valid[j] = label, True
        pixels = TF.normalize(images.float() / 255.0, self.mean, self.std)  # (B, 3, H, W) uint8 -> float32
        pixels[~valid] = 0.0  # padding and corrupt slots hold zeros, not normalised black
        return {
            "image": pixels,
            "label": labels,
            "key": keys,
            "valid": valid,
            "skipped": skipped,
            "worker": worker,
            "worker_batch": index,
        }


class StreamLoader:
    """One pass over one epoch of one rank; iterate it once, then build the next epoch's.

    Attributes:
        num_batches: Batches of the whole epoch on every rank.
        start_batch: Batches skipped at the start (resume).
        shards: The resolved shards.
    """

    def __init__(
        self,
        dataset: _EpochStream,
        *,
        num_workers: int,
        pin_memory: bool,
        start_batch: int,
        state: dict[str, int | str],
    ) -> None:
        self._dataset, self._num_workers, self._pin_memory = dataset, num_workers, pin_memory
        self.num_batches = dataset.plan.num_batches
        self.start_batch = start_batch
        self.shards = dataset.shards
        self._state = state
        self._consumed = 0
        self._skipped = SkipCounts().pop()
        self._started = False

    def __len__(self) -> int:
        """Batches this loader still yields (num_batches - start_batch)."""
        return self.num_batches - self.start_batch

    @property
    def skipped(self) -> dict[str, int]:
        """This rank's losses since this loader started: corrupt, missing, bad_shards, extra."""
        return dict(self._skipped)

    def state_dict(self) -> dict[str, int | str]:
        """Resume state after the batches handed out so far (pass it as `resume=`).

        Returns:
            Plain ints and strings; identical on every rank.
        """
        return {**self._state, "batch": self.start_batch + self._consumed}

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise RuntimeError(
                "a StreamLoader is a single pass over one epoch; call build_loader again for the next epoch or pass"
            )
        self._started = True
        return self._run()

    def _run(self) -> Iterator[Batch]:
        ds = self._dataset
        remaining = [c - s for c, s in zip(ds.plan.worker_batches, ds.skip)]
        expected = round_robin(remaining, start=ds.first_worker)
        next_index = list(ds.skip)
        # A generator of its own: DataLoader otherwise draws its base seed from the global RNG,
        # which would shift the trainer's dropout stream whenever a loader starts (breaking resume).
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self._num_workers,
            pin_memory=self._pin_memory,
            in_order=True,
            prefetch_factor=2 if self._num_workers else None,
            generator=torch.Generator().manual_seed(0),
        )
        for batch in loader:
            n, worker = self._consumed, batch["worker"]
            if n >= len(expected) or worker != expected[n] or batch["worker_batch"] != next_index[worker]:
                raise RuntimeError(
                    f"batch {n} came from worker {worker} batch "
                    f"{batch['worker_batch']}, the plan expected another; the "
                    f"DataLoader must deliver in order (in_order=True)"
                )
            next_index[worker] += 1
            for key, value in batch["skipped"].items():
                self._skipped[key] += value
            self._consumed += 1
            yield batch
        if self._consumed != len(expected):
            raise RuntimeError(f"epoch ended after {self._consumed} of {len(expected)} batches")
        if any(self._skipped.values()):
            logger.warning("epoch %s: skipped %s", self._state["epoch"], self._skipped)


def _check_args(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    start_batch: int,
) -> None:
    errors = []
    if image_size <= 0:
        errors.append(f"image_size must be > 0, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        errors.append(f"mean and std need 3 values each, got {len(mean)} and {len(std)}")
    elif any(s <= 0 for s in std):
        errors.append(f"std must be > 0, got {tuple(std)}")
    if batch_size <= 0:
        errors.append(f"batch_size must be > 0, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        errors.append(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_workers < 0:
        errors.append(f"num_workers must be >= 0, got {num_workers}")
    if start_batch < 0:
        errors.append(f"start_batch must be >= 0, got {start_batch}")
    if errors:
        raise ValueError("invalid loader arguments: " + "; ".join(errors))


def build_loader(
    spec: DataSpec | str | Sequence[str],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    resampled: bool = False,
    start_batch: int = 0,
    resume: Mapping[str, int | str] | None = None,
    shards: ShardSet | None = None,
    pin_memory: bool = False,
    num_classes: int | None = None,
) -> StreamLoader:
    """Build the loader of one rank for one epoch.

    Every rank yields `num_batches` batches of exactly `batch_size` slots. Slots that hold no
    usable sample (padding of short ranks/workers, corrupt samples) have `valid=False`, a zero
    image and label IGNORE_INDEX. Each batch is a dict:

    - image: float32 (B, 3, image_size, image_size), normalised with mean/std;
    - label: int64 (B,);
    - key: list of B sample keys ("" for padding);
    - valid: bool (B,);
    - skipped: {"corrupt", "missing", "bad_shards", "extra"} counts met since this worker's
      previous batch (summed by the StreamLoader in `skipped`);
    - worker, worker_batch: which reader produced it (for order checks).

    Args:
        spec: Data spec, or shard pattern(s).
        image_size: Output side (from the backbone).
        mean: Per-channel mean in [0, 1] units (from the backbone).
        std: Per-channel std in [0, 1] units (from the backbone).
        train: Shuffle shards and samples and augment (True), or read in order with a
            resize + center crop (False).
        batch_size: Samples per batch on this rank.
        rank: This rank, passed explicitly.
        world_size: Number of ranks, passed explicitly.
        num_workers: Dataloader worker processes (0: read in this process).
        seed: Run seed.
        epoch: Epoch number (changes shard order, buffer, augmentation).
        resampled: Draw shards with replacement; the epoch is spec.samples_per_epoch (or
            the index total) samples over all ranks.
        start_batch: Batches of this epoch to skip (unchecked; prefer `resume`).
        resume: A `StreamLoader.state_dict()` of this epoch; validated, then resumed from.
        shards: Shards already resolved from `spec` (saves re-reading the index each epoch).
        pin_memory: Pin batches for faster host-to-GPU copies.
        num_classes: Labels outside [0, num_classes) make a sample corrupt (skipped, counted
            and logged with its shard, key and label); None accepts any label.

    Returns:
        The loader; iterate it once.

    Raises:
        ValueError: Invalid arguments, no shards, too few shards for world_size x workers
            readers in non-resampled mode, or a resume state that does not match.
    """
    _check_args(image_size, mean, std, batch_size, rank, world_size, num_workers, start_batch)
    if not isinstance(spec, DataSpec):
        spec = DataSpec(shards=spec if isinstance(spec, str) else tuple(spec))
    if shards is None:
        shards = resolve_shards(spec, count=not (resampled and spec.samples_per_epoch))
    plan = plan_epoch(
        shards.sizes,
        num_shards=len(shards.urls),
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        shuffle=train,
        resampled=resampled,
        samples_per_epoch=spec.samples_per_epoch or shards.num_samples,
    )
    state = make_state(
        epoch=epoch,
        batch=0,
        num_batches=plan.num_batches,
        seed=seed,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        resampled=resampled,
        train=train,
        shards=shards.fingerprint,
    )
    if resume is not None:
        if start_batch:
            raise ValueError("pass either start_batch or resume, not both")
        start_batch = check_resume_state(resume, state)
    skip, first = resume_point(plan.worker_batches, start_batch)
    transform = ImageTransform(
        size=image_size,
        train=train,
        crop_scale=spec.crop_scale,
        crop_ratio=spec.crop_ratio,
        hflip=spec.hflip,
        interpolation=spec.interpolation,
    )
    dataset = _EpochStream(
        shards,
        plan,
        skip=skip,
        first_worker=first,
        transform=transform,
        mean=mean,
        std=std,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        resampled=resampled,
        buffer=spec.shuffle_buffer if train else 0,
        num_classes=num_classes,
    )
    logger.info(
        "rank %d epoch %d: %d shards, %d batches of %d%s",
        rank,
        epoch,
        len(shards.urls),
        plan.num_batches,
        batch_size,
        f", resuming at batch {start_batch}" if start_batch else "",
    )
    return StreamLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, start_batch=start_batch, state=state)
