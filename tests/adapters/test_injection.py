"""Every registered method, dense and MoSA: identity at init, only adapters train."""

import pytest
import torch
from tiny_models import Classifier, batches, make_tower
from train_util import train_steps

from mosa_scale.adapters import AdapterConfig, inject_adapters, is_adapter_name, registered_methods
from mosa_scale.optim import MoSAAdamW
from mosa_scale.sparse import Router

CASES = [(m, n, fused) for m in registered_methods() for n in (1, 4) for fused in (False, True)]


@pytest.mark.parametrize("method,n,fused", CASES)
def test_identity_at_init_and_frozen_backbone(method, n, fused):
    frozen = make_tower(fused=fused)
    tower = make_tower(fused=fused)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    router = Router(seed=0)
    report = inject_adapters(
        tower,
        tower.sites(),
        AdapterConfig(method=method, bottleneck=8, num_experts=n, share="none"),
        seed=0,
        router=router,
        width=32,
    )
    assert report.rows and report.trainable == sum(p.numel() for p in tower.parameters() if p.requires_grad)
    # untouched backbone keys are all still there: pretrained state dicts load
    missing, unexpected = tower.load_state_dict(before, strict=False)
    assert not unexpected and all(is_adapter_name(k) for k in missing)
    assert all(is_adapter_name(n_) == p.requires_grad for n_, p in tower.named_parameters())
    x, y = batches(1)[0]
    router.begin_step(0)
    for train in (True, False):
        frozen.train(train)
        tower.train(train)
        with router.forward_pass(), torch.no_grad():
            assert torch.equal(tower(x), frozen(x))
    model = Classifier(tower, 32)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.05, lr=1e-2)
    adapters_before = {k: v.clone() for k, v in model.state_dict().items() if is_adapter_name(k)}
    train_steps(model, router, opt, [(x, y)] * 2)  # step 2 moves Down too (Up is non-zero after step 1)
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone bit-identical
    changed = [
        k for k, v in model.state_dict().items() if is_adapter_name(k) and not torch.equal(v, adapters_before[k])
    ]
    assert any("up" in k or ".b" in k for k in changed) and any("mosa_head" in k for k in changed)


def test_adapter_on_bf16_tower_keeps_fp32_parameters():
    tower = make_tower().to(torch.bfloat16)
    router = Router(seed=0)
    inject_adapters(tower, tower.sites(), AdapterConfig(bottleneck=8, num_experts=4), seed=0, router=router, width=32)
    assert all(p.dtype == torch.float32 for n, p in tower.named_parameters() if is_adapter_name(n))
    router.begin_step(0)
    with router.forward_pass():
        out = tower(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_blocks_and_per_depth_experts():
    tower = make_tower(depth=3)
    router = Router(seed=0)
    cfg = AdapterConfig(bottleneck=8, num_experts=4, blocks=(0, 2), mosa_blocks=(2,), experts_per_block={2: 2})
    report = inject_adapters(tower, tower.sites(), cfg, seed=0, router=router, width=32)
    assert [r["block"] for r in report.rows] == [0, 2]
    assert report.rows[0]["split"] == [] and report.rows[1]["split"] == [("up", 2)]
    assert router.num_experts == [2]
    with pytest.raises(ValueError, match="blocks.*\\[5\\].*3 blocks"):
        inject_adapters(make_tower(depth=3), tower.sites(), AdapterConfig(blocks=(5,)), seed=0, router=router, width=32)
