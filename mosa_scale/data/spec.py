"""What to read: the data spec, and its resolution into a list of shard URLs with sample counts.

Shards may be given as a brace pattern (`/data/train-{000000..000099}.tar`), a list, a local
folder, or `pipe:` commands for object stores (`pipe:aws s3 cp s3://b/train-000001.tar -`).
Sample counts come from the `index.json` written by `tools/make_shards.py` (found next to local
shards, or named with `index=`); shards missing from every index are counted by reading them.

Patterns are expanded by webdataset's `expand_urls`. Counting stays our own: it reads only the
tar headers of a local shard and seeks over the data, where webdataset's `group_by_keys` would
read every byte, and it returns the count read before a broken shard's error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from mosa_scale.data.errors import DataError

__all__ = [
    "DataSpec",
    "INDEX_NAME",
    "ShardSet",
    "count_shard_samples",
    "resolve_shards",
    "shard_name",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SHARD_NAME = re.compile(r"([^/\s'\"]+\.(?:tar\.gz|tgz|tar))(?![\w.])")


@dataclass(frozen=True)
class DataSpec:
    """Where the shards are and how samples are augmented.

    Attributes:
        shards: Brace pattern, `::`-joined patterns, a local folder of shards, a `pipe:`
            command, or a sequence of any of these.
        split: Split to read when `shards` is a folder holding an index.json (default: the only
            split, or "train"); also filters `<split>-*.tar` in a folder without index.
        index: Path of an index.json to take sample counts from (needed for `pipe:` shards
            unless counting them by reading is acceptable).
        samples_per_epoch: Samples per epoch over all ranks in resampled mode (default: the
            total from the index).
        shuffle_buffer: Size of the sample shuffle buffer of each reader in training (0 or 1:
            no sample shuffle).
        crop_scale: RandomResizedCrop area range. The default (0.35, 1) is milder than the
            ImageNet (0.08, 1), which destroys small images such as 8x8 digits.
        crop_ratio: RandomResizedCrop aspect ratio range.
        hflip: Random horizontal flip in training.
        interpolation: Resampling filter of crops and resizes.
        allow_unindexed: Read shards that a present index.json does not list (counted by
            reading them). By default they are refused: a shard missing from its index is a
            partial or foreign file.
    """

    shards: str | tuple[str, ...]
    split: str | None = None
    index: str | None = None
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    allow_unindexed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.shards, str):
            object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(self.crop_ratio))
        errors = []
        if not self.shards:
            errors.append("shards is empty")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            errors.append(f"samples_per_epoch must be > 0, got {self.samples_per_epoch}")
        if self.shuffle_buffer < 0:
            errors.append(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            errors.append(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            errors.append(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.interpolation not in ("bilinear", "bicubic"):
            errors.append(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if errors:
            raise ValueError("invalid DataSpec: " + "; ".join(errors))


@dataclass(frozen=True)
class ShardSet:
    """Resolved shards.

    Attributes:
        urls: Shard URLs (local paths or `pipe:` commands), in the order given.
        sizes: Samples in each shard (None when not counted: resampled mode with a given
            samples_per_epoch needs no counts).
        classes: Class names from the index (empty when unknown).
        fingerprint: Short hash of urls and sizes, recorded in resume states.
    """

    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None
    classes: tuple[str, ...] = ()
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.sizes is not None and len(self.urls) != len(self.sizes):
            raise ValueError(f"{len(self.urls)} urls but {len(self.sizes)} sizes")
        if not self.fingerprint:
            sizes = self.sizes or (None,) * len(self.urls)
            text = "\n".join(f"{u}\t{n}" for u, n in zip(self.urls, sizes))
            object.__setattr__(self, "fingerprint", hashlib.sha1(text.encode()).hexdigest()[:16])

    @property
    def num_samples(self) -> int | None:
        """Total samples over all shards (None when not counted)."""
        return None if self.sizes is None else sum(self.sizes)


def shard_name(url: str) -> str:
    """File name of a shard, also inside a `pipe:` command (last `*.tar` token).

    Args:
        url: Local path, `file:` URL or `pipe:` command.

    Returns:
        The base name used to look the shard up in an index.
    """
    found = _SHARD_NAME.findall(url)
    return found[-1] if found else os.path.basename(url)


def _is_local(url: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("file:")


def _local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def _read_index(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as exn:
        raise ValueError(f"cannot read shard index {path}: {exn}") from exn
    if not isinstance(index.get("splits"), dict):
        raise ValueError(f"{path} is not a shard index (no 'splits' mapping); write it with tools/make_shards.py")
    return index


def _index_sizes(index: Mapping) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for split in index["splits"].values():
        for name, n in zip(split.get("shards", []), split.get("per_shard", [])):
            sizes[os.path.basename(name)] = int(n)
    return sizes


def _expand(shards: str | Sequence[str], split: str | None) -> tuple[list[str], str | None]:
    """Expand the spec into URLs; returns (urls, index path found next to them)."""
    if isinstance(shards, str) and _is_local(shards) and os.path.isdir(_local_path(shards)):
        folder = _local_path(shards)
        index_path = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index_path):
            splits = _read_index(index_path)["splits"]
            only = next(iter(splits)) if len(splits) == 1 else "train"
            name = split or ("train" if "train" in splits else only)
            if name not in splits:
                raise ValueError(f"split {name!r} not in {index_path}; it has {sorted(splits)}")
            return [os.path.join(folder, s) for s in splits[name]["shards"]], index_path
        prefix = f"{split}-" if split else ""
        urls = sorted(p for p in glob.glob(os.path.join(folder, prefix + "*")) if p.endswith(_SHARD_SUFFIXES))
        if not urls:
            raise ValueError(f"no {prefix}*.tar shards in folder {folder}")
        return urls, None
    items = [shards] if isinstance(shards, str) else list(shards)
    urls = [u for item in items for u in expand_urls(item)]
    return urls, None


def _count_samples(url: str) -> tuple[int, Exception | None]:
    count, last = 0, None
    local = _is_local(url) and not url.endswith((".gz", ".tgz"))
    try:
        with (
            tarfile.open(_local_path(url), "r:") if local else tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")
        ) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _ = base_plus_ext(member.name)
                if key is not None and key != last:
                    count, last = count + 1, key
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exn:
        return count, exn
    return count, None


def count_shard_samples(url: str) -> int:
    """Count the samples of one shard by reading its tar headers.

    Local uncompressed shards are read by seeking over the member data; others are streamed.

    Args:
        url: Local path or `pipe:` command.

    Returns:
        Number of distinct consecutive sample keys.

    Raises:
        ValueError: The shard cannot be opened or is not a complete tar file.
    """
    count, error = _count_samples(url)
    if error is not None:
        raise ValueError(f"cannot count the samples of shard {url} (read {count}): {error}")
    return count


def resolve_shards(spec: DataSpec | str | Sequence[str], *, count: bool = True) -> ShardSet:
    """Expand a spec into shard URLs with their sample counts.

    Args:
        spec: A DataSpec, or what its `shards` field accepts.
        count: Count the samples of shards that no index lists by reading them; if False,
            such a shard set has `sizes=None`.

    Returns:
        The shards with sizes and class names.

    Raises:
        ValueError: No shards, an unreadable index or an unknown split. A shard that is
            neither in an index nor fully readable is planned with the samples read before the
            error, and logged.
        DataError: Shards that a present index.json does not list (unless
            ``spec.allow_unindexed``).
    """
    if not isinstance(spec, DataSpec):
        spec = DataSpec(shards=spec if isinstance(spec, str) else tuple(spec))
    urls, index_path = _expand(spec.shards, spec.split)
    if not urls:
        raise ValueError(f"shard spec {spec.shards!r} expands to no shards")
    index_path = spec.index or index_path
    if index_path is None and _is_local(urls[0]):
        candidate = os.path.join(os.path.dirname(_local_path(urls[0])), INDEX_NAME)
        index_path = candidate if os.path.isfile(candidate) else None
    index = _read_index(index_path) if index_path else {"splits": {}}
    known = _index_sizes(index)
    sizes = [known.get(shard_name(u)) for u in urls]
    missing = [u for u, n in zip(urls, sizes) if n is None]
    if missing and index_path and not spec.allow_unindexed:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"{len(missing)} shard(s) are not listed in {index_path}: {shown}. A shard its index does not "
            "list is a partial or foreign file: remove it or rewrite the index with tools/make_shards.py "
            "(allow_unindexed / data.allow_unindexed=true reads it anyway)"
        )
    if missing and not count:
        return ShardSet(urls=tuple(urls), sizes=None, classes=tuple(index.get("classes", ())))
    if missing:
        logger.warning(
            "%d of %d shards are not in any index.json; counting their samples by "
            "reading them (write shards with tools/make_shards.py to avoid this)",
            len(missing),
            len(urls),
        )
    for i, (url, n) in enumerate(zip(urls, sizes)):
        if n is None:
            sizes[i], error = _count_samples(url)
            if error is not None:
                # A bad shard must not stop the run: plan with what is readable; the reader
                # reports the shard again when it fails there.
                logger.warning("shard %s: counted %d samples before a read error: %s", url, sizes[i], error)
    return ShardSet(urls=tuple(urls), sizes=tuple(int(n) for n in sizes), classes=tuple(index.get("classes", ())))
