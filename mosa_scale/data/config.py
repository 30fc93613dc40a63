"""The ``data`` section of the run config, and its checks of local shard paths (run before any
process group exists)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mosa_scale.config.errors import Problems
from mosa_scale.data.builtin import BUILTIN_SETS

BUILTIN = "builtin:"


@dataclass(frozen=True)
class DataConfig:
    """Webdataset input. ``train``/``val`` are shard specs (brace patterns, lists, ``pipe:``);
    ``builtin:digits`` / ``builtin:fashion-mnist`` write shards of a built-in set into the run
    directory first. Training augmentation is RandomResizedCrop(``crop_scale``, ``crop_ratio``)
    plus an optional flip; ``crop_scale: [1, 1]`` and ``crop_ratio: [1, 1]`` give a plain resize
    (VTAB-1k, position-sensitive tasks). Samples with an unreadable image or a label outside
    [0, num_classes) are skipped and counted; more than ``max_skip_rate`` of them stops the run
    (judged at epoch ends and at log steps).
    Shards a present index.json does not list are refused unless ``allow_unindexed``."""

    train: str = "builtin:digits"
    val: str | None = None
    num_classes: int | None = None
    workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    image_size: int | None = None
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    max_skip_rate: float = 0.05
    allow_unindexed: bool = False

    def __post_init__(self) -> None:
        p = Problems()
        self.validate_into(p, prefix="data")
        p.raise_if_any()

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        """Records this section's problems; the files it names are :func:`check_data_paths`'s."""
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            p.add(f"{prefix}.crop_scale", f"got {self.crop_scale}; need 0 < min <= max <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            p.add(f"{prefix}.crop_ratio", f"got {self.crop_ratio}; need 0 < min <= max")
        if self.workers < 0:
            p.add(f"{prefix}.workers", f"got {self.workers}; must be >= 0")
        if not 0 <= self.max_skip_rate <= 1:
            p.add(f"{prefix}.max_skip_rate", f"got {self.max_skip_rate}; must be in [0, 1]")


def _local(spec: str) -> bool:
    return not spec.startswith(BUILTIN) and "://" not in spec and not spec.startswith(("pipe:", "file:"))


def check_data_paths(d: DataConfig, p: Problems) -> None:
    """Local shard specs exist, a folder's index.json is readable, and the number of classes is known."""
    index_classes = None
    for key, spec in (("data.train", d.train), ("data.val", d.val)):
        if spec is None:
            continue
        if spec.startswith(BUILTIN):
            if spec[len(BUILTIN) :] not in BUILTIN_SETS:
                p.add(key, f"got {spec!r}; built-in sets are " + ", ".join(f"'{BUILTIN}{n}'" for n in BUILTIN_SETS))
            continue
        if not _local(spec):
            continue
        if os.path.isdir(spec):
            index = Path(spec) / "index.json"
            if index.is_file():
                try:
                    classes = json.loads(index.read_text()).get("num_classes")
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                    p.add(
                        key,
                        f"{spec!r}: file {str(index)!r} is not a readable shard index ({e}); write it again "
                        "with tools/make_shards.py",
                    )
                    continue
                if key == "data.train":
                    index_classes = classes
            elif not any(f.name.endswith((".tar", ".tar.gz", ".tgz")) for f in Path(spec).iterdir()):
                p.add(
                    key,
                    f"folder {spec!r} holds no index.json and no .tar shards (write them with tools/make_shards.py)",
                )
            continue
        if "{" in spec or "::" in spec:
            from webdataset.shardlists import expand_urls

            try:
                files = [u for part in spec.split("::") for u in expand_urls(part)]
            except ValueError as e:
                p.add(key, f"got {spec!r}: not a brace pattern ({e})")
                continue
            gone = [f for f in files if not os.path.isfile(f)]
            if gone:
                p.add(key, f"{len(gone)} of the {len(files)} shard file(s) of {spec!r} do not exist, e.g. {gone[0]!r}")
        elif not os.path.isfile(spec):
            p.add(
                key,
                f"{spec!r} does not exist (a shard folder, a .tar file, a brace pattern, pipe:... or "
                f"'{BUILTIN}digits')",
            )
    if d.num_classes is None and not d.train.startswith(BUILTIN) and index_classes is None:
        p.add(
            "data.num_classes",
            f"not set, and data.train={d.train!r} is not a folder with an index.json to read "
            "it from; set data.num_classes",
        )
    elif d.num_classes is not None and index_classes is not None and d.num_classes != index_classes:
        p.add(
            "data.num_classes",
            f"got {d.num_classes}, but {os.path.join(d.train, 'index.json')!r} lists "
            f"{index_classes} classes; leave it unset or make them agree",
        )
