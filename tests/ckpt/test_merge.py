"""Merge (MOSA_SPEC section 5) against the expectation over expert choices."""

import logging

import torch
from tiny_models import Classifier, batches, make_tower
from train_util import train_steps

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict
from mosa_scale.optim import MoSAAdamW, sparse_layers
from mosa_scale.sparse import Router

log = logging.getLogger(__name__)


def trained(cfg, steps=15, depth=1, seed=3407):
    router = Router(seed=seed)
    tower = make_tower(depth=depth)
    model = Classifier(tower, 32)
    inject_adapters(tower, tower.sites(), cfg, seed=seed, router=router, width=32)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.05, lr=2e-2)
    train_steps(model, router, opt, batches(steps))
    return model, router


def block_output(model, x):
    """The output of the (only) block: the residual stream with the adapter's term in it."""
    seen = []
    handle = model.tower.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def enumerate_outputs(model, router, x):
    """Training-time block outputs for every joint expert choice (1-block model), and their mean."""
    layers = sorted(sparse_layers(model).values(), key=lambda m: m.route_id)
    sizes = [m.num_experts for m in layers]
    outs = []
    for combo in torch.cartesian_prod(*[torch.arange(n) for n in sizes]).reshape(-1, len(sizes)):
        with router.use(combo):
            outs.append(block_output(model, x))
    return torch.stack(outs).mean(0)


def test_merge_of_up_only_split_equals_expected_output():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="down", dropout=0.0)
    model, router = trained(cfg)
    x, _ = batches(1, seed=5)[0]
    expected = enumerate_outputs(model, router, x)
    model.eval()
    merged = block_output(model, x)
    assert (merged - expected).abs().max().item() <= 1e-6
    # and the merged state loads into a plain dense adapter that gives the same output
    dense_tower = make_tower(depth=1)
    dense = Classifier(dense_tower, 32)
    inject_adapters(
        dense_tower,
        dense_tower.sites(),
        AdapterConfig(method="parallel", bottleneck=8, num_experts=1, dropout=0.0),
        seed=3407,
        router=None,
        width=32,
    )
    missing, unexpected = dense.load_state_dict(merge_state_dict(adapter_state_dict(model)), strict=False)
    assert not unexpected and all("mosa_" not in k for k in missing)
    assert not sparse_layers(dense)
    dense.eval()
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max().item() <= 1e-6


def test_merge_with_down_split_is_the_expected_weight():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, router = trained(cfg)
    for layer in sparse_layers(model).values():
        expected_w = torch.stack([layer.expert_weight(k)[0].detach() for k in range(4)]).mean(0)
        expected_b = torch.stack([layer.expert_weight(k)[1].detach() for k in range(4)]).mean(0)
        w, b = layer.merged()
        assert (w - expected_w).abs().max().item() <= 1e-6
        assert (b - expected_b).abs().max().item() <= 1e-6
    x, _ = batches(1, seed=5)[0]
    expected = enumerate_outputs(model, router, x)
    model.eval()
    gap = (block_output(model, x) - expected).abs().max().item()
    log.warning("merge with Down split: |merged output - expected output| max = %.3e (nonlinearity)", gap)
    assert gap > 1e-7  # not the expected output: GELU sits between the split Down and Up


def test_merge_is_pure_and_reports_incomplete_layers():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=2, share="none", dropout=0.0)
    model, _ = trained(cfg, steps=3)
    state = adapter_state_dict(model)
    snapshot = {k: v.clone() for k, v in state.items()}
    a, b = merge_state_dict(state), merge_state_dict(state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
    assert not any(k.endswith((".assign", ".slices", ".biases", ".decay", ".steps")) for k in a)
    broken = {k: v for k, v in state.items() if not k.endswith("up.decay")}
    try:
        merge_state_dict(broken)
    except KeyError as e:
        assert "up.decay" in str(e)
    else:
        raise AssertionError("an incomplete layer must be refused")
