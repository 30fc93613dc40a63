"""Classification heads: linear init and the zero-shot head initialised through the text tower."""

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mosa_scale.backbones import (
    BackboneConfig,
    ZeroShotHead,
    build_head,
    build_openclip_zeroshot,
    count_parameters,
)

CLASSES = ["cat", "dog", "school bus"]


def test_linear_head_init() -> None:
    g = torch.Generator().manual_seed(0)
    head = build_head("linear", 64, 10, generator=g)
    assert type(head) is torch.nn.Linear and head.weight.shape == (10, 64)
    assert head.weight.abs().max() <= 0.04 and 0.01 < head.weight.std() < 0.03
    assert torch.equal(head.bias, torch.zeros(10))
    again = build_head("linear", 64, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(head.weight, again.weight)  # seeded
    assert torch.equal(build_head("linear", 8, 2, init_std=0.0).weight, torch.zeros(2, 8))


def test_head_argument_errors() -> None:
    with pytest.raises(ValueError, match="kind="):
        build_head("mlp", 8, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs \['class_names', 'openclip_model', 'tokenizer'\]"):
        build_head("zeroshot", 8, 2)
    with pytest.raises(ValueError, match="zero-shot heads need family 'openclip'"):
        build_openclip_zeroshot(BackboneConfig(family="hf-clip"), CLASSES)


def test_default_tokenizer_works_offline() -> None:
    tok = open_clip.get_tokenizer("ViT-B-16")  # SimpleTokenizer: BPE vocab ships in the wheel
    ids = tok(["a photo of a cat."])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and (ids[0] == 49407).sum() == 1


@pytest.fixture
def tiny_clip_ckpt(tiny_openclip: dict, tmp_path: Path) -> tuple[open_clip.CLIP, Path]:
    torch.manual_seed(3)
    clip = open_clip.CLIP(**tiny_openclip).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(2.5)  # not the init value, so the head must read it from the model
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    return clip, path


def test_zeroshot_logits_equal_clip_logits(tiny_clip_ckpt, tiny_openclip: dict, pixels: torch.Tensor) -> None:
    clip, path = tiny_clip_ckpt
    cfg = BackboneConfig(family="openclip", name="tiny", openclip_cfg=tiny_openclip, pretrained=str(path))
    bb, head = build_openclip_zeroshot(cfg, CLASSES)
    bb.model.eval()
    tok = open_clip.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        img, txt, scale = clip(pixels, tok([f"a photo of a {c}." for c in CLASSES]))
        expected = scale * img @ txt.T  # CLIP's image-text logits
        got = head(bb.model(pixels))
    assert isinstance(head, ZeroShotHead) and head.weight.shape == (3, 32)
    assert float(scale) == pytest.approx(math.exp(2.5))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    # the text tower is gone: the backbone holds exactly the image tower, frozen
    assert count_parameters(bb.model) == count_parameters(clip.visual)
    assert all(k.startswith("visual.") for k in bb.model.state_dict())
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert all(p.requires_grad for p in head.parameters())


def test_zeroshot_multiple_templates_average(tiny_clip_ckpt, tiny_openclip: dict, pixels: torch.Tensor) -> None:
    clip, path = tiny_clip_ckpt
    templates = ("a photo of a {}.", "a drawing of a {}.")
    cfg = BackboneConfig(
        family="openclip",
        name="tiny",
        openclip_cfg=tiny_openclip,
        pretrained=str(path),
        precision="bf16",
    )
    bb, head = build_openclip_zeroshot(cfg, CLASSES, templates=templates)
    tok = open_clip.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        per_t = [F.normalize(clip.encode_text(tok([t.format(c) for c in CLASSES])), dim=-1) for t in templates]
        expected_w = clip.logit_scale.exp() * F.normalize(sum(per_t) / 2, dim=-1)
    torch.testing.assert_close(head.weight, expected_w)
    assert head.weight.dtype == torch.float32  # head stays fp32
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    assert head(bb.model(pixels)).shape == (2, 3)


def test_zeroshot_needs_text_weights(tiny_clip_ckpt, tiny_openclip: dict, tmp_path: Path) -> None:
    clip, _ = tiny_clip_ckpt
    vis = tmp_path / "visual.pt"
    torch.save({f"visual.{k}": v for k, v in clip.visual.state_dict().items()}, vis)
    cfg = BackboneConfig(family="openclip", name="tiny", openclip_cfg=tiny_openclip, pretrained=str(vis))
    with pytest.raises(RuntimeError, match="image AND text towers"):
        build_openclip_zeroshot(cfg, CLASSES)
