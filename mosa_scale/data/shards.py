"""Writing webdataset shards from an image folder, a CSV of (path, label) or a built-in set.

Samples are split by a seeded shuffle, written in that shuffled order (so every shard mixes
classes), and cut into shards of at most `samples_per_shard` samples and `max_shard_bytes`
bytes on disk. Each sample holds the image (`jpg`/`png`/`webp`), `cls` (class index) and `json`
({"label", "class", "origin"}). `index.json`, written last, lists shards, counts and classes.

Nothing partial is ever left under a final name: each shard is written to `<name>.tmp` and renamed
when complete, `index.json` likewise, last. On any error or interrupt every file this call wrote
is removed again, and a source file that is not an image is named in the error.

Each shard is a webdataset `TarWriter`; the cutting into shards is our own, not webdataset's
`ShardWriter`, which writes under the final name and starts a new shard only once one has passed
`maxsize`, where a shard here never exceeds `max_shard_bytes` on disk and appears only complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from webdataset import TarWriter

from mosa_scale.data.builtin import BUILTIN_SETS, ImageArrays, load_builtin
from mosa_scale.data.errors import SourceError
from mosa_scale.data.spec import INDEX_NAME

__all__ = [
    "ImageSource",
    "arrays_source",
    "csv_source",
    "folder_source",
    "make_shards",
    "open_source",
    "parse_size",
    "parse_splits",
    "sample_tar_bytes",
    "split_sizes",
]

logger = logging.getLogger(__name__)

_STORED = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_CONVERTED = (".bmp", ".gif", ".tif", ".tiff")  # re-encoded as PNG
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_OWN_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar(\.tmp)?$")
_BLOCK, _RECORD = 512, 10240  # tar block and record sizes


@dataclass(frozen=True)
class ImageSource:
    """Labelled images to write, read lazily one at a time.

    Attributes:
        name: Description recorded in the index ("digits", a folder, a CSV path).
        classes: Class names, indexed by label.
        labels: Label of each sample.
        read: Sample index -> (encoded image bytes, field name "jpg"/"png"/"webp").
        origin: Sample index -> where it came from (relative path or array index).
    """

    name: str
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    read: Callable[[int], tuple[bytes, str]]
    origin: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.labels)


_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _read_file(path: str) -> tuple[bytes, str]:
    """The file's bytes (jpg/png/webp as they are, others re-encoded as PNG).

    Raises:
        SourceError: naming the file, when it cannot be read or its header is not an image's.
    """
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:  # reads the header: a file that is no image stops here
            if ext in _STORED:
                return data, _STORED[ext]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
    except _IMAGE_ERRORS as exn:
        why = (
            "its header is no known image format"
            if isinstance(exn, UnidentifiedImageError)
            else f"{type(exn).__name__}: {exn}"
        )
        raise SourceError(
            f"source file {path} cannot be read as an image ({why}); remove or replace it and run make_shards again"
        ) from exn
    return buf.getvalue(), "png"


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (*_STORED, *_CONVERTED)


def folder_source(root: str) -> ImageSource:
    """Images in `root/<class>/...` (one sub-folder per class, searched recursively).

    Classes are the sub-folder names in sorted order. Files that are not images (by
    extension: jpg, jpeg, png, webp stored as-is; bmp, gif, tif, tiff re-encoded as PNG) are
    ignored and counted in a warning.

    Args:
        root: The folder.

    Returns:
        The source.

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: No class sub-folders, or no images at all.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source folder {root} does not exist")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image>")
    paths, labels, ignored = [], [], 0
    for label, name in enumerate(classes):
        found = sorted(
            os.path.join(d, f)
            for d, _, files in os.walk(os.path.join(root, name))
            for f in files
            if not f.startswith(".")
        )
        images = [p for p in found if _is_image(p)]
        ignored += len(found) - len(images)
        if not images:
            logger.warning("class folder %s holds no images", os.path.join(root, name))
        paths += images
        labels += [label] * len(images)
    if ignored:
        logger.warning("ignored %d files under %s that are not images", ignored, root)
    if not paths:
        raise ValueError(f"no images under {root}")
    return ImageSource(
        root, tuple(classes), tuple(labels), lambda i: _read_file(paths[i]), lambda i: os.path.relpath(paths[i], root)
    )


