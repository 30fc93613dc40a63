"""What a hostile user or a failing disk does to files, done to real files for the tests: a pickle
payload planted into a torch zip file, flipped bytes, NaN written into tensor data, and a
checkpoint manifest recomputed so that only the content check can catch the change."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

from mosa_scale.ckpt.manifest import MANIFEST_NAME, digest_files, read_manifest


def plant_payload(path: str | Path, marker: str | Path) -> None:
    """Puts ``exec("open(marker, 'w').write(...)")`` at the start of the file's pickle: an unsafe
    load creates ``marker`` and then returns the original content as if nothing happened."""
    path = Path(path)
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info.filename)) for info in src.infolist()]
    code = f"open({str(marker)!r}, 'w').write('payload ran')"
    payload = b"cbuiltins\nexec\n(V" + code.encode() + b"\ntR0"  # GLOBAL, MARK, UNICODE, TUPLE, REDUCE, POP
    tmp = path.with_name(path.name + ".planting")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                assert data[:2] == b"\x80\x02", data[:4]  # PROTO 2 first, then the original pickle
                data = data[:2] + payload + data[2:]
            dst.writestr(info, data)
    os.replace(tmp, path)


def data_offsets(path: str | Path) -> list[tuple[int, int]]:
    """(start, size) in the file of every tensor record of a torch zip file (``<archive>/data/<n>``)."""
    out = []
    raw = Path(path).read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
                out.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def flip_byte(path: str | Path, offset: int | None = None) -> int:
    """Flips the bits of one byte (default: the middle of the file); returns its offset."""
    path = Path(path)
    raw = bytearray(path.read_bytes())
    offset = len(raw) // 2 if offset is None else offset
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    return offset


def nan_into(path: str | Path, tensor) -> int:
    """Writes an fp32 NaN over the first value of ``tensor`` (fp32, as loaded from ``path``) inside the
    file; returns its offset."""
    path = Path(path)
    raw = bytearray(path.read_bytes())
    start = raw.find(tensor.detach().contiguous().numpy().tobytes())
    assert start >= 0 and [s for s, _ in data_offsets(path) if s == start], "tensor data not found in the file"
    raw[start : start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    return start


def refresh_manifest(tag_dir: str | Path) -> None:
    """Recomputes the sizes and sha256 of a tag's manifest, as someone altering files on purpose would."""
    tag_dir = Path(tag_dir)
    body = read_manifest(tag_dir)
    body["files"] = digest_files(tag_dir, sorted(body["files"]))
    (tag_dir / MANIFEST_NAME).write_text(json.dumps(body, indent=1, sort_keys=True))


def rewrite_adapter(adapter_dir: str | Path, tensors: dict | None = None, manifest: dict | None = None) -> None:
    """Rewrites an adapter folder with new tensors and/or manifest, every checksum and the header's
    manifest sha256 recomputed: only content checks can refuse it."""
    from safetensors.torch import load_file, save_file

    from mosa_scale.ckpt.adapter_file import MANIFEST, WEIGHTS, tensor_checksum

    d = Path(adapter_dir)
    tensors = load_file(str(d / WEIGHTS)) if tensors is None else tensors
    manifest = json.loads((d / MANIFEST).read_text()) if manifest is None else manifest
    manifest["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": tensor_checksum(v)}
        for k, v in tensors.items()
    }
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt", "manifest_sha256": hashlib.sha256(text).hexdigest()})
    (d / MANIFEST).write_bytes(text)


def set_header_shape(weights: str | Path, tensor: str, shape: list[int]) -> None:
    """Changes one tensor's shape in a safetensors header, leaving the data as it is (a lying header)."""
    weights = Path(weights)
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[tensor]["shape"] = shape
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
