"""Meta-device builds: published parameter counts and shapes, nothing allocated."""

import pytest
import torch
from torch import nn

from mosa_scale.backbones import (
    OPENCLIP_VISION_SPECS,
    BackboneConfig,
    build_backbone,
    count_parameters,
)

# published OpenCLIP image-tower sizes (millions), as given in the issue
PUBLISHED_M = {
    "ViT-B-16": 86.2,
    "ViT-L-14": 304.0,
    "ViT-H-14": 632.1,
    "ViT-g-14": 1012.6,
    "ViT-bigG-14": 1844.9,
}


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_openclip_meta_count_matches_published(name: str) -> None:
    bb = build_backbone(BackboneConfig(family="openclip", name=name, precision="bf16"), meta=True)
    n = count_parameters(bb.model)
    assert abs(n / 1e6 - PUBLISHED_M[name]) <= 0.1, (name, n)
    assert OPENCLIP_VISION_SPECS[name].params_m == PUBLISHED_M[name]
    assert all(p.device.type == "meta" for p in bb.model.parameters())  # nothing allocated
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in bb.model.parameters())
    assert not any(k.startswith("text") for k in bb.model.state_dict())  # image tower only


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_openclip_spec_table_matches_built_model(name: str) -> None:
    spec = OPENCLIP_VISION_SPECS[name]
    bb = build_backbone(BackboneConfig(family="openclip", name=name), meta=True)
    attn = bb.model.get_submodule(bb.sites[0].qkv_fused)
    fc = bb.model.get_submodule(bb.sites[0].mlp).c_fc
    assert (bb.width, len(bb.sites), attn.embed_dim, attn.num_heads, fc.out_features) == (
        spec.embed_dim,
        spec.layers,
        spec.width,
        spec.heads,
        spec.mlp_dim,
    )
    assert bb.image.size == spec.image_size
    assert bb.model.visual.patch_size == (spec.patch_size, spec.patch_size)


def _hf_expected(d: int, layers: int, ff: int, patch: int, size: int, clip: bool) -> int:
    """Analytic parameter count of an HF ViT / CLIP vision tower (no pooler)."""
    tokens = (size // patch) ** 2 + 1
    embed = 3 * patch * patch * d + (0 if clip else d) + d + tokens * d  # conv(+bias), cls, pos
    block = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    norms = 2 * 2 * d if clip else 2 * d  # pre+post LN (CLIP) / final LN (ViT)
    return embed + layers * block + norms


@pytest.mark.parametrize(
    ("family", "hf_config", "expected"),
    [
        ("hf-vit", {}, _hf_expected(768, 12, 3072, 16, 224, clip=False)),  # ViT-B/16, 85.8 M
        (
            "hf-clip",
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
            },
            _hf_expected(1024, 24, 4096, 14, 224, clip=True),  # CLIP ViT-L/14 vision, 303.2 M
        ),
    ],
)
def test_hf_meta_count_matches_analytic(family: str, hf_config: dict, expected: int) -> None:
    bb = build_backbone(BackboneConfig(family=family, hf_config=hf_config), meta=True)
    assert count_parameters(bb.model) == expected
    assert all(p.device.type == "meta" for p in bb.model.parameters())


def test_count_parameters_counts_shared_once_and_uses_ds_numel() -> None:
    lin = nn.Linear(4, 3)
    m = nn.Sequential(lin, lin)
    assert count_parameters(m) == 15
    lin.weight.ds_numel = 1000  # a ZeRO-3 partitioned parameter reports its full size here
    assert count_parameters(m) == 1003


# OpenCLIP's timm-based towers: image-tower parameters (millions) and forward GFLOPs at 224 px as
# published in open_clip's docs/model_profile.csv (SigLIP2 towers share SigLIP's architecture)
TIMM_PUBLISHED = {
    "ViT-B-16-SigLIP": (92.88, 35.42, 12),
    "ViT-B-16-SigLIP2": (92.88, 35.42, 12),
    "ViT-SO400M-14-SigLIP": (427.68, 220.35, 27),
    "ViT-SO400M-14-SigLIP2": (427.68, 220.35, 27),
    "EVA02-B-16": (86.26, 35.13, 12),
    "EVA02-L-14": (304.11, 162.0, 24),
    "EVA02-E-14": (4350.56, 2264.33, 64),
}


@pytest.mark.parametrize("name", list(TIMM_PUBLISHED))
def test_timm_tower_meta_counts_match_published(name: str) -> None:
    from mosa_scale.adapters import AdapterConfig, inject_adapters
    from mosa_scale.backbones.base import stream_width
    from mosa_scale.model.flops import step_flops
    from mosa_scale.sparse import Router

    params_m, gflops, blocks = TIMM_PUBLISHED[name]
    bb = build_backbone(BackboneConfig(family="openclip", name=name, precision="bf16"), meta=True)
    assert round(count_parameters(bb.model) / 1e6, 2) == params_m
    assert len(bb.sites) == blocks
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in bb.model.parameters())
    flops = step_flops(bb.model, bb, image_size=224, global_batch=1, consistency=False)
    # MAP attention-pool keys/values are counted per sample, not per token: SigLIP is 1.3% low
    assert abs(flops["forward_frozen"] / 1e9 - gflops) / gflops < 0.015
    # bottleneck and LoRA sites resolve on the meta skeleton (every method x N on the tiny towers)
    width = stream_width(bb.model, bb.sites[0])
    for method, per_block in (("houlsby", 2), ("lora", 2)):
        skeleton = (
            bb if method == "houlsby" else build_backbone(BackboneConfig(family="openclip", name=name), meta=True)
        )
        report = inject_adapters(
            skeleton.model,
            skeleton.sites,
            AdapterConfig(method=method, bottleneck=64, num_experts=1),
            seed=0,
            router=Router(seed=0),
            width=width,
        )
        assert len(report.rows) == per_block * blocks
