"""Optimizer param groups, the slice-aware AdamW and the learning-rate schedule."""

from mosa_scale.optim.adamw import MoSAAdamW
from mosa_scale.optim.groups import build_param_groups, sparse_layers
from mosa_scale.optim.schedule import warmup_cosine

__all__ = ["MoSAAdamW", "build_param_groups", "sparse_layers", "warmup_cosine"]
