"""Tiny configs of every tower kind (width 64, 2 blocks, 32 px), shared by tests and launched workers."""

from __future__ import annotations

from mosa_scale.backbones import BackboneConfig

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
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
# OpenCLIP timm towers: the real timm architectures, shrunk through timm_model_kwargs
TINY_SIGLIP = {  # SigLIP / SigLIP2: timm ViT, no class token, attention-pool (MAP) head, fused qkv
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": "vit_base_patch16_siglip_224",
        "timm_pool": "map",
        "timm_proj": "none",
        "timm_model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 8},
    },
    "text_cfg": _TEXT,
    "custom_text": True,
}
TINY_EVA = {  # EVA02-B/L: pre-norm EVA blocks, separate q/k/v, SwiGLU, rotary embeddings
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": "eva02_large_patch14_clip_224",
        "timm_pool": "token",
        "timm_proj": None,
        "timm_model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 8, "ref_feat_shape": [4, 4]},
    },
    "text_cfg": _TEXT,
    "custom_text": True,
}
TINY_EVA_E = {  # EVA02-E: post-norm EVA blocks, fused qkv with separate q/v biases
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": "eva02_enormous_patch14_clip_224",
        "timm_pool": "token",
        "timm_proj": None,
        "timm_model_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 8, "mlp_ratio": 4.0},
    },
    "text_cfg": _TEXT,
    "custom_text": True,
}

TOWERS = {
    "openclip": BackboneConfig(family="openclip", name="tiny", openclip_cfg=TINY_OPENCLIP),
    "hf-vit": BackboneConfig(family="hf-vit", hf_config=TINY_HF),
    "hf-clip": BackboneConfig(family="hf-clip", hf_config=TINY_HF),
    "siglip": BackboneConfig(family="openclip", name="tiny-siglip", openclip_cfg=TINY_SIGLIP),
    "eva02": BackboneConfig(family="openclip", name="tiny-eva02", openclip_cfg=TINY_EVA),
    "eva02-e": BackboneConfig(family="openclip", name="tiny-eva02-e", openclip_cfg=TINY_EVA_E),
}
