"""Pretrained loading from local files, through build_backbone, with the hub switched off."""

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

from mosa_scale.backbones import BackboneConfig, build_backbone
from mosa_scale.backbones import hf as hf_mod
from mosa_scale.backbones import openclip as oc_mod


def test_hub_is_off() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.fixture
def tiny_clip(tiny_openclip: dict) -> open_clip.CLIP:
    torch.manual_seed(1)
    return open_clip.CLIP(**tiny_openclip).eval()


def _oc_cfg(tiny_openclip: dict, pretrained: str, **kw) -> BackboneConfig:
    return BackboneConfig(family="openclip", name="tiny", openclip_cfg=tiny_openclip, pretrained=pretrained, **kw)


def _save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    "layout",
    ["full.pt", "full.safetensors", "dir", "visual_only.bin", "wrapped_state_dict.pt"],
)
def test_openclip_local_checkpoint_round_trip(
    layout: str, tiny_clip, tiny_openclip: dict, tmp_path: Path, pixels: torch.Tensor
) -> None:
    sd = tiny_clip.state_dict()
    if layout == "dir":
        _save(sd, tmp_path / "open_clip_model.safetensors")
        (tmp_path / "open_clip_config.json").write_text(
            json.dumps(
                {
                    "model_cfg": tiny_openclip,
                    "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3},
                }
            )
        )
        target = tmp_path
    elif layout == "visual_only.bin":
        target = _save(tiny_clip.visual.state_dict(), tmp_path / layout)
    elif layout == "wrapped_state_dict.pt":  # an OpenCLIP training checkpoint (DDP "module." keys)
        target = _save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / layout)
    else:
        target = _save(sd, tmp_path / layout)
    bb = build_backbone(_oc_cfg(tiny_openclip, str(target)))
    bb.model.eval()
    assert bb.source == str(target)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(pixels), tiny_clip.visual(pixels), rtol=0, atol=0)
        assert not torch.allclose(build_backbone(_oc_cfg(tiny_openclip, None)).model(pixels), bb.model(pixels))
    if layout == "dir":  # the directory's preprocess config is honoured
        assert bb.image.mean == (0.5, 0.5, 0.5) and bb.image.std == (0.25, 0.25, 0.25)


def test_openclip_matches_open_clip_create_model(
    tiny_clip,
    tiny_openclip: dict,
    tmp_path: Path,
    pixels: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our loader and open_clip's own create_model(pretrained=file) give the same tower."""
    ckpt = _save(tiny_clip.state_dict(), tmp_path / "m.pt")
    # keep open_clip's global model-config registry untouched for other tests
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    open_clip.add_model_config(_write_cfg(tmp_path / "cfgs", "mosa-tiny-test", tiny_openclip))
    ref = open_clip.create_model("mosa-tiny-test", pretrained=str(ckpt)).eval()
    bb = build_backbone(_oc_cfg(tiny_openclip, str(ckpt)))
    bb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(pixels), ref.encode_image(pixels), rtol=0, atol=0)


def _write_cfg(d: Path, name: str, cfg: dict) -> Path:
    d.mkdir()
    (d / f"{name}.json").write_text(json.dumps(cfg))
    return d


def test_openclip_resizes_position_embedding(tiny_clip, tiny_openclip: dict, tmp_path: Path) -> None:
    ckpt = _save(tiny_clip.state_dict(), tmp_path / "m.pt")
    bb = build_backbone(_oc_cfg(tiny_openclip, str(ckpt), image_size=48))
    assert bb.image.size == 48 and bb.model.visual.positional_embedding.shape == (37, 64)
    assert bb.model(torch.randn(1, 3, 48, 48)).shape == (1, 32)


def test_openclip_bf16_from_checkpoint(tiny_clip, tiny_openclip: dict, tmp_path: Path, pixels: torch.Tensor) -> None:
    ckpt = _save(tiny_clip.state_dict(), tmp_path / "m.pt")
    bb = build_backbone(_oc_cfg(tiny_openclip, str(ckpt), precision="bf16"))
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(bb.model(pixels), tiny_clip.visual(pixels), rtol=0.05, atol=0.05)


