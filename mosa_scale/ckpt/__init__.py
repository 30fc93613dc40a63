"""Checkpoints, adapter files, consolidation and merge."""

from mosa_scale.ckpt.adapter_file import read_adapter, write_adapter
from mosa_scale.ckpt.merge import adapter_state_dict, merge_state_dict

__all__ = ["adapter_state_dict", "merge_state_dict", "read_adapter", "write_adapter"]
