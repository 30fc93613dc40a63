"""FLOP accounting: hand counts on tiny towers, torch's FlopCounterMode, published ViT sizes, MFU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.backbones import BackboneConfig, build_backbone, build_head
from mosa_scale.model.assembly import AdaptedClassifier
from mosa_scale.model.flops import mfu, peak_flops, step_flops, throughput_metrics
from mosa_scale.sparse import Router

D, L, F, S, P, K, R = 64, 3, 128, 32, 8, 10, 8  # width, blocks, mlp, image, patch, classes, bottleneck
T = (S // P) ** 2 + 1
HF = dict(
    hidden_size=D,
    num_hidden_layers=L,
    num_attention_heads=4,
    intermediate_size=F,
    image_size=S,
    patch_size=P,
    attn_implementation="eager",
)  # eager: FlopCounterMode sees the attention matmuls
OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": S, "layers": L, "width": D, "patch_size": P, "head_width": 16},
}


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


# FlopCounterMode has no formula for the CPU flash-attention kernel that nn.MultiheadAttention uses
COUNTER_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}


def build(family="hf-vit", method="parallel", experts=4, blocks=None):
    if family == "hf-vit":
        bb = build_backbone(BackboneConfig(family="hf-vit", hf_config=HF))
    else:
        bb = build_backbone(BackboneConfig(family="openclip", name="tiny", openclip_cfg=OPENCLIP))
    router = Router(0)
    if method is not None:
        inject_adapters(
            bb.model,
            bb.sites,
            AdapterConfig(method=method, bottleneck=R, num_experts=experts, dropout=0.0, blocks=blocks),
            seed=0,
            router=router,
            width=D,
        )
    model = AdaptedClassifier(bb.model, build_head("linear", bb.width, K))
    return model, bb, router


def counted(model, router, x, *, backward):
    router.begin_step(0)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_EXTRA) as fc:
        with router.forward_pass():
            y = model(x)
        if backward:
            y.sum().backward()
    return fc.get_total_flops()


def hand_block_linears():
    return 2 * T * (4 * D * D + 2 * D * F)  # q, k, v, o and fc1, fc2 per token


def test_hand_count_parallel_adapter():
    model, bb, _ = build()
    f = step_flops(model, bb, image_size=S, global_batch=6, consistency=False)
    patches, attn = (S // P) ** 2, 4 * T * T * D
    fwd_frozen = 2 * 3 * P * P * D * patches + L * (hand_block_linears() + attn)
    fwd_train = L * 2 * T * (D * R + R * D) + 2 * D * K
    # the adapter sits at block 0's end: no frozen backward in block 0; attention matmuls 2x
    bwd_frozen = (L - 1) * (hand_block_linears() + 2 * attn)
    assert f["tokens"] == T and f["passes"] == 1
    assert f["forward_frozen"] == fwd_frozen and f["forward_trainable"] == fwd_train
    assert f["backward_frozen"] == bwd_frozen and f["backward_trainable"] == 2 * fwd_train
    assert f["per_sample"] == fwd_frozen + bwd_frozen + 3 * fwd_train
    assert f["per_step"] == 6 * f["per_sample"]
    double = step_flops(model, bb, image_size=S, global_batch=6, consistency=True)
    assert double["per_step"] == 2 * f["per_step"] and double["passes"] == 2


def test_backward_starts_at_the_first_adapted_block():
    model, bb, _ = build(blocks=(2,))
    f = step_flops(model, bb, image_size=S, global_batch=1, consistency=False)
    assert f["backward_frozen"] == 0  # only the last block has an adapter, at its very end
    probe, bb2, _ = build(method=None)
    g = step_flops(probe, bb2, image_size=S, global_batch=1, consistency=False)
    assert g["forward_trainable"] == 2 * D * K and g["backward_frozen"] == 0  # linear probe: head only


def test_image_size_changes_tokens():
    model, bb, _ = build()
    f = step_flops(model, bb, image_size=2 * S, global_batch=1, consistency=False)
    assert f["tokens"] == (2 * S // P) ** 2 + 1


@pytest.mark.parametrize("family", ["hf-vit", "openclip"])
@pytest.mark.parametrize("method,experts", [("parallel", 4), ("parallel", 1), ("lora", 4)])
def test_forward_matches_flop_counter(family, method, experts):
    model, bb, router = build(family, method, experts)
    x = torch.randn(4, 3, S, S)
    mine = step_flops(model, bb, image_size=S, global_batch=4, consistency=False)
    ref = counted(model, router, x, backward=False)
    fwd = 4 * (mine["forward_frozen"] + mine["forward_trainable"])
    # the fused OpenCLIP LoRA computes B @ A once per forward instead of per token
    tol = 0.08 if (family, method) == ("openclip", "lora") else 1e-9
    assert fwd == pytest.approx(ref, rel=tol)


@pytest.mark.parametrize("method,experts,tol", [("parallel", 4, 1e-9), ("sequential", 1, 1e-9), ("lora", 1, 0.06)])
def test_train_step_matches_flop_counter(method, experts, tol):
    """Forward + backward (autograd computes only the needed activation gradients of frozen
    layers) against FlopCounterMode; LoRA's first block is approximate (see module doc)."""
    model, bb, router = build("hf-vit", method, experts)
    x = torch.randn(4, 3, S, S)
    mine = step_flops(model, bb, image_size=S, global_batch=4, consistency=False)
    assert mine["per_step"] == pytest.approx(counted(model, router, x, backward=True), rel=tol)


