"""The shipped artefact: a merged dense adapter as safetensors plus a JSON manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import mosa_scale

WEIGHTS, MANIFEST = "adapter.safetensors", "adapter_config.json"


def tensor_checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def write_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Writes ``adapter.safetensors`` and ``adapter_config.json`` atomically (temp file + rename).

    The manifest gets the mosa_scale version and a sha256 of every tensor.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(state.items())}
    meta = {**manifest, "mosa_scale_version": mosa_scale.__version__,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                            "sha256": tensor_checksum(v)} for k, v in tensors.items()}}
    tmp_w, tmp_m = out / f".{WEIGHTS}.tmp", out / f".{MANIFEST}.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "mosa_scale_version": mosa_scale.__version__})
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_w, out / WEIGHTS)
    os.replace(tmp_m, out / MANIFEST)
    return out


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads an adapter directory and verifies every tensor's checksum.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: when a tensor does not match its recorded checksum.
    """
    d = Path(path)
    for name in (WEIGHTS, MANIFEST):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} does not exist")
    state = load_file(str(d / WEIGHTS))
    manifest = json.loads((d / MANIFEST).read_text())
    bad = [k for k, v in state.items() if manifest["tensors"].get(k, {}).get("sha256") != tensor_checksum(v)]
    if bad:
        raise ValueError(f"{d / WEIGHTS}: checksum mismatch for {', '.join(bad)}")
    return state, manifest