def csv_source(path: str) -> ImageSource:
    """Images listed in a CSV of `path,label` rows (an optional `path,label` header first).

    Relative paths are relative to the CSV's folder. Labels are class names; when all of them
    are non-negative integers they are class indices and the classes are "0".."max".

    Args:
        path: The CSV file.

    Returns:
        The source.

    Raises:
        FileNotFoundError: The CSV does not exist.
        ValueError: Bad rows (each named by line number: column count, empty field, missing
            or non-image file), or no rows.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file {path} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    rows, errors = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if line == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2:
                errors.append(f"line {line}: expected 2 columns (path,label), got {len(row)}")
                continue
            file, label = row[0].strip(), row[1].strip()
            full = os.path.join(base, file)
            if not file or not label:
                errors.append(f"line {line}: empty path or label")
            elif not _is_image(file):
                errors.append(f"line {line}: {file} is not a jpg/jpeg/png/webp/bmp/gif/tif image")
            elif not os.path.isfile(full):
                errors.append(f"line {line}: file {full} does not exist")
            else:
                rows.append((full, label))
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{path}: {len(errors)} bad row(s):\n  {shown}{more}")
    if not rows:
        raise ValueError(f"{path} lists no images")
    names = [label for _, label in rows]
    if all(n.isdigit() for n in names):
        classes = tuple(str(i) for i in range(max(int(n) for n in names) + 1))
        labels = tuple(int(n) for n in names)
    else:
        classes = tuple(sorted(set(names)))
        labels = tuple(classes.index(n) for n in names)
    return ImageSource(
        path, classes, labels, lambda i: _read_file(rows[i][0]), lambda i: os.path.relpath(rows[i][0], base)
    )


def arrays_source(arrays: ImageArrays, *, size: int | None = None, image_format: str = "PNG") -> ImageSource:
    """An in-memory set, each image encoded on demand.

    Args:
        arrays: Images (N, H, W) uint8 and labels.
        size: Resize every image to size x size (bicubic) before encoding; None keeps it.
        image_format: "PNG" (lossless) or "JPEG" (quality 90).

    Returns:
        The source.

    Raises:
        ValueError: Unsupported format.
    """
    field = {"PNG": "png", "JPEG": "jpg"}.get(image_format)
    if field is None:
        raise ValueError(f"image_format must be PNG or JPEG, got {image_format!r}")

    def read(i: int) -> tuple[bytes, str]:
        image = Image.fromarray(arrays.images[i])  # (H, W) uint8 -> grayscale "L"
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format=image_format, **({"quality": 90} if field == "jpg" else {}))
        return buf.getvalue(), field

    return ImageSource(
        arrays.name, arrays.classes, tuple(int(y) for y in arrays.labels), read, lambda i: f"{arrays.name}[{i}]"
    )


def open_source(source: str) -> ImageSource:
    """Open SOURCE as make_shards does: a built-in name, a `.csv` file, or a class folder.

    The names `digits` and `fashion-mnist` always mean the built-in sets (write `./digits` for a
    folder of that name).

    Args:
        source: The SOURCE argument.

    Returns:
        The source.

    Raises:
        FileNotFoundError: A folder or CSV that does not exist.
        MissingDatasetError: Fashion-MNIST is not installed.
        ValueError: Bad CSV rows or an empty folder.
    """
    if source in BUILTIN_SETS:
        return arrays_source(load_builtin(source))
    if source.lower().endswith(".csv"):
        return csv_source(source)
    if os.path.isdir(source):
        return folder_source(source)
    raise FileNotFoundError(f"SOURCE {source!r} is neither a folder, a .csv file, nor one of {', '.join(BUILTIN_SETS)}")


def parse_splits(text: str) -> dict[str, float]:
    """Parse `train=0.8,val=0.2`.

    Args:
        text: Comma-separated name=fraction pairs.

    Returns:
        Fractions by split name, in the given order.

    Raises:
        ValueError: Bad syntax or names, fractions outside (0, 1], or a sum other than 1.
    """
    splits: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not _SPLIT_NAME.match(name) or name in splits:
            raise ValueError(
                f"bad split {part!r} in {text!r}: expected unique name=fraction "
                f"with names of letters, digits and _ (e.g. train=0.8,val=0.2)"
            )
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"split {name}: {value!r} is not a number") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"split {name}: fraction {fraction} is not in (0, 1]")
        splits[name] = fraction
    if abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {text!r} sum to {sum(splits.values()):g}, not 1")
    return splits


def split_sizes(num_samples: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Samples per split: floors of n x fraction, the remainder to the largest remainders.

    Args:
        num_samples: Samples to split.
        fractions: Fractions summing to 1.

    Returns:
        Sizes summing to num_samples (ties go to the split named first).
    """
    exact = {k: num_samples * f for k, f in fractions.items()}
    sizes = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(fractions, key=lambda k: -(exact[k] - sizes[k]))
    for k in by_remainder[: num_samples - sum(sizes.values())]:
        sizes[k] += 1
    return sizes


