"""Merge (MOSA_SPEC section 5): trained MoSA state -> one plain dense adapter state."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from mosa_scale.adapters.factory import is_adapter_name
from mosa_scale.sparse.linear import merged_weight_and_bias

_MOSA_KEY = re.compile(r"^(slice\d+|bias\d+|base|assign|decay|dims|bias_assign)$")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (parameters and persistent buffers) selected by the name contract."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter_name(k)}


def merge_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merges every MoSA layer in ``state`` into ``weight``/``bias``; other tensors pass through.

    A pure function of the trained state: each layer ``P`` is found by its ``P.assign`` buffer,
    with slices ``P.slice{k}``, biases ``P.bias{k}``, ``P.base``, ``P.decay`` and ``P.dims``.

    Raises:
        KeyError: naming the missing tensor when a MoSA layer is incomplete.
    """
    prefixes = sorted(k[: -len(".assign")] for k in state if k.endswith(".assign") and not k.endswith(".bias_assign"))
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for p in prefixes:
        n = 0
        while f"{p}.slice{n}" in state:
            n += 1
        need = [f"{p}.{x}" for x in ("base", "decay", "dims")] + [f"{p}.slice0"]
        missing = [k for k in need if k not in state]
        if missing:
            raise KeyError(f"MoSA layer {p!r} is incomplete: missing {', '.join(missing)}")
        has_bias = f"{p}.bias0" in state
        dims = tuple(int(d) for d in state[f"{p}.dims"])
        weight, bias = merged_weight_and_bias(
            [state[f"{p}.slice{k}"] for k in range(n)],
            [state[f"{p}.bias{k}"] for k in range(n)] if has_bias else None,
            base=state[f"{p}.base"], assign=state[f"{p}.assign"].reshape(-1), decay=state[f"{p}.decay"],
            dims=(dims[0], dims[1]), bias_assign=state.get(f"{p}.bias_assign"),
        )
        out[f"{p}.weight"] = weight
        if bias is not None:
            out[f"{p}.bias"] = bias
        consumed.update(k for k in state if k.startswith(p + ".") and _MOSA_KEY.match(k[len(p) + 1:]))
    for k, v in state.items():
        if k not in consumed:
            out[k] = v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
    return out
