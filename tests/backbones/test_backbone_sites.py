"""Adapter sites resolve to the right modules and see the residual stream on a real forward."""

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from mosa_scale.backbones import Backbone, BackboneConfig, build_backbone

ATTN_TYPES = {
    "openclip": "MultiheadAttention",
    "hf-vit": "ViTAttention",
    "hf-clip": "CLIPAttention",
    "siglip": "Attention",
    "eva02": "EvaAttention",
    "eva02-e": "LayerNorm",  # post-norm: the attention branch ends at norm1
}
BLOCK_TYPES = {
    "openclip": "ResidualAttentionBlock",
    "hf-vit": "ViTLayer",
    "hf-clip": "CLIPEncoderLayer",
    "siglip": "Block",
    "eva02": "EvaBlock",
    "eva02-e": "EvaBlockPostNorm",
}
TIMM = ("siglip", "eva02", "eva02-e")


def _family(bb: Backbone) -> str:
    """The tower kind: a family, or the timm tower of a tiny test config (``openclip:tiny-<kind>``)."""
    if bb.name.startswith("openclip:tiny-"):
        return bb.name[len("openclip:tiny-") :]
    return "openclip" if bb.name.startswith("openclip:") else bb.name


def test_sites_resolve_to_the_right_module_types(tiny_cfg: BackboneConfig) -> None:
    bb = build_backbone(tiny_cfg)
    fam = _family(bb)
    blocks = bb.model.get_submodule(bb.blocks_path)
    assert isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) == len(bb.sites) == 2
    for i, s in enumerate(bb.sites):
        assert s.block == f"{bb.blocks_path}.{i}"
        assert bb.model.get_submodule(s.block) is blocks[i]
        assert type(blocks[i]).__name__ == BLOCK_TYPES[fam]
        assert type(bb.model.get_submodule(s.attn)).__name__ == ATTN_TYPES[fam]
        if fam == "eva02-e":  # post-norm: the FFN's input is the stream, its branch ends at norm2
            assert type(bb.model.get_submodule(s.ln2)).__name__ == "Mlp"
            assert isinstance(bb.model.get_submodule(s.mlp), nn.LayerNorm)
            mlp = bb.model.get_submodule(s.ln2)
        else:
            assert isinstance(bb.model.get_submodule(s.ln2), nn.LayerNorm)
            mlp = bb.model.get_submodule(s.mlp)
        linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
        assert len(linears) >= 2 and linears[0].in_features == linears[-1].out_features == 64
        if fam in ("siglip", "eva02-e"):  # one fused [q; k; v] projection
            assert s.q is None and s.v is None and s.qkv_fused is None
            qkv = bb.model.get_submodule(s.qkv_linear)
            assert type(qkv) is nn.Linear and qkv.weight.shape == (192, 64)
        elif fam == "openclip":
            assert s.q is None and s.v is None
            mha = bb.model.get_submodule(s.qkv_fused)
            assert isinstance(mha, nn.MultiheadAttention) and mha.in_proj_weight.shape == (192, 64)
        else:
            assert s.qkv_fused is None and s.qkv_linear is None
            q, v = bb.model.get_submodule(s.q), bb.model.get_submodule(s.v)
            assert isinstance(q, nn.Linear) and isinstance(v, nn.Linear) and q is not v
            assert s.q.rsplit(".", 1)[1] == "q_proj" and s.v.rsplit(".", 1)[1] == "v_proj"
            assert q.weight.shape == v.weight.shape == (64, 64)


def test_hooks_see_the_residual_stream(tiny_cfg: BackboneConfig, pixels: torch.Tensor) -> None:
    """ln2 input == block input + attn branch, and block output == ln2 input + mlp branch."""
    bb = build_backbone(tiny_cfg)
    bb.model.eval()
    rec: dict[str, dict[str, torch.Tensor]] = {}

    def grab(i: int, key: str, which: str):
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any = None) -> None:
            if which == "in":
                rec.setdefault(i, {})[key] = (args[0] if args else next(iter(kwargs.values()))).clone()
            else:
                rec.setdefault(i, {})[key] = (out[0] if isinstance(out, tuple) else out).clone()

        return hook

    handles = []
    for i, s in enumerate(bb.sites):
        g = bb.model.get_submodule
        handles += [
            g(s.block).register_forward_pre_hook(grab(i, "x", "in"), with_kwargs=True),
            g(s.block).register_forward_hook(grab(i, "y", "out"), with_kwargs=True),
            g(s.attn).register_forward_hook(grab(i, "attn", "out"), with_kwargs=True),
            g(s.ln2).register_forward_pre_hook(grab(i, "h", "in"), with_kwargs=True),
            g(s.mlp).register_forward_hook(grab(i, "mlp", "out"), with_kwargs=True),
        ]
    with torch.no_grad():
        bb.model(pixels)
    for h in handles:
        h.remove()
    assert sorted(rec) == [0, 1]
    tokens = 16 + (_family(bb) != "siglip")  # 4 x 4 patches (+ a class token; SigLIP has none)
    for r in rec.values():
        assert r["h"].shape == (2, tokens, 64)
        torch.testing.assert_close(r["h"], r["x"] + r["attn"], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["y"], r["h"] + r["mlp"], rtol=0, atol=1e-5)
        assert r["mlp"].abs().max() > 1e-3 and r["attn"].abs().max() > 1e-3  # branches are real
    torch.testing.assert_close(rec[1]["x"], rec[0]["y"])  # blocks chain in depth order