def parse_size(text: str | int) -> int:
    """Parse a byte count: `1000000`, `64K`, `512M`, `1G` (powers of 1024), `1e9`.

    Args:
        text: The size.

    Returns:
        Bytes.

    Raises:
        ValueError: Not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGkmg]?)i?[Bb]?\s*", text)
        if not match:
            raise ValueError(f"bad size {text!r}: use bytes or a K/M/G suffix, e.g. 512M")
        try:
            number = float(match.group(1))
        except ValueError:
            raise ValueError(f"bad size {text!r}") from None
        value = int(number * 1024 ** " KMG".index(match.group(2).upper() or " "))
    if value <= 0:
        raise ValueError(f"size must be > 0, got {text!r}")
    return value


def sample_tar_bytes(fields: Mapping[str, bytes]) -> int:
    """Bytes one sample adds to a tar file: a 512-byte header per member plus padded data."""
    return sum(_BLOCK + math.ceil(len(v) / _BLOCK) * _BLOCK for v in fields.values())


def _shard_file_bytes(payload: int) -> int:
    # End-of-archive marker (two blocks), then padding to a whole record, as tarfile writes.
    return math.ceil((payload + 2 * _BLOCK) / _RECORD) * _RECORD


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} exists and is not a folder")
    entries = os.listdir(out) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty ({len(entries)} entries); pass "
            f"--overwrite (overwrite=True) to replace its shards and index"
        )
    for name in entries:
        if name in (INDEX_NAME, INDEX_NAME + ".tmp") or _OWN_FILE.match(name):
            os.remove(os.path.join(out, name))
        else:
            logger.warning("left %s in %s (not a shard or index)", name, out)
    os.makedirs(out, exist_ok=True)


class _SplitWriter:
    """Shards of one split, cut by sample count and on-disk bytes; each written to a .tmp file and
    renamed only once complete (`close`); `abort` removes the unfinished one."""

    def __init__(self, out: str, split: str, max_samples: int, max_bytes: int) -> None:
        self.out, self.split = out, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.names: list[str] = []
        self.counts: list[int] = []
        self.sizes: list[int] = []
        self._writer: TarWriter | None = None
        self._file = None
        self._payload = 0

    def write(self, sample: dict[str, bytes | str]) -> None:
        fields = {k: v for k, v in sample.items() if k != "__key__"}
        add = sample_tar_bytes(fields)
        full = self._writer is not None and (
            self.counts[-1] >= self.max_samples or _shard_file_bytes(self._payload + add) > self.max_bytes
        )
        if self._writer is None or full:
            self._next()
        if _shard_file_bytes(add) > self.max_bytes:
            logger.warning(
                "sample %s alone needs %d bytes > max_shard_bytes=%d; written to its own shard",
                sample["__key__"],
                _shard_file_bytes(add),
                self.max_bytes,
            )
        self._writer.write(sample)
        self._payload += add
        self.counts[-1] += 1

    def _next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.names):06d}.tar"
        self._file = open(os.path.join(self.out, name + ".tmp"), "wb")
        # mtime=0: the same input and seed give byte-identical shards.
        self._writer = TarWriter(self._file, encoder=False, compress=False, mtime=0)
        self.names.append(name)
        self.counts.append(0)
        self._payload = 0

    def close(self) -> None:
        """Finishes the open shard and gives it its final name."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        path = os.path.join(self.out, self.names[-1])
        os.replace(path + ".tmp", path)
        self.sizes.append(os.path.getsize(path))
        self._writer = None

    def abort(self) -> None:
        """Drops the open shard (its .tmp file); finished shards stay for the caller to remove."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            os.remove(os.path.join(self.out, self.names[-1] + ".tmp"))
            self.names.pop()
            self.counts.pop()
            self._writer = None


def make_shards(
    source: str | ImageSource,
    out: str,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int | str = "1G",
    splits: str | Mapping[str, float] = "train=1",
    seed: int = 0,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Write `out/<split>-%06d.tar` shards and `out/index.json`.

    Args:
        source: SOURCE as for `open_source`, or an ImageSource.
        out: Output folder; must be empty or missing unless `overwrite`.
        samples_per_shard: Most samples per shard.
        max_shard_bytes: Most bytes per shard file (a single larger sample gets its own shard).
        splits: `train=0.8,val=0.2` or a mapping of fractions summing to 1.
        seed: Seed of the shuffle that assigns samples to splits and orders them.
        overwrite: Replace shards and index in a non-empty `out` (other files are kept).
        limit: Use a seeded random subset of this many samples.
        progress: Show a tqdm bar on stderr.

    Returns:
        The index written to `out/index.json`.

    Raises:
        FileNotFoundError: Missing source.
        FileExistsError: Non-empty `out` without `overwrite`.
        MissingDatasetError: Fashion-MNIST is not installed.
        SourceError: A source file that is not an image (named); nothing is left in `out`.
        ValueError: Bad arguments, bad CSV rows, or a split that would get no sample.
        KeyboardInterrupt: Interrupted; nothing is left in `out`.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    max_bytes = parse_size(max_shard_bytes)
    fractions = parse_splits(splits) if isinstance(splits, str) else dict(splits)
    src = open_source(source) if isinstance(source, str) else source
    order = np.random.default_rng(seed).permutation(len(src))
    if limit is not None:
        order = order[:limit]
    sizes = split_sizes(len(order), fractions)
    empty = [k for k, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(f"split(s) {empty} would get no sample out of {len(order)}; use more data or larger fractions")
    _prepare_out(out, overwrite)
    index: dict = {
        "format": "mosa_scale.shards/1",
        "source": src.name,
        "seed": seed,
        "fractions": fractions,
        "classes": list(src.classes),
        "num_classes": len(src.classes),
        "splits": {},
    }
    start, written = 0, []
    try:
        with tqdm(
            total=len(order), desc=f"writing shards to {out}", unit="img", file=sys.stderr, disable=not progress
        ) as bar:
            for split, n in sizes.items():
                writer = _SplitWriter(out, split, samples_per_shard, max_bytes)
                try:
                    for j, i in enumerate(order[start : start + n].tolist()):
                        data, field = src.read(i)
                        label = src.labels[i]
                        meta = {"label": label, "class": src.classes[label], "origin": src.origin(i)}
                        writer.write(
                            {
                                "__key__": f"{split}-{j:08d}",
                                field: data,
                                "cls": str(label).encode(),
                                "json": json.dumps(meta).encode(),
                            }
                        )
                        bar.update(1)
                except BaseException:
                    writer.abort()  # the shard being written is incomplete: never renamed
                    raise
                finally:
                    writer.close()
                    written += writer.names
                start += n
                index["splits"][split] = {
                    "shards": writer.names,
                    "num_samples": n,
                    "per_shard": writer.counts,
                    "bytes": writer.sizes,
                }
        with open(os.path.join(out, INDEX_NAME + ".tmp"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
        os.replace(os.path.join(out, INDEX_NAME + ".tmp"), os.path.join(out, INDEX_NAME))
    except BaseException:
        # _prepare_out left no shard or index here, so every one now present is this call's; an
        # interrupt can land between opening a shard's .tmp file and recording it, hence the listing
        ours = {n for n in os.listdir(out) if n in (INDEX_NAME, INDEX_NAME + ".tmp") or _OWN_FILE.match(n)}
        for name in sorted(ours | set(written)):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        logger.warning("make_shards stopped: removed the %d shard(s) it had written to %s", len(written), out)
        raise
    logger.info(
        "wrote %d samples in %d shards to %s", len(order), sum(len(s["shards"]) for s in index["splits"].values()), out
    )
    return index
