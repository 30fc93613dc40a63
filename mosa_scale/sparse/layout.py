"""The saved form of a MoSA layer: its tensor names, where each expert's values sit, and reading it
back from any state dict (a live model's, a consolidated checkpoint's, an unmerged adapter file's).

A MoSA layer ``P`` (a :class:`~mosa_scale.sparse.linear.SparseExpertLinear`) holds

============== =========================== ==================================================
name            shape / dtype               what
============== =========================== ==================================================
``P.slices``    ``(out*in,)`` trainable     every expert's trained values, expert-major: expert
                                            k's entries (``assign == k``, increasing flat
                                            index) are the contiguous range ``ranges[k]``
``P.biases``    ``(N*out,)`` trainable      expert k's bias is ``[k*out, (k+1)*out)``; with a
                or ``(out,)``               split bias, expert k's share of one bias vector,
                                            expert-major like ``slices``
``P.base``      ``(out*in,)`` or ``(0,)``   W0 (empty when W0 is zero, e.g. Up)
``P.assign``    ``(out*in,)`` int8          the seeded partition (MOSA_SPEC section 2)
``P.decay``     ``(N,)`` fp32               s_k: what weight decay left of W0 off expert k's mask
``P.steps``     ``(N,)`` int64              optimizer steps expert k took (its bias correction)
``P.dims``      ``(2,)`` int64              ``(out, in)``
``P.bias_assign`` ``(out,)`` int8           only with a split bias
============== =========================== ==================================================

One tensor per split weight keeps the optimizer's param groups (and DeepSpeed's collectives) those
of a dense adapter; the optimizer finds expert k's elements by :func:`expert_ranges`.

``assign`` and ``bias_assign`` are the seeded partitions :func:`weight_partition` and
:func:`bias_partition` give the layer's name (a layer builds them; a checkpoint check recomputes
them). A merged state holds none of the layer's own names (:func:`holds_unmerged`).

Checkpoints written before this layout held one parameter per expert (``P.slice{k}``,
``P.bias{k}``; the optimizer param group of each had the same name) and no ``steps``;
:func:`to_current_layout` reads them (offline tools), :func:`legacy_slice` names a legacy param
group's layer and expert, and :func:`legacy_layers` lets a resume refuse them with a clear message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from mosa_scale.sparse.partition import partition

SLICES, BIASES = "slices", "biases"
PARAMS = (SLICES, BIASES)
BUFFERS = ("base", "assign", "decay", "steps", "dims", "bias_assign")
NOT_IN_LEGACY = ("steps",)  # the legacy layout kept per-expert step counts in the optimizer
_LEGACY = re.compile(r"^(slice|bias)(\d+)$")
# names only an unmerged MoSA layer has (current or legacy); a merged state has weight/bias instead
_UNMERGED = re.compile(rf"\.({SLICES}|slice\d+|assign|decay|dims|steps)$")
T = TypeVar("T")


def weight_partition(dims: tuple[int, int], num_experts: int, *, seed: int, name: str, mode: str) -> torch.Tensor:
    """The ``assign`` buffer of the MoSA layer ``name`` (flat int8): its weight's seeded partition."""
    return partition(tuple(dims), num_experts, seed=seed, name=f"{name}.weight", mode=mode).reshape(-1)


def bias_partition(out_features: int, num_experts: int, *, seed: int, name: str) -> torch.Tensor:
    """The ``bias_assign`` buffer of the MoSA layer ``name`` with a split bias (ranked as a whole)."""
    return partition((out_features,), num_experts, seed=seed, name=f"{name}.bias", mode="all")


def expert_sizes(assign: torch.Tensor, num_experts: int) -> list[int]:
    """Entries per expert (more than N counts when the partition names an expert >= N)."""
    return torch.bincount(assign.reshape(-1).long(), minlength=num_experts).tolist()


