"""The saved form of a MoSA layer: expert-major ranges, legacy checkpoints read as the same numbers."""

from __future__ import annotations

import pytest
import torch

from mosa_scale.ckpt import merge_state_dict
from mosa_scale.sparse import Router, SparseExpertLinear
from mosa_scale.sparse.layout import expert_ranges, legacy_layers, read_layer, to_current_layout


def make_layer(n: int = 3, split_bias: bool = False, out_f: int = 6, in_f: int = 5) -> SparseExpertLinear:
    w0 = torch.arange(out_f * in_f, dtype=torch.float32).reshape(out_f, in_f) + 1
    layer = SparseExpertLinear(
        w0, bias=True, num_experts=n, name="mosa_x.up", seed=7, mode="all", split_bias=split_bias, router=Router(seed=7)
    )
    with torch.no_grad():  # distinct trained values everywhere
        layer.slices.add_(torch.linspace(-1, 1, layer.slices.numel()))
        layer.biases.copy_(torch.linspace(2, 3, layer.biases.numel()))
        layer.decay.copy_(torch.tensor([0.9, 0.8, 0.7][:n]))
    return layer


@pytest.mark.parametrize("split_bias", [False, True])
def test_expert_ranges_hold_each_experts_entries_in_index_order(split_bias):
    layer = make_layer(split_bias=split_bias)
    w0 = torch.arange(30, dtype=torch.float32) + 1
    offsets = [off for off, _ in layer.ranges]
    assert offsets == sorted(offsets) and sum(n for _, n in layer.ranges) == 30
    for k, (off, n) in enumerate(layer.ranges):
        idx = torch.nonzero(layer.assign == k).reshape(-1)
        assert n == idx.numel()
        # expert k's values are W0 at its entries (plus the distinct offsets added above), in index order
        assert torch.equal(layer.expert_values(k).detach() - torch.linspace(-1, 1, 30)[off : off + n], w0[idx])
    assert [n for _, n in layer.bias_ranges] == ([2, 2, 2] if split_bias else [6, 6, 6])
    # the index tables every rank holds whole: int32, half of int64's bytes
    assert layer.order.dtype == torch.int32 and torch.equal(
        layer.order.long(), torch.argsort(layer.assign.long(), stable=True)
    )
    if split_bias:
        assert layer.bias_order.dtype == torch.int32


@pytest.mark.parametrize("split_bias", [False, True])
def test_legacy_layout_reads_as_the_same_numbers(split_bias):
    layer = make_layer(split_bias=split_bias)
    state = {f"mosa_x.{k}": v.detach() for k, v in layer.state_dict().items()}
    legacy = {k: v for k, v in state.items() if not k.endswith((".slices", ".biases", ".steps"))}
    for k, (off, n) in enumerate(layer.ranges):  # the old layout: one tensor per expert
        legacy[f"mosa_x.slice{k}"] = layer.slices.detach()[off : off + n].clone()
    for k, (off, n) in enumerate(layer.bias_ranges):
        legacy[f"mosa_x.bias{k}"] = layer.biases.detach()[off : off + n].clone()
    assert legacy_layers(legacy) == ["mosa_x"] and legacy_layers(state) == []
    converted = to_current_layout(legacy)
    assert torch.equal(converted["mosa_x.slices"], state["mosa_x.slices"])
    assert torch.equal(converted["mosa_x.biases"], state["mosa_x.biases"])
    a, b = merge_state_dict(state), merge_state_dict(legacy)
    assert a.keys() == b.keys() == {"mosa_x.weight", "mosa_x.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    w, bias = layer.merged()
    assert torch.equal(a["mosa_x.weight"], w) and torch.equal(a["mosa_x.bias"], bias)


def test_read_layer_names_missing_and_inconsistent_tensors():
    state = {f"mosa_x.{k}": v.detach() for k, v in make_layer().state_dict().items()}
    with pytest.raises(KeyError, match="mosa_x.decay"):
        read_layer({k: v for k, v in state.items() if k != "mosa_x.decay"}, "mosa_x")
    with pytest.raises(ValueError, match="slices has 29 values for dims"):
        read_layer({**state, "mosa_x.slices": state["mosa_x.slices"][:-1]}, "mosa_x")
    with pytest.raises(ValueError, match="partition names expert 3"):
        expert_ranges(torch.tensor([0, 1, 3], dtype=torch.int8), 3)
