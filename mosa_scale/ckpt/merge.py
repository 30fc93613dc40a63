"""Merge (MOSA_SPEC section 5): trained MoSA state -> one plain dense adapter state."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mosa_scale.adapters.factory import is_adapter_name
from mosa_scale.sparse.layout import layer_keys, layer_prefixes, read_layer
from mosa_scale.sparse.linear import merged_weight_and_bias


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (parameters and persistent buffers) selected by the name contract."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter_name(k)}


def merge_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merges every MoSA layer in ``state`` into ``weight``/``bias``; other tensors pass through.

    A pure function of the trained state: each layer ``P`` is found by its ``P.assign`` buffer and
    read through :func:`mosa_scale.sparse.layout.read_layer` (the saved form's one home; layers
    saved in the legacy one-parameter-per-expert layout are read too).

    Raises:
        KeyError: naming the missing tensor when a MoSA layer is incomplete.
        ValueError: when a layer's tensors disagree in size.
    """
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for p in layer_prefixes(state):
        layer = read_layer(state, p)
        weight, bias = merged_weight_and_bias(
            layer.slices,
            layer.biases,
            base=layer.base,
            assign=layer.assign,
            decay=layer.decay,
            dims=layer.dims,
            bias_assign=layer.bias_assign,
        )
        out[f"{p}.weight"] = weight
        if bias is not None:
            out[f"{p}.bias"] = bias
        consumed.update(layer_keys(state, p))
    for k, v in state.items():
        if k not in consumed:
            out[k] = v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
    return out
