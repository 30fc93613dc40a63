"""Frozen vision backbones (OpenCLIP, HF ViT, HF CLIP vision) and where adapters go in them.

Importing this package registers the three families; open_clip and transformers are imported
only when a backbone of that family is built.
"""

from mosa_scale.backbones.base import (
    FAMILIES,
    Backbone,
    BackboneConfig,
    BlockSites,
    FeatureModel,
    ImageSpec,
    count_parameters,
)
from mosa_scale.backbones.checkpointing import (
    default_checkpoint_fn,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
)
from mosa_scale.backbones.head import DEFAULT_TEMPLATES, ZeroShotHead, build_head
from mosa_scale.backbones.hf import HFCLIPFeatures, HFViTFeatures
from mosa_scale.backbones.openclip import (
    OPENCLIP_VISION_SPECS,
    OpenCLIPFeatures,
    VisionSpec,
    build_openclip_zeroshot,
)
from mosa_scale.backbones.registry import build_backbone, register_backbone, registered_families

__all__ = [
    "DEFAULT_TEMPLATES",
    "FAMILIES",
    "OPENCLIP_VISION_SPECS",
    "Backbone",
    "BackboneConfig",
    "BlockSites",
    "FeatureModel",
    "HFCLIPFeatures",
    "HFViTFeatures",
    "ImageSpec",
    "OpenCLIPFeatures",
    "VisionSpec",
    "ZeroShotHead",
    "build_backbone",
    "build_head",
    "build_openclip_zeroshot",
    "count_parameters",
    "default_checkpoint_fn",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "register_backbone",
    "registered_families",
]
