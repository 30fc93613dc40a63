"""Injection wraps modules and is undone by remove_adapters, for every registered method."""

import pytest
import torch
from tiny_models import Classifier, batches, make_tower
from train_util import train_steps

from mosa_scale.adapters import AdapterConfig, Wrapper, inject_adapters, registered_methods, remove_adapters
from mosa_scale.optim import MoSAAdamW
from mosa_scale.sparse import Router

CASES = [(m, n, fused) for m in registered_methods() for n in (1, 4) for fused in (False, True)]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,n,fused", CASES)
def test_trained_injection_is_undone(method, n, fused):
    frozen = make_tower(fused=fused)
    tower = make_tower(fused=fused)
    modules_before = dict(tower.named_modules())
    types_before = {k: type(m) for k, m in modules_before.items()}
    router = Router(seed=0)
    cfg = AdapterConfig(method=method, bottleneck=8, num_experts=n, share="none")
    inject_adapters(tower, tower.sites(), cfg, seed=0, router=router, width=32)
    wrappers = [k for k, m in tower.named_modules() if isinstance(m, Wrapper)]
    assert wrappers
    # no hooks and no class swaps: every original module object keeps its class
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tower.modules())
    assert all(type(m) is types_before[k] for k, m in modules_before.items())
    model = Classifier(tower, 32)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.05, lr=1e-2)
    train_steps(model, router, opt, batches(2))
    assert remove_adapters(tower) == len(wrappers)
    assert same_state(tower.state_dict(), frozen.state_dict())
    assert dict(tower.named_modules()) == modules_before  # the very same module objects, back in place
    x, _ = batches(1, seed=7)[0]
    for train in (False, True):
        torch.manual_seed(0)
        frozen.train(train)
        tower.train(train)
        with torch.no_grad():
            assert torch.equal(tower(x), frozen(x))
    assert remove_adapters(tower) == 0


def test_wrappers_share_the_frozen_tensors():
    tower = make_tower(fused=True)
    mha, qkv_weight = tower.blocks[0].attn, tower.blocks[0].attn.in_proj_weight
    inject_adapters(
        tower, tower.sites(), AdapterConfig(method="lora", bottleneck=4, num_experts=1), seed=0, router=None, width=32
    )
    wrapper = tower.blocks[0].attn
    assert isinstance(wrapper, Wrapper) and wrapper.base_layer is mha
    assert wrapper.in_proj_weight is qkv_weight and wrapper.out_proj is mha.out_proj
    assert "mosa_lora_q" not in mha._modules  # the wrapped module itself is not modified
    tower.to(torch.float64)  # a conversion through the wrapper is seen by the wrapped module
    assert mha.in_proj_weight.dtype == torch.float64 and mha.in_proj_bias.dtype == torch.float64
    tower.eval()
    assert not mha.training
