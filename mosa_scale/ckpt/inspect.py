"""What a checkpoint or adapter holds: keys, shapes, parameter counts, partitions, expert activity.

Reads the same files the tools read, the same way (safetensors; DeepSpeed files weights-only),
and returns plain JSON-able dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mosa_scale.ckpt.adapter_file import MANIFEST, WEIGHTS, read_adapter
from mosa_scale.ckpt.safe_load import load_weights_only
from mosa_scale.ckpt.zero_reader import read_zero_checkpoint
from mosa_scale.model.assembly import HEAD_PREFIX
from mosa_scale.sparse.layout import expert_sizes, layer_prefixes, legacy_slice, read_layer

log = logging.getLogger(__name__)
RANK_STATE = "rank*_state.pt"  # per-rank RNG + data position (numpy objects): listed, not unpickled


def tensor_table(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "numel": v.numel()}
        for k, v in sorted(state.items())
    }


def partition_stats(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per MoSA layer: N, entries, entries per expert (sizes differ by at most one when the
    partition is sound), decay factors s_k, optimizer steps per expert and how biases are held."""
    out = {}
    for p in layer_prefixes(state):
        layer = read_layer(state, p)
        n = layer.num_experts
        sizes = expert_sizes(layer.assign, n)
        out[p] = {
            "experts": n,
            "dims": list(layer.dims),
            "entries": layer.assign.numel(),
            "entries_per_expert": sizes,
            "balanced": max(sizes) - min(sizes) <= 1,
            "slices_match_partition": layer.slices.numel() == sum(sizes),
            "decay": [float(x) for x in layer.decay],
            "steps": None if layer.steps is None else [int(x) for x in layer.steps],
            "bias": None if layer.biases is None else ("split" if layer.bias_assign is not None else "per-expert"),
            "w0": "zero" if layer.base.numel() == 0 else "stored",
        }
    return out


def expert_activations(state: Mapping[str, torch.Tensor], group_steps: Mapping[str, int]) -> dict[str, list[int]]:
    """Optimizer steps each expert took, per layer: the layers' ``steps`` buffers; for a checkpoint in
    the legacy layout (one param group per slice) the steps of each slice's group."""
    layers = [read_layer(state, p) for p in layer_prefixes(state)]
    out = {layer.prefix: [int(x) for x in layer.steps] for layer in layers if layer.steps is not None}
    legacy: dict[str, dict[int, int]] = {}
    for name, steps in group_steps.items():
        found = legacy_slice(name)
        if found is not None:
            legacy.setdefault(found[0], {})[found[1]] = int(steps)
    out.update({layer: [ks[k] for k in sorted(ks)] for layer, ks in legacy.items() if layer not in out})
    return dict(sorted(out.items()))


def _counts(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    floats = [v for v in state.values() if v.is_floating_point()]
    return {
        "tensors": len(state),
        "float_values": sum(v.numel() for v in floats),
        "head_values": sum(v.numel() for k, v in state.items() if k.startswith(HEAD_PREFIX)),
    }


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """An adapter directory (or its ``adapter.safetensors``): manifest summary, checksums, tensors."""
    d = Path(path)
    d = d.parent if d.name in (WEIGHTS, MANIFEST) else d
    state, manifest = read_adapter(d)  # raises on a checksum mismatch
    cfg = manifest.get("config", {})
    fmt = manifest.get("format") or ("unmerged" if layer_prefixes(state) else "merged")
    return {
        "kind": "adapter",
        "path": str(d),
        "format": fmt,
        "checksums": "ok",
        "method": cfg.get("adapter", {}).get("method"),
        "backbone": manifest.get("backbone"),
        "num_classes": manifest.get("num_classes"),
        "step": manifest.get("step"),
        "mosa_scale_version": manifest.get("mosa_scale_version"),
        "counts": _counts(state),
        "partitions": partition_stats(state),
        "tensors": tensor_table(state),
    }


def inspect_deepspeed(path: str | Path, tag: str | None = None, *, unverified: bool = False) -> dict[str, Any]:
    """A DeepSpeed checkpoint (run dir, checkpoints/ folder or tag folder), consolidated
    (``unverified``: see :func:`~mosa_scale.ckpt.zero_reader.read_zero_checkpoint`)."""
    ck = read_zero_checkpoint(path, tag=tag, unverified=unverified)
    state = ck.trained_state()
    return {
        "kind": "deepspeed",
        "path": str(ck.path),
        "tag": ck.path.name,
        "zero_stage": ck.stage,
        "world_size": ck.world_size,
        "step": ck.step,
        "router": ck.router,
        "files": ck.files,
        "counts": {
            "trainable_values": sum(v.numel() for v in ck.params.values()),
            "trainable_tensors": len(ck.params),
            "buffer_tensors": len(ck.buffers),
            "head_values": sum(v.numel() for k, v in ck.params.items() if k.startswith(HEAD_PREFIX)),
        },
        "partitions": partition_stats(state),
        "expert_activations": expert_activations(state, ck.group_steps),
        "tensors": tensor_table({**ck.buffers, **ck.params}),
    }


def _tree(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    if isinstance(obj, torch.Tensor):
        return {prefix or "<root>": {"shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", "")}}
    if isinstance(obj, Mapping) and depth < 6:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_tree(v, f"{prefix}.{k}" if prefix else str(k), depth + 1))
        return out
    if isinstance(obj, (list, tuple)) and depth < 6 and len(obj) <= 64:
        out = {}
        for i, v in enumerate(obj):
            out.update(_tree(v, f"{prefix}.{i}" if prefix else str(i), depth + 1))
        return out
    return {prefix or "<root>": type(obj).__name__ if isinstance(obj, (Mapping, list, tuple)) else repr(obj)[:120]}


def inspect_path(path: str | Path, *, tag: str | None = None, unverified: bool = False) -> dict[str, Any]:
    """Dispatches on what ``path`` is: adapter folder/file, DeepSpeed checkpoint, or one ``.pt`` file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: for a damaged or incomplete checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if (p.is_dir() and (p / WEIGHTS).is_file()) or p.name in (WEIGHTS, MANIFEST):
        return inspect_adapter(p)
    if p.is_dir() and (p / "adapter" / WEIGHTS).is_file() and not (p / "checkpoints").is_dir():
        return inspect_adapter(p / "adapter")
    if p.is_file() and p.suffix == ".pt":
        if p.match(RANK_STATE):
            return {
                "kind": "rank_state",
                "path": str(p),
                "bytes": p.stat().st_size,
                "note": "per-rank RNG and data position for resuming; not needed to consolidate or merge",
            }
        return {"kind": "torch_file", "path": str(p), "bytes": p.stat().st_size, "entries": _tree(load_weights_only(p))}
    return inspect_deepspeed(p, tag=tag, unverified=unverified)