def expert_ranges(assign: torch.Tensor, num_experts: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of every expert's values in the expert-major layout."""
    counts = expert_sizes(assign, num_experts)
    if len(counts) > num_experts:
        raise ValueError(f"the partition names expert {len(counts) - 1}, but the layer has {num_experts} experts")
    offsets = [sum(counts[:k]) for k in range(num_experts)]
    return list(zip(offsets, counts))


def expert_order(assign: torch.Tensor) -> torch.Tensor:
    """Flat indices sorted by expert, then by index: ``slices[i]`` is the entry ``order[i]``.

    int32 where the indices fit (every rank holds this table for every MoSA layer: 59 MB of
    int64 on EVA02-E-14 at r 64)."""
    order = torch.argsort(assign.reshape(-1).long(), stable=True)
    return order.to(torch.int32) if assign.numel() <= torch.iinfo(torch.int32).max + 1 else order


def bias_ranges(out_features: int, num_experts: int, bias_assign: torch.Tensor | None) -> list[tuple[int, int]]:
    """``(offset, length)`` of every expert's bias values in ``biases``."""
    if bias_assign is not None:
        return expert_ranges(bias_assign, num_experts)
    return [(k * out_features, out_features) for k in range(num_experts)]


def scatter_expert_major(values: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Expert-major values back to flat index order (fp32): ``out[order[i]] = values[i]``."""
    out = torch.zeros(assign.numel(), dtype=torch.float32, device=values.device)
    out[expert_order(assign).to(values.device)] = values.float()
    return out


@dataclass
class SavedLayer:
    """One MoSA layer read from a state dict (see the module docstring for the names)."""

    prefix: str
    slices: torch.Tensor
    biases: torch.Tensor | None
    base: torch.Tensor
    assign: torch.Tensor
    decay: torch.Tensor
    dims: tuple[int, int]
    steps: torch.Tensor | None = None
    bias_assign: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.decay.numel())

    def ranges(self) -> list[tuple[int, int]]:
        return expert_ranges(self.assign, self.num_experts)

    def bias_ranges(self) -> list[tuple[int, int]]:
        return bias_ranges(self.dims[0], self.num_experts, self.bias_assign)


def layer_prefixes(state: Mapping[str, object]) -> list[str]:
    """Qualified names of the MoSA layers in a state (found by their ``assign`` buffer)."""
    return sorted(k[: -len(".assign")] for k in state if k.endswith(".assign") and not k.endswith(".bias_assign"))


def layer_keys(state: Mapping[str, object], prefix: str) -> list[str]:
    """Every key of ``state`` that belongs to the MoSA layer ``prefix`` (current or legacy names)."""
    out = []
    for k in state:
        if k.startswith(prefix + "."):
            leaf = k[len(prefix) + 1 :]
            if leaf in PARAMS or leaf in BUFFERS or _LEGACY.match(leaf):
                out.append(k)
    return out


def holds_unmerged(keys: Iterable[str]) -> bool:
    """Whether any of ``keys`` is a name only an unmerged MoSA layer has (current or legacy layout)."""
    return any(_UNMERGED.search(k) for k in keys)


def legacy_slice(name: str) -> tuple[str, int] | None:
    """``(layer, k)`` for a legacy expert-weight name ``P.slice{k}`` (a parameter, or its param group);
    None for any other name."""
    layer, _, leaf = name.rpartition(".")
    m = _LEGACY.match(leaf)
    return (layer, int(m[2])) if m and m[1] == "slice" else None


def legacy_structure(shapes: Mapping[str, T]) -> dict[str, T]:
    """The entries of a current-layout structure that a legacy checkpoint holds once
    :func:`to_current_layout` converted it (it had no per-expert ``steps`` buffer)."""
    prefixes = layer_prefixes(shapes)
    absent = {f"{p}.{leaf}" for p in prefixes for leaf in NOT_IN_LEGACY}
    return {k: v for k, v in shapes.items() if k not in absent}


def legacy_layers(state: Mapping[str, object]) -> list[str]:
    """MoSA layers of ``state`` stored in the old one-parameter-per-expert layout."""
    return [p for p in layer_prefixes(state) if f"{p}.slice0" in state and f"{p}.{SLICES}" not in state]


def to_current_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every legacy MoSA layer (``slice{k}``/``bias{k}``) rewritten in the current
    layout; the values are the same numbers, concatenated expert-major. Other keys pass through."""
    out = dict(state)
    for p in legacy_layers(state):
        n = 0
        while f"{p}.slice{n}" in state:
            n += 1
        out[f"{p}.{SLICES}"] = torch.cat([state[f"{p}.slice{k}"].reshape(-1) for k in range(n)])
        if f"{p}.bias0" in state:
            out[f"{p}.{BIASES}"] = torch.cat([state[f"{p}.bias{k}"].reshape(-1) for k in range(n)])
        for k in range(n):
            out.pop(f"{p}.slice{k}", None)
            out.pop(f"{p}.bias{k}", None)
    return out


def read_layer(state: Mapping[str, torch.Tensor], prefix: str) -> SavedLayer:
    """The MoSA layer ``prefix`` of ``state`` (legacy layouts are converted).

    Raises:
        KeyError: naming the missing tensors when the layer is incomplete.
        ValueError: when its tensors disagree in size.
    """
    if f"{prefix}.slice0" in state and f"{prefix}.{SLICES}" not in state:
        state = to_current_layout({k: state[k] for k in layer_keys(state, prefix)})
    need = [f"{prefix}.{x}" for x in (SLICES, "base", "assign", "decay", "dims")]
    missing = [k for k in need if k not in state]
    if missing:
        raise KeyError(f"MoSA layer {prefix!r} is incomplete: missing {', '.join(missing)}")
    dims_t = state[f"{prefix}.dims"]
    dims = (int(dims_t[0]), int(dims_t[1]))
    layer = SavedLayer(
        prefix=prefix,
        slices=state[f"{prefix}.{SLICES}"].reshape(-1),
        biases=state[f"{prefix}.{BIASES}"].reshape(-1) if f"{prefix}.{BIASES}" in state else None,
        base=state[f"{prefix}.base"].reshape(-1),
        assign=state[f"{prefix}.assign"].reshape(-1),
        decay=state[f"{prefix}.decay"].reshape(-1),
        dims=dims,
        steps=state.get(f"{prefix}.steps"),
        bias_assign=state.get(f"{prefix}.bias_assign"),
    )
    entries = dims[0] * dims[1]
    problems = []
    if layer.assign.numel() != entries:
        problems.append(f"assign has {layer.assign.numel()} entries for dims {dims}")
    if layer.slices.numel() != entries:
        problems.append(f"slices has {layer.slices.numel()} values for dims {dims}")
    if layer.base.numel() not in (0, entries):
        problems.append(f"base has {layer.base.numel()} values for dims {dims}")
    if layer.biases is not None:
        want = dims[0] if layer.bias_assign is not None else dims[0] * layer.num_experts
        if layer.biases.numel() != want:
            problems.append(f"biases has {layer.biases.numel()} values, expected {want}")
    if layer.steps is not None and layer.steps.numel() != layer.num_experts:
        problems.append(f"steps has {layer.steps.numel()} counts for {layer.num_experts} experts")
    if problems:
        raise ValueError(f"MoSA layer {prefix!r} is inconsistent: " + "; ".join(problems))
    return layer
