"""Checkpoints, adapter files, consolidation and merge.

``zero_reader`` reads DeepSpeed checkpoint tags, ``verify`` checks them, ``consolidate`` turns one
into an adapter file (``adapter_file``); ``merge``, ``inspect`` and ``export`` read MoSA layers
only through :mod:`mosa_scale.sparse.layout`.
"""

from mosa_scale.ckpt.adapter_file import read_adapter, write_adapter
from mosa_scale.ckpt.consolidate import consolidate
from mosa_scale.ckpt.export import attach_merged_adapter, export_peft, fold_lora
from mosa_scale.ckpt.inspect import inspect_path
from mosa_scale.ckpt.merge import adapter_state_dict, merge_state_dict
from mosa_scale.ckpt.safe_load import CheckpointError
from mosa_scale.ckpt.verify import CheckpointMismatch
from mosa_scale.ckpt.zero_reader import ZeroCheckpoint, read_zero_checkpoint

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
