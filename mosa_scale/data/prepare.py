"""From a run config to the shard specs of its train and val data (and the number of classes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mosa_scale.data.config import BUILTIN, DataConfig
from mosa_scale.data.shards import make_shards
from mosa_scale.data.spec import DataSpec


def prepare_data(
    d: DataConfig, run_dir: Path, rank: int, *, seed: int, wait: Callable[[], None] = lambda: None
) -> tuple[DataSpec, DataSpec | None, int]:
    """Shard specs for train/val and the number of classes. A built-in set's shards are written
    first into ``run_dir/data`` by rank 0 (split by ``seed``); every rank then calls ``wait`` (a
    barrier across ranks) before reading them."""
    train, val, index_dir = d.train, d.val, None
    if train.startswith(BUILTIN):
        index_dir = run_dir / "data"
        if rank == 0 and not (index_dir / "index.json").is_file():
            make_shards(
                train[len(BUILTIN) :],
                str(index_dir),
                samples_per_shard=100,
                splits="train=0.8,val=0.2",
                seed=seed,
                overwrite=True,
                progress=False,
            )
        wait()
        train, val = str(index_dir), val or str(index_dir)
    elif Path(train).is_dir():
        index_dir = Path(train)
    num_classes = d.num_classes
    if num_classes is None and index_dir is not None and (index_dir / "index.json").is_file():
        num_classes = int(json.loads((index_dir / "index.json").read_text())["num_classes"])
    if num_classes is None:
        raise ValueError("data.num_classes is needed: the train shards have no index.json to read it from")
    common = dict(
        shuffle_buffer=d.shuffle_buffer,
        hflip=d.hflip,
        crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio,
        allow_unindexed=d.allow_unindexed,
    )
    train_spec = DataSpec(shards=train, split="train" if index_dir is not None else None, **common)
    val_spec = DataSpec(shards=val, split="val" if val == str(index_dir) else None, **common) if val else None
    return train_spec, val_spec, num_classes
