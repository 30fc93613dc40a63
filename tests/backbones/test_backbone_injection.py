"""Adapters injected into real tiny towers of every family: identity at init, only adapters and
head train, gradient checkpointing replays the experts; MoSA adapter sizes on the big towers."""

import logging

import pytest
import torch
from train_util import train_steps

from mosa_scale.adapters import AdapterConfig, inject_adapters, is_adapter_name, registered_methods, remove_adapters
from mosa_scale.backbones import BackboneConfig, build_backbone, count_parameters, enable_gradient_checkpointing
from mosa_scale.model.assembly import AdaptedClassifier, _stream_width
from mosa_scale.optim import MoSAAdamW
from mosa_scale.sparse import Router

log = logging.getLogger(__name__)


def adapted(cfg: BackboneConfig, adapter: AdapterConfig, seed: int = 0, run_seed: int = 3407):
    torch.manual_seed(seed)
    backbone = build_backbone(cfg)
    router = Router(seed=run_seed)
    report = inject_adapters(
        backbone.model, backbone.sites, adapter, seed=run_seed, router=router, width=_stream_width(backbone)
    )
    return backbone, router, report


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("method", registered_methods())
def test_identity_at_init_and_only_adapters_train(tiny_cfg, pixels, method, n):
    torch.manual_seed(0)
    frozen = build_backbone(tiny_cfg).model
    backbone, router, report = adapted(
        tiny_cfg, AdapterConfig(method=method, bottleneck=8, num_experts=n, share="none")
    )
    assert report.rows
    tower = backbone.model
    router.begin_step(0)
    for train in (True, False):
        tower.train(train)
        frozen.train(train)
        with router.forward_pass(), torch.no_grad():
            assert torch.equal(tower(pixels), frozen(pixels))
    model = AdaptedClassifier(tower, torch.nn.Linear(backbone.width, 3))
    model.mosa_head.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=1e-2)
    y = torch.tensor([0, 2])
    train_steps(model, router, opt, [(pixels, y)] * 2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_adapter_name(k) for k in changed)
    assert any("mosa_head" in k for k in changed) and any(k.count("mosa_") and "head" not in k for k in changed)
    # removal gives back the untouched tower: state dict (keys and values) and outputs
    remove_adapters(tower)
    untouched = frozen.state_dict()
    assert tower.state_dict().keys() == untouched.keys()
    assert all(torch.equal(v, untouched[k]) for k, v in tower.state_dict().items())
    tower.eval()
    frozen.eval()
    with torch.no_grad():
        assert torch.equal(tower(pixels), frozen(pixels))


def test_gradient_checkpointing_gives_the_same_gradients(pixels):
    cfg = BackboneConfig(
        family="hf-vit",
        hf_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 8,
        },
    )
    adapter = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.1)

    def grads(checkpointing: bool):
        backbone, router, _ = adapted(cfg, adapter)
        if checkpointing:
            enable_gradient_checkpointing(backbone, router.checkpoint)
        router.begin_step(0, passes=2)
        torch.manual_seed(1)
        with router.forward_pass(0, 0):
            a = backbone.model(pixels)
        with router.forward_pass(0, 1):  # a second pass with other experts before the backward
            b = backbone.model(pixels)
        (a.square().mean() + (a - b).square().mean()).backward()
        return {n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) >= 8
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=1e-6)


def test_mosa_adapter_sizes_on_big_towers():
    lines = []
    for name in ("ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"):
        backbone = build_backbone(BackboneConfig(family="openclip", name=name), meta=True)
        tower = count_parameters(backbone.model)
        router = Router(seed=0)
        report = inject_adapters(
            backbone.model,
            backbone.sites,
            AdapterConfig(bottleneck=64, num_experts=4),
            seed=0,
            router=router,
            width=_stream_width(backbone),
        )
        d = _stream_width(backbone)
        layers = len(backbone.sites)
        # per block: LN_a (2d) + dense Down (64 d + 64) + Up slices (64 d) + 4 bias vectors (4 d)
        assert report.trainable == layers * (2 * d + 64 * d + 64 + 64 * d + 4 * d)
        lines.append(
            f"{name}: tower {tower / 1e6:.1f} M, MoSA r=64 N=4 {report.trainable / 1e6:.3f} M "
            f"({100 * report.trainable / tower:.2f}%)"
        )
    log.warning("meta-device sizes: %s", "; ".join(lines))
