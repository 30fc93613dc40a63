"""Param groups: one per MoSA slice (tagged with its (route, expert) key), plus dense groups."""

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

    Each MoSA slice is its own group so that a slice no rank used can be skipped whole: ZeRO keeps
    group dicts (and their extra keys) and steps its flat partitions group by group. Weight decay
    applies to matrices and weight slices; biases, bias slices and norms get none.

    Returns:
        Groups ``{"params", "weight_decay", "name"}``; slice groups add ``mosa_key`` =
        ``(route_id, expert)`` and ``mosa_decay`` (True for weight slices, whose off-mask entries
        the reference decays).
    """
    sparse = sparse_layers(model)
    in_sparse = {id(p) for m in sparse.values() for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in trainable_named_parameters(model):
        if id(p) not in in_sparse:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "dense_decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "dense_no_decay"})
    for name, layer in sparse.items():
        for k in range(layer.num_experts):
            key = (layer.route_id, k)
            groups.append({"params": [getattr(layer, f"slice{k}")], "weight_decay": weight_decay,
                           "name": f"{name}.slice{k}", "mosa_key": key, "mosa_decay": True})
            if layer.has_bias:
                groups.append({"params": [getattr(layer, f"bias{k}")], "weight_decay": 0.0,
                               "name": f"{name}.bias{k}", "mosa_key": key, "mosa_decay": False})
    return groups
