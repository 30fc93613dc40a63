"""Checkpoints, adapter files, consolidation and merge."""

from mosa_scale.ckpt.adapter_file import read_adapter, write_adapter
from mosa_scale.ckpt.consolidate import (
    CheckpointError,
    CheckpointMismatch,
    ZeroCheckpoint,
    consolidate,
    read_zero_checkpoint,
)
from mosa_scale.ckpt.export import attach_merged_adapter, export_peft, fold_lora
from mosa_scale.ckpt.inspect import inspect_path
from mosa_scale.ckpt.merge import adapter_state_dict, merge_state_dict

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "ZeroCheckpoint",
    "adapter_state_dict",
    "attach_merged_adapter",
    "consolidate",
    "export_peft",
    "fold_lora",
    "inspect_path",
    "merge_state_dict",
    "read_adapter",
    "read_zero_checkpoint",
    "write_adapter",
]
