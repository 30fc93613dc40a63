"""Shared tiny configs for the backbone tests; the hub is switched off for every test here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mosa_scale.backbones import BackboneConfig  # noqa: E402

TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_HF = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 32,
    "patch_size": 8,
}
FAMILY_CFGS = {
    "openclip": BackboneConfig(family="openclip", name="tiny", openclip_cfg=TINY_OPENCLIP),
    "hf-vit": BackboneConfig(family="hf-vit", hf_config=TINY_HF),
    "hf-clip": BackboneConfig(family="hf-clip", hf_config=TINY_HF),
}


@pytest.fixture(params=sorted(FAMILY_CFGS))
def tiny_cfg(request: pytest.FixtureRequest) -> BackboneConfig:
    """A tiny config (width 64, 2 blocks, 32 px) of each family."""
    return FAMILY_CFGS[request.param]


@pytest.fixture
def pixels() -> torch.Tensor:
    """A fixed batch of two 32x32 images."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def tiny_hf() -> dict:
    """hf_config of a tiny HF tower (width 64, 2 blocks, 32 px, patch 8)."""
    return dict(TINY_HF)


@pytest.fixture
def tiny_openclip() -> dict:
    """openclip_cfg of a tiny OpenCLIP model (image width 64, 2 blocks, embed 32, 1 text block)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_OPENCLIP.items()}