def test_openclip_wrong_architecture_names_the_checkpoint(tiny_clip, tiny_openclip: dict, tmp_path: Path) -> None:
    ckpt = _save(tiny_clip.state_dict(), tmp_path / "m.pt")
    other = dict(tiny_openclip, vision_cfg=dict(tiny_openclip["vision_cfg"], layers=3))
    with pytest.raises(RuntimeError, match=r"m\.pt.*does not fit"):
        build_backbone(_oc_cfg(other, str(ckpt)))


def test_openclip_directory_problems(tiny_openclip: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        build_backbone(_oc_cfg(tiny_openclip, str(tmp_path)))
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="several checkpoints"):
        build_backbone(_oc_cfg(tiny_openclip, str(tmp_path)))


def _forbid_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom():
        raise AssertionError("a library was called before the path check")

    monkeypatch.setattr(oc_mod, "_open_clip", boom)
    monkeypatch.setattr(hf_mod, "_transformers", boom)


@pytest.mark.parametrize("family", ["openclip", "hf-vit", "hf-clip"])
@pytest.mark.parametrize("rel", ["missing/model.safetensors", "missing_dir/", "nope.bin"])
def test_missing_path_fails_before_any_library(
    family: str, rel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_libraries(monkeypatch)
    path = str(tmp_path / rel)
    with pytest.raises(FileNotFoundError) as ei:
        build_backbone(BackboneConfig(family=family, name="ViT-B-16", pretrained=path))
    assert path.rstrip("/") in str(ei.value)


def test_openclip_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(FileNotFoundError) as ei:
        build_backbone(BackboneConfig(family="openclip", name="ViT-B-16", pretrained="laion9b_nope"))
    assert "laion9b_nope" in str(ei.value) and "laion2b_s34b_b88k" in str(ei.value)


def test_openclip_tag_offline_fails_clearly() -> None:
    with pytest.raises(RuntimeError) as ei:
        build_backbone(BackboneConfig(family="openclip", name="ViT-B-16", pretrained="laion2b_s34b_b88k"))
    msg = str(ei.value)
    assert "laion2b_s34b_b88k" in msg and "Offline?" in msg and "local file" in msg


HF_CASES = {
    "hf-vit": (ViTConfig, ViTModel, lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]),
    "hf-clip": (CLIPVisionConfig, CLIPVisionModel, lambda m, x: m(pixel_values=x).pooler_output),
}


@pytest.mark.parametrize("family", sorted(HF_CASES))
def test_hf_save_pretrained_round_trip(family: str, tiny_hf: dict, tmp_path: Path, pixels: torch.Tensor) -> None:
    config_cls, model_cls, ref_fn = HF_CASES[family]
    torch.manual_seed(2)
    ref = model_cls(config_cls(**tiny_hf)).eval()
    ref.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]})
    )
    bb = build_backbone(BackboneConfig(family=family, pretrained=str(tmp_path)))
    assert bb.source == str(tmp_path) and bb.width == 64 and len(bb.sites) == 2
    assert bb.image.mean == (0.4, 0.4, 0.4) and bb.image.std == (0.2, 0.2, 0.2)
    bb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(pixels), ref_fn(ref, pixels), rtol=0, atol=0)
        fresh = build_backbone(BackboneConfig(family=family, hf_config=tiny_hf)).model
        assert not torch.allclose(fresh(pixels), bb.model(pixels))
    # a larger input interpolates the pretrained position embeddings
    big = build_backbone(BackboneConfig(family=family, pretrained=str(tmp_path), image_size=48))
    assert big.image.size == 48 and big.model.interpolate_pos_encoding
    assert big.model(torch.randn(1, 3, 48, 48)).shape == (1, 64)
    # frozen weights in bf16
    low = build_backbone(BackboneConfig(family=family, pretrained=str(tmp_path), precision="bf16"))
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    low.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(low.model(pixels), ref_fn(ref, pixels), rtol=0.05, atol=0.05)


def test_hf_directory_checks(tiny_hf: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_backbone(BackboneConfig(family="hf-vit", pretrained=str(tmp_path)))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="save_pretrained"):
        build_backbone(BackboneConfig(family="hf-vit", pretrained=str(f)))
    d = tmp_path / "vit"
    ViTModel(ViTConfig(**tiny_hf)).save_pretrained(d)
    with pytest.raises(ValueError, match=r"model_type='vit'.*hf-clip"):
        build_backbone(BackboneConfig(family="hf-clip", pretrained=str(d)))
