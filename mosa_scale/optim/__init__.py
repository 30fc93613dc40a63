"""Optimizer param groups and the slice-aware AdamW."""

from mosa_scale.optim.adamw import MoSAAdamW
from mosa_scale.optim.groups import build_param_groups, sparse_layers

__all__ = ["MoSAAdamW", "build_param_groups", "sparse_layers"]
