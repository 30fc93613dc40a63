"""Offline consolidation: a sharded DeepSpeed checkpoint (any ZeRO stage, any world size) -> one
checked, merged adapter, in one CPU process.

The steps each have their own module: :mod:`~mosa_scale.ckpt.zero_reader` verifies the tag's files
and reads them weights-only into full fp32 tensors; :mod:`~mosa_scale.ckpt.verify` checks them
against the run config; :mod:`~mosa_scale.ckpt.merge` merges the MoSA layers (through
:mod:`mosa_scale.sparse.layout`); :mod:`~mosa_scale.ckpt.adapter_file` writes the adapter folders
atomically. Nothing is written unless every check passed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mosa_scale.ckpt.adapter_file import write_adapters_atomically
from mosa_scale.ckpt.merge import merge_state_dict
from mosa_scale.ckpt.safe_load import CheckpointError
from mosa_scale.ckpt.verify import Skeleton, build_skeleton, check_checkpoint, load_config_file
from mosa_scale.ckpt.zero_reader import ZeroCheckpoint, read_zero_checkpoint, run_dir_of
from mosa_scale.config.loader import to_plain
from mosa_scale.config.run import RunConfig
from mosa_scale.model.assembly import HEAD_PREFIX

log = logging.getLogger(__name__)


@dataclass
class ConsolidationResult:
    """Where :func:`consolidate` wrote, what it read, and whether the structure was checked."""

    merged_dir: Path
    unmerged_dir: Path | None
    checkpoint: ZeroCheckpoint
    skeleton_checked: bool


def adapter_manifest(
    cfg: RunConfig, ckpt: ZeroCheckpoint, num_classes: int, skeleton: Skeleton | None
) -> dict[str, Any]:
    """What an adapter file records about the run and checkpoint it was made from."""
    family = cfg.model.family
    source = cfg.model.pretrained or "random"
    if family != "openclip" and cfg.model.pretrained is not None:
        source = str(Path(cfg.model.pretrained).expanduser())
    return {
        "config": to_plain(cfg),
        "backbone": {"name": skeleton.backbone_name if skeleton else family, "source": source, "family": family},
        "num_classes": num_classes,
        "step": ckpt.step,
        "checkpoint": {"tag": ckpt.path.name, "zero_stage": ckpt.stage, "world_size": ckpt.world_size},
    }


def consolidate(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    tag: str | None = None,
    unmerged: bool = False,
    unverified: bool = False,
) -> ConsolidationResult:
    """Checkpoint -> checked, merged adapter in ``out_dir`` (plus ``out_dir/unmerged`` if asked).

    Args:
        checkpoint: A run directory, its ``checkpoints/`` folder, or one tag folder.
        out_dir: Where ``adapter.safetensors`` and ``adapter_config.json`` go.
        config: Run config YAML the checkpoint must match (default: the run's config.yaml).
        tag: Checkpoint tag (default: ``latest``).
        unmerged: Also write the trained (unmerged MoSA) state to ``out_dir/unmerged`` for
            further training.
        unverified: Accept a tag without a manifest (see
            :func:`~mosa_scale.ckpt.zero_reader.read_zero_checkpoint`).

    Raises:
        CheckpointError: a missing, truncated or inconsistent checkpoint.
        CheckpointMismatch: the config or the partition does not match.
        ConfigError: an invalid config file.
    """
    ckpt = read_zero_checkpoint(checkpoint, tag=tag, unverified=unverified)
    run = run_dir_of(ckpt.path)
    run_cfg = load_config_file(run / "config.yaml") if run is not None else None
    if config is None and run_cfg is None:
        raise CheckpointError(
            f"{ckpt.path}: no config.yaml in the run directory above it; pass --config FILE.yaml "
            "(the run config it was trained with)"
        )
    cfg = load_config_file(config) if config is not None else run_cfg
    assert cfg is not None
    state = ckpt.trained_state()
    head = state.get(f"{HEAD_PREFIX}weight")
    num_classes = int(head.shape[0]) if head is not None else cfg.data.num_classes
    if num_classes is None:
        raise CheckpointError(
            "the number of classes is unknown: the checkpoint has no linear head; set data.num_classes"
        )
    skeleton = build_skeleton(cfg, num_classes)
    if skeleton is None:
        log.warning(
            "backbone %s is not available here: the structure check is skipped (partition, routing and "
            "config checks still run)",
            cfg.model.pretrained,
        )
    check_checkpoint(ckpt, cfg, run_cfg=run_cfg if config is not None else None, skeleton=skeleton)
    manifest = adapter_manifest(cfg, ckpt, num_classes, skeleton)
    items: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, Any]]] = [
        ("", merge_state_dict(state), {**manifest, "format": "merged"})
    ]
    if unmerged:
        items.append(("unmerged", state, {**manifest, "format": "unmerged"}))
    dirs = write_adapters_atomically(out_dir, items)
    log.info(
        "merged adapter of %s (ZeRO-%d, %d ranks, step %s) written to %s",
        ckpt.path,
        ckpt.stage,
        ckpt.world_size,
        ckpt.step,
        dirs[0],
    )
    return ConsolidationResult(
        merged_dir=dirs[0],
        unmerged_dir=dirs[1] if unmerged else None,
        checkpoint=ckpt,
        skeleton_checked=skeleton is not None,
    )
