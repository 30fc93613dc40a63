"""Pretrained tower weights read tensor by tensor from a memory map.

A :class:`CheckpointReader` opens a checkpoint without loading it: a ``.safetensors`` file, a
sharded safetensors checkpoint (``*.safetensors.index.json`` naming the shard of every tensor),
or a PyTorch zip checkpoint (``.pt`` / ``.bin`` / ``.pth`` / ``.ckpt``, opened with
``torch.load(mmap=True, weights_only=True)``). Only the tensors asked for are read, and for a
partitioned (ZeRO-3) parameter only this rank's elements of it: the text tower of a CLIP
checkpoint is never read, and no rank ever holds the whole tower.

:func:`load_tensors` fills a built tower from a reader: every parameter and persistent buffer
must be found with the right shape (after an optional per-tensor transform such as a position
embedding resize), and errors name the tensor and the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosa_scale.backbones.construct import ShardHooks
from mosa_scale.host_memory import drop_file_pages

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"
Transform = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


class WeightsError(RuntimeError):
    """A checkpoint does not fit the tower it is loaded into (names the tensor and the file)."""


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` names a checkpoint this module reads (by its suffix)."""
    return path.name.endswith(INDEX_SUFFIX) or path.suffix in (".safetensors", *TORCH_SUFFIXES)


