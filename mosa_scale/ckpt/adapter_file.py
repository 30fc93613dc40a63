"""The shipped artefact: a merged dense adapter as safetensors plus a JSON manifest.

Reading checks, in this order and before any tensor is allocated: the safetensors header against
the file's size (every tensor's bytes inside the file, no overlap, nothing left over), the
manifest against the header (the same tensors, shapes and dtypes), and the manifest's own sha256
recorded in the header. Then the tensors are read, each one's sha256 checked against the
manifest, and every floating-point value must be finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import mosa_scale

WEIGHTS, MANIFEST = "adapter.safetensors", "adapter_config.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# safetensors dtype -> (torch dtype name as the manifest writes it, bytes per element)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


class AdapterFileError(ValueError):
    """An adapter directory is damaged, altered, inconsistent or holds non-finite values."""


def tensor_checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def nonfinite(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Floating-point tensors holding NaN or inf: name -> how many such values."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                out[k] = bad
    return out


def write_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Writes ``adapter.safetensors`` and ``adapter_config.json`` atomically (temp file + rename).

    The manifest gets the mosa_scale version and a sha256 of every tensor; the safetensors header
    records the manifest's own sha256, so a change to either file is found on reading.

    Raises:
        AdapterFileError: when a tensor holds NaN or inf (nothing is written).
    """
    out = Path(out_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(state.items())}
    bad = nonfinite(tensors)
    if bad:
        raise AdapterFileError(
            f"refusing to write an adapter to {out} with non-finite values: "
            + ", ".join(f"{k} ({n} NaN/inf)" for k, n in sorted(bad.items())[:6])
        )
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        **manifest,
        "mosa_scale_version": mosa_scale.__version__,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": tensor_checksum(v)}
            for k, v in tensors.items()
        },
    }
    text = json.dumps(meta, indent=2, sort_keys=True).encode()
    tmp_w, tmp_m = out / f".{WEIGHTS}.tmp", out / f".{MANIFEST}.tmp"
    save_file(
        tensors,
        str(tmp_w),
        metadata={
            "format": "pt",
            "mosa_scale_version": mosa_scale.__version__,
            "manifest_sha256": hashlib.sha256(text).hexdigest(),
        },
    )
    tmp_m.write_bytes(text)
    os.replace(tmp_w, out / WEIGHTS)
    os.replace(tmp_m, out / MANIFEST)
    return out


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensors (``{"dtype", "shape", "data_offsets"}``) and metadata of a safetensors file's header,
    checked against the file's size without reading any tensor.

    Raises:
        AdapterFileError: naming the file and what in the header does not fit the file.
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(msg: str) -> AdapterFileError:
        return AdapterFileError(f"{path}: {msg}; the file is damaged or altered")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"the header claims {n} bytes of {size - 8} available")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_bytes, spans = size - 8 - n, []
    for name, t in header.items():
        ok = (
            isinstance(t, dict)
            and t.get("dtype") in DTYPES
            and isinstance(t.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in t["shape"])
            and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2
            and all(isinstance(o, int) for o in t["data_offsets"])
        )
        if not ok:
            raise bad(f"tensor {name!r}: header entry {str(t)[:120]} is not a safetensors tensor entry")
        begin, end = t["data_offsets"]
        want = math.prod(t["shape"]) * DTYPES[t["dtype"]][1]
        if not 0 <= begin <= end <= data_bytes or end - begin != want:
            raise bad(
                f"tensor {name!r}: the header says shape {t['shape']} {t['dtype']} ({want} bytes) at bytes "
                f"[{begin}, {end}) of a {data_bytes}-byte data section"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise bad(f"tensor {name!r} starts at byte {begin}, the previous one ends at {pos} (overlap or gap)")
        pos = end
    if pos != data_bytes:
        raise bad(f"the tensors fill {pos} of the {data_bytes} data bytes")
    return header, meta


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads an adapter directory, checking both files before and after the tensors are read.

    Raises:
        FileNotFoundError: naming the missing file.
        AdapterFileError: naming the file and the tensor, when the header does not fit the file,
            the manifest does not match the header or its recorded sha256, a tensor does not
            match its checksum, or a value is NaN or inf.
    """
    d = Path(path)
    for name in (WEIGHTS, MANIFEST):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} does not exist")
    weights, text = d / WEIGHTS, (d / MANIFEST).read_bytes()
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{d / MANIFEST}: not valid JSON ({e}); the file is damaged") from e
    header, meta = read_header(weights)
    recorded = meta.get("manifest_sha256")
    if recorded is not None and recorded != hashlib.sha256(text).hexdigest():
        raise AdapterFileError(
            f"{d / MANIFEST}: its sha256 differs from the one recorded in {weights.name}'s header: "
            "one of the two files is damaged or altered, or they come from different writes"
        )
    listed = manifest.get("tensors") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        raise AdapterFileError(f"{d / MANIFEST}: has no 'tensors' table; not an adapter manifest")
    diffs = [f"{k}: in {weights.name}, not in {MANIFEST}" for k in sorted(set(header) - set(listed))]
    diffs += [f"{k}: in {MANIFEST}, not in {weights.name}" for k in sorted(set(listed) - set(header))]
    for k in sorted(set(header) & set(listed)):
        have = (header[k]["shape"], DTYPES[header[k]["dtype"]][0])
        want = (listed[k].get("shape"), listed[k].get("dtype"))
        if have != want:
            diffs.append(f"{k}: {weights.name} holds {have[0]} {have[1]}, {MANIFEST} says {want[0]} {want[1]}")
    if diffs:
        raise AdapterFileError(f"{d}: the two files do not match ({len(diffs)} difference(s)): " + "; ".join(diffs[:6]))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{weights}: cannot be read ({e}); the file is damaged") from e
    bad = [k for k, v in state.items() if listed[k].get("sha256") != tensor_checksum(v)]
    if bad:
        raise AdapterFileError(f"{weights}: checksum mismatch for {', '.join(bad)}; the file is damaged or altered")
    values = nonfinite(state)
    if values:
        raise AdapterFileError(
            f"{weights}: non-finite values in "
            + ", ".join(f"{k} ({n} NaN/inf)" for k, n in sorted(values.items())[:6])
            + "; the adapter is unusable"
        )
    return state, manifest


# ---------------------------------------------------------------------------- writing folders atomically
@contextmanager
def staging_folder(out_dir: str | Path, *, tidy: bool = False) -> Iterator[tuple[Path, Path]]:
    """``(out_dir, tmp)``: a temporary folder inside ``out_dir`` (created if needed) to write files in
    before they are moved into ``out_dir`` with ``os.replace``; it is removed on leaving, error or not.

    Args:
        out_dir: The destination folder.
        tidy: Also remove ``out_dir`` when this call created it and it is left empty (an error
            before anything was moved in).
    """
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mosa-tmp-", dir=out))
    try:
        yield out, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if tidy and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def write_adapters_atomically(
    out_dir: str | Path, items: Sequence[tuple[str, Mapping[str, torch.Tensor], Mapping[str, Any]]]
) -> list[Path]:
    """Writes adapter directories (``(subdir, state, manifest)``, subdir "" = ``out_dir``) so that no
    partial file is ever left: everything is written and read back (checksums) in a temporary
    folder inside ``out_dir``, then moved in with ``os.replace``; on any error the temporary
    folder is removed and ``out_dir`` is as before."""
    with staging_folder(out_dir, tidy=True) as (out, tmp):
        for sub, state, manifest in items:
            write_adapter(tmp / sub, dict(state), dict(manifest))
            read_adapter(tmp / sub)  # read back: every checksum verified before anything is moved in
        done = []
        for sub, _, _ in items:
            (out / sub).mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS, MANIFEST):
                os.replace(tmp / sub / name, out / sub / name)
            done.append(out / sub if sub else out)
        return done