def test_frozen_output_shape_and_prefix(tiny_cfg: BackboneConfig, pixels: torch.Tensor) -> None:
    bb = build_backbone(tiny_cfg)
    assert all(not p.requires_grad for p in bb.model.parameters())
    out = bb.model(pixels)
    assert out.shape == (2, bb.width) and out.dtype == torch.float32
    prefix = type(bb.model).prefix
    assert all(k.startswith(prefix + ".") for k in bb.model.state_dict())
    assert bb.source == "random" and bb.image.size == 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_frozen_weights(tiny_cfg: BackboneConfig, pixels: torch.Tensor, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = build_backbone(tiny_cfg)
    bb = build_backbone(tiny_cfg, dtype=dtype)
    bb.model.load_state_dict(ref.model.state_dict())  # same weights, rounded to dtype
    assert {p.dtype for p in bb.model.parameters()} == {dtype}
    out = bb.model(pixels)
    assert out.dtype == torch.float32  # features leave the tower in fp32 for the fp32 head
    torch.testing.assert_close(out, ref.model(pixels), rtol=0.1, atol=0.1)


def test_precision_field_sets_dtype(tiny_cfg: BackboneConfig) -> None:
    bb = build_backbone(dataclasses.replace(tiny_cfg, precision="bf16"))
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    bb = build_backbone(dataclasses.replace(tiny_cfg, precision="bf16"), dtype=torch.float32)
    assert {p.dtype for p in bb.model.parameters()} == {torch.float32}  # explicit dtype wins


def test_pooling_matches_the_library_outputs(tiny_cfg: BackboneConfig, pixels: torch.Tensor) -> None:
    bb = build_backbone(tiny_cfg)
    if _family(bb) in TIMM:  # the tower's own pooling (class token / attention pool), then its head
        v = bb.model.tower
        with torch.no_grad():
            exp = v.head(v.trunk.forward_head(v.trunk.forward_features(pixels)))
            torch.testing.assert_close(bb.model(pixels), exp, rtol=0, atol=0)
        with pytest.raises(ValueError, match="pooling='cls'"):
            build_backbone(dataclasses.replace(tiny_cfg, pooling="mean"))
        return
    mean_bb = build_backbone(dataclasses.replace(tiny_cfg, pooling="mean"))
    mean_bb.model.load_state_dict(bb.model.state_dict())
    tower = bb.model.tower
    with torch.no_grad():
        out, out_mean = bb.model(pixels), mean_bb.model(pixels)
        if bb.name == "hf-vit":
            h = tower(pixel_values=pixels).last_hidden_state
            exp, exp_mean = h[:, 0], h[:, 1:].mean(1)
        elif bb.name == "hf-clip":
            o = tower(pixel_values=pixels)
            exp = o.pooler_output
            exp_mean = tower.post_layernorm(o.last_hidden_state[:, 1:].mean(1))
        else:
            v = tower
            x = v.ln_post(v.transformer(v._embeds(pixels)))
            exp, exp_mean = x[:, 0] @ v.proj, x[:, 1:].mean(1) @ v.proj
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(out_mean, exp_mean)
    assert not torch.allclose(out, out_mean)


def test_hf_vit_pooler(tiny_hf: dict) -> None:
    bb = build_backbone(BackboneConfig(family="hf-vit", hf_config=tiny_hf, pooling="pooler"))
    assert bb.model.vit.pooler is not None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), bb.model.vit(pixel_values=x).pooler_output)
    assert build_backbone(BackboneConfig(family="hf-vit", hf_config=tiny_hf)).model.vit.pooler is None


def test_image_size_override_random_init(tiny_cfg: BackboneConfig) -> None:
    bb = build_backbone(dataclasses.replace(tiny_cfg, image_size=48))
    assert bb.image.size == 48
    assert bb.model(torch.randn(1, 3, 48, 48)).shape == (1, bb.width)
    with pytest.raises(ValueError, match="divisible"):
        build_backbone(dataclasses.replace(tiny_cfg, image_size=50))


def test_image_stats_defaults_and_overrides(tiny_cfg: BackboneConfig) -> None:
    bb = build_backbone(tiny_cfg)
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    assert bb.image.mean == ((0.5, 0.5, 0.5) if _family(bb) in ("hf-vit", "siglip") else clip_mean)
    bb = build_backbone(dataclasses.replace(tiny_cfg, image_mean=(0.1, 0.2, 0.3)), meta=True)
    assert bb.image.mean == (0.1, 0.2, 0.3)