class CheckpointReader:
    """Read-only access to the tensors of one checkpoint (one or several files)."""

    def __init__(self, files: Mapping[str, str], label: str) -> None:
        self._file_of = dict(files)  # key -> file
        self.label = label  # what the user named (a file, an index, a directory)

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> str:
        """The file holding ``key`` (the checkpoint's label for unknown keys)."""
        return self._file_of.get(key, self.label)

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key``, in memory of its own (not a view of a file mapping)."""
        raise NotImplementedError

    def read_flat(self, key: str, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of ``key`` in row-major order; reads only the rows
        that hold them."""
        return self.read(key).reshape(-1)[start : start + count]

    def close(self) -> None:
        """Releases open files."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor of a safetensors file lies: dtype, shape, absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _safetensors_header(path: str) -> dict[str, _Entry]:
    """The tensors of one safetensors file, their byte ranges checked against the file's size.

    Raises:
        WeightsError: A header that is not JSON, an unknown dtype, or a range that does not match
            the shape or lies outside the file (a truncated or corrupted file).
    """
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise WeightsError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    out: dict[str, _Entry] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (8 + n + int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: tensor {key!r} has an unreadable header entry {meta!r}") from e
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or begin < 8 + n or end > size:
            raise WeightsError(
                f"{path}: tensor {key!r} ({meta['dtype']} {list(shape)}, {want} bytes) has the byte range "
                f"{begin}..{end} of a {size}-byte file: the file is truncated or corrupted"
            )
        out[key] = _Entry(dtype, shape, begin, end)
    return out


class SafetensorsReader(CheckpointReader):
    """One ``.safetensors`` file or a sharded checkpoint (an index naming the file of each key).

    Bytes are read with ``pread`` into fresh tensors rather than through a memory map, so what was
    read is freed with the tensor: a memory map would keep every page touched resident in this
    process (half the tower per rank under ZeRO-3) until the file is closed.
    """

    def __init__(self, files: Mapping[str, str], label: str) -> None:
        super().__init__(files, label)
        self._headers: dict[str, dict[str, _Entry]] = {}
        self._fds: dict[str, int] = {}

    def _entry(self, key: str) -> tuple[str, _Entry]:
        f = self._file_of[key]
        if f not in self._headers:
            self._headers[f] = _safetensors_header(f)
        header = self._headers[f]
        if key not in header:
            raise WeightsError(f"{f}: holds no tensor {key!r} (its index names this file for it)")
        return f, header[key]

    def _pread(self, f: str, offset: int, nbytes: int) -> torch.Tensor:
        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            got = os.preadv(self._fds[f], [view[done:]], offset + done)
            if got <= 0:
                raise WeightsError(f"{f}: ended {nbytes - done} bytes early at offset {offset + done}")
            done += got
        return buf

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1].shape

    def read(self, key: str) -> torch.Tensor:
        f, e = self._entry(key)
        return self._pread(f, e.begin, e.end - e.begin).view(e.dtype).reshape(e.shape)

    def read_flat(self, key: str, start: int, count: int) -> torch.Tensor:
        f, e = self._entry(key)
        if count <= 0:
            return torch.empty(0, dtype=e.dtype)
        if start < 0 or start + count > math.prod(e.shape):
            raise IndexError(f"{key}: elements {start}..{start + count} of {math.prod(e.shape)}")
        size = e.dtype.itemsize  # the elements are contiguous in the file: read exactly them
        return self._pread(f, e.begin + start * size, count * size).view(e.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._headers.clear()


class TorchReader(CheckpointReader):
    """A PyTorch checkpoint opened with ``mmap=True``: tensors are read when touched.

    What is read is copied out and its pages of the mapping handed back to the kernel, so the
    bytes read do not stay resident in this process beside the tower (``mapped=False``: a legacy
    checkpoint held in memory, returned as is).
    """

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], files: Mapping[str, str], label: str, *, mapped: bool = True
    ) -> None:
        super().__init__(files, label)
        self._tensors = dict(tensors)
        self._mapped = mapped

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def _copy_out(self, t: torch.Tensor) -> torch.Tensor:
        if not self._mapped:
            return t
        out = t.clone()
        if t.is_contiguous():
            drop_file_pages(t)
        return out

    def read(self, key: str) -> torch.Tensor:
        return self._copy_out(self._tensors[key])

    def read_flat(self, key: str, start: int, count: int) -> torch.Tensor:
        t = self._tensors[key]
        if not t.is_contiguous():
            return t.contiguous().reshape(-1)[start : start + count]
        return self._copy_out(t.reshape(-1)[start : start + count])

    def close(self) -> None:
        self._tensors.clear()


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``state_dict`` / ``model`` wrappers, DDP
    ``module.`` prefixes), tensors only."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
            inner = obj[key]
            if inner and all(isinstance(k, str) for k in inner) and any(torch.is_tensor(v) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _strip_module(files: dict[str, str]) -> dict[str, str]:
    if files and all(k.startswith("module.") for k in files):
        return {k[len("module.") :]: f for k, f in files.items()}
    return files


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint file without reading its tensors.

    Args:
        path: A ``.safetensors`` file, a ``*.safetensors.index.json`` index of a sharded
            checkpoint, or a PyTorch zip checkpoint (``.pt``, ``.bin``, ``.pth``, ``.ckpt``).

    Returns:
        A reader; tensors are read on request.

    Raises:
        FileNotFoundError: The file, or a shard the index names, does not exist.
        WeightsError: An unreadable file, or an index without a ``weight_map``.
        ValueError: An unknown suffix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p}: no such file")
    if p.name.endswith(INDEX_SUFFIX):
        try:
            weight_map = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise WeightsError(f"{p}: not a safetensors index (needs a 'weight_map' of tensor -> file): {e}") from e
        files = {k: str(p.parent / f) for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{p} names shard {Path(f).name}, which does not exist in {p.parent}")
        return SafetensorsReader(_strip_module(files), str(p))
    if p.suffix == ".safetensors":
        keys = list(_safetensors_header(str(p)))
        return SafetensorsReader(_strip_module({k: str(p) for k in keys}), str(p))
    if p.suffix in TORCH_SUFFIXES:
        mapped = True
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise WeightsError(f"{p}: could not be read as a PyTorch checkpoint: {e}") from e
            # a legacy (non-zip) checkpoint cannot be memory-mapped: it is read whole once
            logger.warning(
                "%s is not in PyTorch's zip format: read whole into memory (re-save it with "
                "torch.save or as safetensors to load it tensor by tensor)",
                p,
            )
            obj = torch.load(p, map_location="cpu", weights_only=True)
            mapped = False
        sd = _unwrap(obj, p)
        return TorchReader(sd, {k: str(p) for k in sd}, str(p), mapped=mapped)
    raise ValueError(f"{p}: unknown checkpoint type; use .safetensors, *{INDEX_SUFFIX}, or one of {TORCH_SUFFIXES}")


@dataclass(frozen=True)
class Target:
    """One tensor of the tower to fill: its state-dict name and the checkpoint key it comes from."""

    name: str
    tensor: torch.Tensor
    key: str


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of ``model`` by state-dict name (shared ones once)."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p
    for mod_name, mod in model.named_modules():
        for bname, buf in mod.named_buffers(recurse=False):
            if buf is None or bname in mod._non_persistent_buffers_set or id(buf) in seen:
                continue
            seen.add(id(buf))
            yield (f"{mod_name}.{bname}" if mod_name else bname), buf


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))


def load_tensors(
    targets: list[Target],
    reader: CheckpointReader,
    *,
    shard: ShardHooks | None = None,
    transforms: Mapping[str, Transform] | None = None,
    what: str = "tower",
) -> dict[str, float]:
    """Copy checkpoint tensors into the tower, one tensor at a time.

    Each target gets ``reader[key]`` cast to the target's dtype. A partitioned (ZeRO-3)
    parameter gets only this rank's elements, read from the file directly. A transform
    (``transforms[name](tensor, target_shape)``, e.g. a position-embedding resize) is applied to
    the whole tensor when its checkpoint shape differs from the target's.

    Args:
        targets: What to fill (every parameter and persistent buffer of the tower).
        reader: The open checkpoint.
        shard: The sharding hooks when the tower is partitioned.
        transforms: Per-target shape adapters, by target name.
        what: Label for log lines.

    Returns:
        ``{"tensors", "bytes_read", "seconds"}`` of this rank.

    Raises:
        WeightsError: A key is missing, or a shape does not fit; names the tensor and the file.
    """
    transforms = dict(transforms or {})
    missing = [t for t in targets if t.key not in reader]
    if missing:
        shown = ", ".join(f"{t.key!r} (for {t.name})" for t in missing[:5])
        raise WeightsError(
            f"checkpoint {reader.label} does not fit the configured {what}: {len(missing)} tensors "
            f"are missing, e.g. {shown}; check the model name / config against the checkpoint"
        )
    t0, done, nbytes, next_log = time.perf_counter(), 0, 0, 0.1
    total = sum(math.prod(_full_shape(t.tensor)) * t.tensor.element_size() for t in targets) or 1
    for t in targets:
        want = _full_shape(t.tensor)
        have = reader.shape(t.key)
        transform = transforms.get(t.name) if have != want else None
        if have != want and transform is None:
            raise WeightsError(
                f"tensor {t.key!r} in {reader.file_of(t.key)} has shape {list(have)}, but the "
                f"{what}'s {t.name} has shape {list(want)}: the checkpoint does not fit the "
                "configured model"
            )
        with torch.no_grad():
            if shard is not None and shard.is_sharded(t.tensor):
                start, count = shard.local_range(t.tensor)  # type: ignore[arg-type]
                if transform is None:
                    values = reader.read_flat(t.key, start, count)
                else:
                    values = _transformed(reader, t, transform, want).reshape(-1)[start : start + count]
                shard.write_local(t.tensor, values.to(t.tensor.dtype))  # type: ignore[arg-type]
                nbytes += values.numel() * values.element_size()
            else:
                value = reader.read(t.key) if transform is None else _transformed(reader, t, transform, want)
                t.tensor.copy_(value.to(t.tensor.dtype))
                nbytes += value.numel() * value.element_size()
        done += math.prod(want) * t.tensor.element_size()
        if done / total >= next_log:
            logger.info(
                "loading %s from %s: %.0f%% (%.1f s)", what, reader.label, 100 * done / total, time.perf_counter() - t0
            )
            next_log = done / total + 0.1
    return {"tensors": float(len(targets)), "bytes_read": float(nbytes), "seconds": time.perf_counter() - t0}


def _transformed(reader: CheckpointReader, t: Target, transform: Transform, want: tuple[int, ...]) -> torch.Tensor:
    value = transform(reader.read(t.key), want)
    if tuple(value.shape) != want:
        raise WeightsError(
            f"tensor {t.key!r} in {reader.file_of(t.key)} has shape {list(reader.shape(t.key))} and "
            f"cannot be resized to the {t.name} shape {list(want)}"
        )
    return value


def unexpected_keys(reader: CheckpointReader, used: set[str], prefix: str = "") -> list[str]:
    """Keys under ``prefix`` that no target consumed."""
    return sorted(k for k in reader.keys() if k.startswith(prefix) and k not in used)
