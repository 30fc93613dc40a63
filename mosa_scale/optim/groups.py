"""Param groups: the two groups a dense adapter has (decay, no decay), whatever N and the depth."""

from __future__ import annotations

from typing import Any

from torch import nn

from mosa_scale.adapters.inject import trainable_named_parameters
from mosa_scale.sparse.linear import SparseExpertLinear


def sparse_layers(model: nn.Module) -> dict[str, SparseExpertLinear]:
    """Every MoSA layer of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseExpertLinear)}


def build_param_groups(model: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups for :class:`~mosa_scale.optim.adamw.MoSAAdamW` (and DeepSpeed's ZeRO).

    Weight decay applies to matrices and to MoSA weight values (``slices``); biases, MoSA
    ``biases`` and norms get none. A MoSA layer's experts live inside its tensors, so the groups
    (and ZeRO's per-group collectives) are those of the dense adapter of the same shape; the
    optimizer steps each expert's range on its own.

    Returns:
        Up to two groups ``{"params", "weight_decay", "name"}``: ``decay`` and ``no_decay``.
    """
    sparse = sparse_layers(model)
    slices = {id(m.slices) for m in sparse.values()}
    biases = {id(m.biases) for m in sparse.values() if m.has_bias}
    decay, no_decay = [], []
    for _, p in trainable_named_parameters(model):
        if id(p) in slices or (id(p) not in biases and p.ndim >= 2):
            decay.append(p)
        else:
            no_decay.append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups
