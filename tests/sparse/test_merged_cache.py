"""Eval mode keeps the merged weight while its inputs are unchanged; any change or train() drops it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mosa_scale.sparse import Router, SparseExpertLinear


def layer(split_bias: bool = False, seed: int = 0) -> SparseExpertLinear:
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))
    m = SparseExpertLinear(
        w,
        bias=True,
        num_experts=3,
        name="blk.down",
        seed=seed,
        mode="all",
        split_bias=split_bias,
        router=Router(seed=0),
    )
    with torch.no_grad():
        m.slices.normal_(generator=torch.Generator().manual_seed(seed + 1))
        m.biases.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return m


@pytest.mark.parametrize("split_bias", [False, True])
def test_merged_weight_is_kept_in_eval_and_refreshed_on_any_change(split_bias):
    m = layer(split_bias).eval()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(9))
    w1, b1 = m.weight_and_bias()
    w2, b2 = m.weight_and_bias()
    assert w2 is w1 and b2 is b1  # computed once
    want_w, want_b = m.merged()
    assert torch.equal(w1, want_w) and torch.equal(b1, want_b)
    assert torch.equal(m(x), F.linear(x, want_w, want_b))

    with torch.no_grad():  # an in-place change of an input
        m.slices.mul_(2.0)
    w3, _ = m.weight_and_bias()
    assert w3 is not w1 and torch.equal(w3, m.merged()[0]) and not torch.equal(w3, w1)
    with torch.no_grad():
        m.decay[1] = 0.5
    assert torch.equal(m.weight_and_bias()[0], m.merged()[0]) and not torch.equal(m.weight_and_bias()[0], w3)

    other = layer(split_bias, seed=5)
    m.load_state_dict(other.state_dict())  # loading in eval mode
    assert torch.equal(m.weight_and_bias()[0], other.eval().merged()[0])
    assert torch.equal(m.weight_and_bias()[1], other.merged()[1])


def test_train_drops_the_merged_weight():
    m = layer().eval()
    w1, _ = m.weight_and_bias()
    m.train()
    assert m._merged_cache is None
    m.eval()
    w2, _ = m.weight_and_bias()
    assert w2 is not w1 and torch.equal(w2, w1)