@pytest.mark.parametrize("name,gmacs", [("ViT-B-16", 17.58), ("ViT-H-14", 167.4)])
def test_published_openclip_sizes_on_meta(name, gmacs):
    bb = build_backbone(BackboneConfig(family="openclip", name=name), meta=True)
    router = Router(0)
    inject_adapters(
        bb.model,
        bb.sites,
        AdapterConfig(method="parallel", bottleneck=64, num_experts=4),
        seed=0,
        router=router,
        width=bb.model.visual.transformer.width,
    )
    model = AdaptedClassifier(bb.model, build_head("linear", bb.width, 100))
    f = step_flops(model, bb, image_size=224, global_batch=128, consistency=True)
    assert f["forward_frozen"] == pytest.approx(2 * gmacs * 1e9, rel=0.01)  # published GMACs at 224 px
    assert f["forward_trainable"] < 0.02 * f["forward_frozen"]  # r 64 adapters: ~1.3 % of the tower
    # frozen backward ~ forward (activation grads only), everything twice for consistency
    assert 0.9 < f["backward_frozen"] / f["forward_frozen"] < 1.1
    assert f["per_step"] == 128 * f["per_sample"] and f["passes"] == 2


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp32") == 66.9e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("cpu", "bf16") is None and peak_flops(None, "fp32") is None
    assert peak_flops("NVIDIA GeForce RTX 2080", "bf16") is None
    assert mfu(494.7e12, 989.4e12) == pytest.approx(0.5) and mfu(1e12, None) is None
    flops = {"per_step": 8e12}
    m = throughput_metrics(flops, step_time_s=2.0, world_size=2, peak=4e12)
    assert m == {"perf/tflops_per_s_per_gpu": pytest.approx(2.0), "perf/mfu": pytest.approx(0.5)}
    assert "perf/mfu" not in throughput_metrics(flops, step_time_s=2.0, world_size=2, peak=None)


def test_bad_arguments_raise():
    model, bb, _ = build()
    with pytest.raises(ValueError, match="image_size"):
        step_flops(model, bb, image_size=0, global_batch=1, consistency=False)
    other, _, _ = build()
    with pytest.raises(ValueError, match="not a submodule"):
        step_flops(other, bb, image_size=S, global_batch=1, consistency=False)
