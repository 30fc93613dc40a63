"""BackboneConfig validation and build_backbone argument checks."""

import pytest
import torch

from mosa_scale.backbones import BackboneConfig, build_backbone


def test_defaults_are_valid() -> None:
    cfg = BackboneConfig()
    assert (cfg.family, cfg.precision, cfg.pooling, cfg.pretrained) == (
        "hf-vit",
        "fp32",
        "cls",
        None,
    )
    assert BackboneConfig(precision="bf16").torch_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"family": "timm"}, "family", "['openclip', 'hf-vit', 'hf-clip']"),
        ({"precision": "fp8"}, "precision", "['fp32', 'bf16', 'fp16']"),
        ({"family": "openclip", "pooling": "pooler"}, "pooling", "['cls', 'mean']"),
        ({"image_size": 0}, "image_size", "positive int"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std", "> 0"),
        ({"image_mean": (0.5, 0.5)}, "image_mean", "3 floats"),
        ({"family": "openclip", "hf_config": {"hidden_size": 8}}, "hf_config", "hf-vit"),
        ({"openclip_cfg": {"embed_dim": 8, "vision_cfg": {}}}, "openclip_cfg", "openclip"),
        ({"family": "openclip", "openclip_cfg": {"vision_cfg": {}}}, "openclip_cfg", "embed_dim"),
        ({"pretrained": " "}, "pretrained", "None"),
    ],
)
def test_invalid_field_names_field_and_allowed_values(kwargs: dict, field: str, allowed: str) -> None:
    with pytest.raises(ValueError) as ei:
        BackboneConfig(**kwargs)
    msg = str(ei.value)
    assert f"{field}=" in msg or f"{field}:" in msg
    assert allowed in msg


def test_all_errors_reported_at_once() -> None:
    with pytest.raises(ValueError) as ei:
        BackboneConfig(family="openclip", precision="fp64", pooling="pooler", image_size=-1)
    msg = str(ei.value)
    for field in ("precision=", "pooling=", "image_size="):
        assert field in msg


def test_yaml_lists_become_tuples() -> None:
    cfg = BackboneConfig(image_mean=[0.1, 0.2, 0.3], image_std=[1, 1, 1])  # type: ignore[arg-type]
    assert cfg.image_mean == (0.1, 0.2, 0.3) and cfg.image_std == (1.0, 1.0, 1.0)


def test_meta_with_pretrained_is_refused(tmp_path) -> None:
    cfg = BackboneConfig(family="hf-vit", pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="meta=True"):
        build_backbone(cfg, meta=True)


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        build_backbone(BackboneConfig(), dtype=torch.float64, meta=True)


def test_unknown_openclip_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"ViT-B-16"):
        build_backbone(BackboneConfig(family="openclip", name="ViT-B-61"), meta=True)
