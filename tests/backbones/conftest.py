"""Shared tiny configs for the backbone tests; the hub is switched off for every test here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_towers import TINY_HF, TINY_OPENCLIP, TOWERS  # noqa: E402

from mosa_scale.backbones import BackboneConfig  # noqa: E402

FAMILY_CFGS = dict(TOWERS)  # the three families and OpenCLIP's timm towers (SigLIP, EVA02, EVA02-E)


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
