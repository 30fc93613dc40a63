"""OpenCLIP image towers (ViT-B-16 ... ViT-bigG-14) as frozen backbones.

The feature model is :class:`OpenCLIPFeatures`: OpenCLIP's ``VisionTransformer`` registered as
``visual``, so its state-dict keys are exactly the ``visual.*`` keys of a full OpenCLIP checkpoint.
Its output is the visual tower's output INCLUDING the image projection ``proj``: ``width`` is the
model's ``embed_dim`` (512 for ViT-B-16), the space the text tower embeds into, which the zero-shot
head needs.

Adapter sites per block ``visual.transformer.resblocks.<i>``: ``attn`` (nn.MultiheadAttention,
fused q/k/v in ``in_proj_weight``), ``ln_2`` (its input is the residual stream after attention),
``mlp`` (Sequential ``c_fc``, ``gelu``, ``c_proj``).

Only the image tower is built for training; :func:`build_openclip_zeroshot` builds the full model,
initialises a zero-shot head through the text tower, then drops the text tower.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosa_scale.backbones.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    BackboneConfig,
    BlockSites,
    BuildArgs,
    FeatureModel,
    finalize_backbone,
    resolve_dtype,
    resolve_image_spec,
)
from mosa_scale.backbones.head import DEFAULT_TEMPLATES, ZeroShotHead, build_head
from mosa_scale.backbones.registry import register_backbone

logger = logging.getLogger(__name__)


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# preferred file names inside a local directory, in order (OpenCLIP / HF hub layouts)
DIR_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


@dataclass(frozen=True)
class VisionSpec:
    """Published shape and size of an OpenCLIP image tower (patch embed .. projection)."""

    params_m: float  # published image-tower parameters, millions (incl. ``proj``)
    width: int
    layers: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    embed_dim: int  # output width (after ``proj``)


OPENCLIP_VISION_SPECS: dict[str, VisionSpec] = {
    "ViT-B-16": VisionSpec(86.2, 768, 12, 12, 3072, 16, 224, 512),
    "ViT-L-14": VisionSpec(304.0, 1024, 24, 16, 4096, 14, 224, 768),
    "ViT-H-14": VisionSpec(632.1, 1280, 32, 16, 5120, 14, 224, 1024),
    "ViT-g-14": VisionSpec(1012.6, 1408, 40, 16, 6144, 14, 224, 1024),
    "ViT-bigG-14": VisionSpec(1844.9, 1664, 48, 16, 8192, 14, 224, 1280),
}


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError(
            "family 'openclip' needs open_clip_torch: pip install open_clip_torch"
        ) from e
    return open_clip


class OpenCLIPFeatures(FeatureModel):
    """OpenCLIP ``VisionTransformer`` under prefix ``visual``; returns projected features."""

    prefix = "visual"

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, embed_dim): ln_post(pool(tokens)) @ proj
        return self.visual(pixels)


def openclip_model_cfg(cfg: BackboneConfig) -> dict[str, Any]:
    """The OpenCLIP model config for ``cfg`` with its overrides applied.

    Args:
        cfg: An ``openclip`` family config.

    Returns:
        A fresh dict with ``embed_dim``, ``vision_cfg`` (and ``text_cfg`` when known).

    Raises:
        ValueError: If ``cfg.name`` is not a built-in OpenCLIP model and no ``openclip_cfg`` is
            given, or if the image size does not divide into patches.
    """
    if cfg.openclip_cfg is not None:
        model_cfg = copy.deepcopy(dict(cfg.openclip_cfg))
    else:
        oc = _open_clip()
        model_cfg = oc.get_model_config(cfg.name)
        if model_cfg is None:
            close = difflib.get_close_matches(cfg.name, oc.list_models(), n=3)
            raise ValueError(
                f"name={cfg.name!r} is not a built-in OpenCLIP model (did you mean {close}?); "
                "or pass a model config dict as openclip_cfg"
            )
    vision = dict(model_cfg["vision_cfg"])
    vision["output_tokens"] = False
    if cfg.image_size is not None:
        vision["image_size"] = cfg.image_size
    if cfg.pooling == "mean":
        vision["pool_type"] = "avg"
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int) or size % patch:
        raise ValueError(
            f"image_size={size} with patch_size={patch}: use a square int size divisible by the "
            "patch size"
        )
    model_cfg["vision_cfg"] = vision
    return model_cfg


def _known_tags(name: str) -> list[str]:
    return list(_open_clip().list_pretrained_tags_by_model(name))


def resolve_openclip_weights(cfg: BackboneConfig) -> tuple[str | None, dict[str, Any], str]:
    """Resolve ``cfg.pretrained`` to a local checkpoint file.

    Order: ``None`` -> random; an existing file; an existing directory (preferred OpenCLIP / HF
    file names, else its only checkpoint file); a bare word that is a pretrained tag of
    ``cfg.name`` (fetched through OpenCLIP's own download, which honours ``HF_HUB_OFFLINE``).
    Path-like values (containing ``/``, starting with ``.`` or ``~``, or ending in a checkpoint
    suffix) are checked before any library is imported.

    Args:
        cfg: An ``openclip`` family config.

    Returns:
        ``(checkpoint_path or None, preprocess overrides {"mean", "std"}, source label)``.

    Raises:
        FileNotFoundError: A missing path, an empty directory, or an unknown tag; names the value.
        ValueError: A directory with several candidate checkpoints and none preferred.
        RuntimeError: A known tag whose weights could not be fetched (offline, no cache).
    """
    p = cfg.pretrained
    if p is None:
        return None, {}, "random"
    path = Path(p).expanduser()
    pathlike = "/" in p or "\\" in p or p.startswith((".", "~")) or p.endswith(CHECKPOINT_SUFFIXES)
    if path.is_file():
        return str(path), {}, str(path)
    if path.is_dir():
        return _checkpoint_in_dir(path), _dir_preprocess(path), str(path)
    if pathlike:
        raise FileNotFoundError(
            f"pretrained={p!r}: no such file or directory ({path.resolve()}); give an existing "
            "OpenCLIP checkpoint file, a directory holding one, or a pretrained tag"
        )
    oc = _open_clip()
    tag_cfg = oc.get_pretrained_cfg(cfg.name, p)
    if not tag_cfg:
        raise FileNotFoundError(
            f"pretrained={p!r}: not an existing file or directory, and not a pretrained tag of "
            f"OpenCLIP model {cfg.name!r} (known tags: {_known_tags(cfg.name)})"
        )
    try:
        ckpt = oc.download_pretrained(tag_cfg)
    except Exception as e:  # noqa: BLE001 - hub/url errors have many types; re-raised typed
        raise RuntimeError(
            f"could not fetch OpenCLIP weights {cfg.name!r} tag {p!r} ({type(e).__name__}: {e}). "
            "Offline? Download the checkpoint once and set pretrained to its local file or "
            "directory."
        ) from e
    if not ckpt:
        raise RuntimeError(f"OpenCLIP returned no checkpoint for {cfg.name!r} tag {p!r}")
    model_qg = bool(
        (cfg.openclip_cfg or oc.get_model_config(cfg.name) or {}).get("quick_gelu", False)
    )
    if bool(tag_cfg.get("quick_gelu", False)) != model_qg:
        logger.warning(
            "tag %r was trained with quick_gelu=%s but model %r uses quick_gelu=%s: features will "
            "be off; use the '%s-quickgelu' model name",
            p,
            tag_cfg.get("quick_gelu", False),
            cfg.name,
            model_qg,
            cfg.name,
        )
    pre = {k: tuple(tag_cfg[k]) for k in ("mean", "std") if k in tag_cfg}
    return str(ckpt), pre, p


def _checkpoint_in_dir(path: Path) -> str:
    for name in DIR_CHECKPOINT_NAMES:
        if (path / name).is_file():
            return str(path / name)
    found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
    if not found:
        raise FileNotFoundError(
            f"pretrained={str(path)!r}: directory holds no checkpoint (looked for "
            f"{list(DIR_CHECKPOINT_NAMES)} and *{'/*'.join(CHECKPOINT_SUFFIXES)})"
        )
    if len(found) > 1:
        raise ValueError(
            f"pretrained={str(path)!r}: several checkpoints {[f.name for f in found]}; "
            "set pretrained to the file you want"
        )
    return str(found[0])


def _dir_preprocess(path: Path) -> dict[str, Any]:
    cfg_file = path / "open_clip_config.json"
    if not cfg_file.is_file():
        return {}
    with open(cfg_file, encoding="utf-8") as f:
        pre = json.load(f).get("preprocess_cfg", {})
    return {k: tuple(pre[k]) for k in ("mean", "std") if k in pre}


def _load_visual_state(model: OpenCLIPFeatures, ckpt: str) -> None:
    """Load the ``visual.*`` part of an OpenCLIP checkpoint (or a visual-only state dict)."""
    _open_clip()
    from open_clip.factory import load_state_dict
    from open_clip.model import resize_pos_embed

    if Path(ckpt).suffix in (".npz", ".npy"):
        raise ValueError(
            f"{ckpt}: big_vision numpy checkpoints are not supported; convert to an OpenCLIP "
            "state dict first"
        )
    sd = load_state_dict(ckpt, device="cpu", weights_only=True)
    if any(k.startswith("visual.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
    else:  # a state dict of the image tower alone
        sd = {f"visual.{k}": v for k, v in sd.items()}
    resize_pos_embed(sd, model)  # resizes visual.positional_embedding to the built grid
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"checkpoint {ckpt} does not fit the configured OpenCLIP image tower; check name / "
            f"openclip_cfg against the checkpoint: {e}"
        ) from e


def _check_supported(visual: nn.Module) -> None:
    _open_clip()
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"OpenCLIP image tower is a {type(visual).__name__}: only ViT towers "
            "(open_clip VisionTransformer) are supported; timm and ResNet towers are not"
        )
    if visual.attn_pool is not None:
        raise ValueError("OpenCLIP attentional pooling (CoCa) towers are not supported")
    for i, blk in enumerate(visual.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock or not isinstance(
            blk.attn, nn.MultiheadAttention
        ):
            raise ValueError(
                f"block {i} is a {type(blk).__name__}: custom OpenCLIP blocks (qk_norm, "
                "scaled_cosine_attn, scale_attn, scale_fc, ...) are not supported"
            )


def openclip_sites(visual: nn.Module, prefix: str = OpenCLIPFeatures.prefix) -> list[BlockSites]:
    """Adapter sites of every block of an OpenCLIP ViT tower.

    Args:
        visual: The OpenCLIP ``VisionTransformer``.
        prefix: Its name inside the feature model.

    Returns:
        One :class:`BlockSites` per block.
    """
    base = f"{prefix}.transformer.resblocks"
    return [
        BlockSites(
            block=f"{base}.{i}",
            attn=f"{base}.{i}.attn",
            ln2=f"{base}.{i}.ln_2",
            mlp=f"{base}.{i}.mlp",
            qkv_fused=f"{base}.{i}.attn",
        )
        for i in range(len(visual.transformer.resblocks))
    ]


def _make_backbone(
    cfg: BackboneConfig,
    visual: nn.Module,
    source: str,
    pre: Mapping[str, Any],
) -> Backbone:
    model = OpenCLIPFeatures(visual)
    h, w = visual.image_size
    if h != w:
        raise ValueError(f"image size {visual.image_size}: only square inputs are supported")
    width = visual.output_dim if visual.proj is not None else visual.transformer.width
    return Backbone(
        model=model,
        image=resolve_image_spec(cfg, h, pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD)),
        width=int(width),
        sites=openclip_sites(visual),
        name=f"openclip:{cfg.name}",
        source=source,
        blocks_path=f"{OpenCLIPFeatures.prefix}.transformer.resblocks",
    )


@register_backbone("openclip")
def build_openclip(cfg: BackboneConfig, args: BuildArgs) -> Backbone:
    """Build the frozen OpenCLIP image tower (no text tower). Use ``build_backbone``."""
    ckpt, pre, source = resolve_openclip_weights(cfg)  # before importing/allocating anything
    _open_clip()
    from open_clip.model import _build_vision_tower

    model_cfg = openclip_model_cfg(cfg)
    with args.device:
        # cast_dtype=None: plain LayerNorm that runs in the weights' dtype after the cast below
        visual = _build_vision_tower(
            model_cfg["embed_dim"],
            model_cfg["vision_cfg"],
            model_cfg.get("quick_gelu", False),
            None,
        )
    _check_supported(visual)
    bb = _make_backbone(cfg, visual, source, pre)
    if ckpt is not None:
        _load_visual_state(bb.model, ckpt)  # type: ignore[arg-type]
    bb.model.to(dtype=args.dtype)
    return bb


def _openclip_tokenizer(cfg: BackboneConfig, model_cfg: Mapping[str, Any]) -> Any:
    oc = _open_clip()
    if cfg.openclip_cfg is None:
        return oc.get_tokenizer(cfg.name)
    text = dict(model_cfg.get("text_cfg", {}))
    ctx = text.get("context_length", 77)
    kwargs = dict(text.get("tokenizer_kwargs") or {})
    if text.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(
            text["hf_tokenizer_name"],
            context_length=ctx,
            tokenizer_mode=text.get("tokenizer_mode"),
            **kwargs,
        )
    return oc.SimpleTokenizer(context_length=ctx, **kwargs)


def build_openclip_zeroshot(
    cfg: BackboneConfig,
    class_names: Sequence[str],
    *,
    templates: Sequence[str | Callable[[str], str]] = DEFAULT_TEMPLATES,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Backbone, ZeroShotHead]:
    """Build the full OpenCLIP model, initialise a zero-shot head, then drop the text tower.

    The head's logits equal OpenCLIP's ``logit_scale * cos(image, text)`` for the class prompts;
    the returned backbone holds only the image tower (frozen, in ``dtype``), the head stays fp32.

    Args:
        cfg: An ``openclip`` family config; ``pretrained`` must hold both towers (or be None).
        class_names: One name per class.
        templates: Prompt templates (``"a photo of a {}."`` by default).
        device: Where to build.
        dtype: Frozen-weight dtype; ``None`` uses ``cfg.precision``.

    Returns:
        ``(backbone, head)``.

    Raises:
        ValueError: Not an ``openclip`` config, or no text tower in the config.
        FileNotFoundError: ``cfg.pretrained`` is a missing path.
        RuntimeError: The checkpoint lacks the text tower or does not fit the model.
    """
    if cfg.family != "openclip":
        raise ValueError(f"family={cfg.family!r}: zero-shot heads need family 'openclip'")
    ckpt, pre, source = resolve_openclip_weights(cfg)
    oc = _open_clip()
    model_cfg = openclip_model_cfg(cfg)
    if "text_cfg" not in model_cfg:
        raise ValueError("openclip_cfg has no text_cfg: a zero-shot head needs the text tower")
    custom = bool(model_cfg.pop("custom_text", False)) or bool(
        model_cfg["text_cfg"].get("hf_model_name")
    )
    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa models are not supported")
    dt = resolve_dtype(cfg, dtype)
    dev = torch.device(device)
    with dev:
        full = (oc.CustomTextCLIP if custom else oc.CLIP)(**model_cfg, cast_dtype=None)
    _check_supported(full.visual)
    if ckpt is not None:
        try:
            oc.load_checkpoint(full, ckpt, strict=True, weights_only=True)
        except RuntimeError as e:
            raise RuntimeError(
                f"checkpoint {ckpt} does not fit the full OpenCLIP model {cfg.name!r} (zero-shot "
                f"needs image AND text towers): {e}"
            ) from e
    tokenizer = _openclip_tokenizer(cfg, model_cfg)
    width = full.visual.output_dim
    head = build_head(
        "zeroshot",
        width,
        len(class_names),
        class_names=class_names,
        openclip_model=full,
        tokenizer=tokenizer,
        templates=templates,
    )
    assert isinstance(head, ZeroShotHead)
    visual = full.visual
    del full  # drops the text tower: only the image tower is referenced from here on
    bb = _make_backbone(cfg, visual, source, pre)
    bb.model.to(dtype=dt)
    return finalize_backbone(bb, dt, dev), head
