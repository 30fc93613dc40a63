"""OpenCLIP image towers (ViT-B-16 ... ViT-bigG-14, SigLIP / SigLIP2, EVA02) as frozen backbones.

The feature model is :class:`OpenCLIPFeatures`: OpenCLIP's ``VisionTransformer`` registered as
``visual``, so its state-dict keys are exactly the ``visual.*`` keys of a full OpenCLIP checkpoint.
Its output is the visual tower's output INCLUDING the image projection ``proj``: ``width`` is the
model's ``embed_dim`` (512 for ViT-B-16), the space the text tower embeds into, which the zero-shot
head needs.

Adapter sites per block ``visual.transformer.resblocks.<i>``: ``attn`` (nn.MultiheadAttention,
fused q/k/v in ``in_proj_weight``), ``ln_2`` (its input is the residual stream after attention),
``mlp`` (Sequential ``c_fc``, ``gelu``, ``c_proj``).

OpenCLIP's timm-based towers (``TimmModel``: SigLIP / SigLIP2, EVA02) are built the same way;
their sites are described in :mod:`mosa_scale.backbones.timm_towers`.

Only the image tower is built for training, directly in its dtype (optionally partitioned
across ranks as it is built, see :mod:`mosa_scale.backbones.construct`), and only the image
tower's tensors of a checkpoint are read, one at a time. :func:`build_openclip_zeroshot` builds
the full model, initialises a zero-shot head through the text tower, then drops the text tower.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
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
from mosa_scale.backbones.construct import ShardHooks, construct_in_dtype, sharded_params
from mosa_scale.backbones.head import DEFAULT_TEMPLATES, ZeroShotHead, build_head
from mosa_scale.backbones.registry import register_backbone
from mosa_scale.backbones.timm_towers import (
    TIMM_KWARGS,
    check_timm_supported,
    finish_sharded_init,
    gathered_named_apply,
    is_timm_tower,
    timm_create_kwargs,
    timm_image_stats,
    timm_pos_embed_resize,
    timm_sites,
    timm_width,
)
from mosa_scale.backbones.weights import (
    INDEX_SUFFIX,
    Target,
    WeightsError,
    load_tensors,
    open_checkpoint,
    state_tensors,
    unexpected_keys,
)

logger = logging.getLogger(__name__)


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", INDEX_SUFFIX)
# preferred file names inside a local directory, in order (OpenCLIP / HF hub layouts)
DIR_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors.index.json",  # sharded safetensors: the index names each tensor's file
    "open_clip_model.safetensors",
    "model.safetensors.index.json",
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
        raise ImportError("family 'openclip' needs open_clip_torch: pip install open_clip_torch") from e
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
    if vision.get("timm_model_name"):
        if cfg.pooling != "cls":
            raise ValueError(
                f"pooling={cfg.pooling!r}: timm-based OpenCLIP towers ({vision['timm_model_name']}) keep "
                "their own pooling (class token or attention pooling, part of the pretrained head); "
                "use pooling='cls'"
            )
    elif cfg.pooling == "mean":
        vision["pool_type"] = "avg"
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if vision.get("timm_model_name"):  # the patch size is timm's: checked on the built trunk
        patch = 1
    if not isinstance(size, int) or not isinstance(patch, int) or size % patch:
        raise ValueError(
            f"image_size={size} with patch_size={patch}: use a square int size divisible by the patch size"
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
    model_qg = bool((cfg.openclip_cfg or oc.get_model_config(cfg.name) or {}).get("quick_gelu", False))
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
    indexes = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(INDEX_SUFFIX))
    if len(indexes) == 1:  # a sharded checkpoint: its shards are not separate candidates
        return str(indexes[0])
    found = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES))
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


def _openclip_pos_resize(model: OpenCLIPFeatures) -> Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]:
    from open_clip.model import resize_pos_embed

    def resize(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        sd = {"visual.positional_embedding": t}
        resize_pos_embed(sd, model)  # reads only the built grid size
        return sd["visual.positional_embedding"]

    return resize


def load_openclip_weights(model: OpenCLIPFeatures, ckpt: str, shard: ShardHooks | None = None) -> dict[str, float]:
    """Load the image tower's tensors of an OpenCLIP checkpoint, one tensor at a time.

    A full checkpoint (``visual.*`` keys next to the text tower) or a state dict of the image
    tower alone; only the image tower's tensors are read. Position embeddings are resized to the
    built grid (OpenCLIP ViT and timm trunks).

    Args:
        model: The built feature model (replicated, or partitioned when ``shard`` is given).
        ckpt: A checkpoint file or a sharded checkpoint's index.
        shard: The sharding hooks of a partitioned tower.

    Returns:
        The loader's counters (tensors, bytes read by this rank, seconds).

    Raises:
        ValueError: A big_vision numpy checkpoint.
        WeightsError: A tensor is missing, unexpected, or of another shape; names it and the file.
    """
    if Path(ckpt).suffix in (".npz", ".npy"):
        raise ValueError(
            f"{ckpt}: big_vision numpy checkpoints are not supported; convert to an OpenCLIP state dict first"
        )
    reader = open_checkpoint(ckpt)
    try:
        full = any(k.startswith("visual.") for k in reader.keys())  # else: the image tower alone
        skip = 0 if full else len("visual.")
        targets = [Target(name, t, name[skip:]) for name, t in state_tensors(model)]
        extra = unexpected_keys(reader, {t.key for t in targets}, "visual." if full else "")
        if extra:
            raise WeightsError(
                f"checkpoint {reader.label} does not fit the configured OpenCLIP image tower: "
                f"{len(extra)} unexpected image-tower tensors, e.g. {extra[:5]} (in "
                f"{reader.file_of(extra[0])}); check name / openclip_cfg against the checkpoint"
            )
        transforms = {"visual.positional_embedding": _openclip_pos_resize(model)}
        if is_timm_tower(model.visual):
            transforms["visual.trunk.pos_embed"] = timm_pos_embed_resize(model.visual)
        return load_tensors(targets, reader, shard=shard, transforms=transforms, what="OpenCLIP image tower")
    finally:
        reader.close()


def _check_supported(visual: nn.Module) -> None:
    _open_clip()
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if is_timm_tower(visual):
        check_timm_supported(visual)
        return
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"OpenCLIP image tower is a {type(visual).__name__}: only ViT towers "
            "(open_clip VisionTransformer or timm ViT / EVA) are supported; ResNet towers are not"
        )
    if visual.attn_pool is not None:
        raise ValueError("OpenCLIP attentional pooling (CoCa) towers are not supported")
    for i, blk in enumerate(visual.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock or not isinstance(blk.attn, nn.MultiheadAttention):
            raise ValueError(
                f"block {i} is a {type(blk).__name__}: custom OpenCLIP blocks (qk_norm, "
                "scaled_cosine_attn, scale_attn, scale_fc, ...) are not supported"
            )


def openclip_sites(visual: nn.Module, prefix: str = OpenCLIPFeatures.prefix) -> list[BlockSites]:
    """Adapter sites of every block of an OpenCLIP ViT tower (or a timm trunk).

    Args:
        visual: The OpenCLIP ``VisionTransformer`` (or ``TimmModel``).
        prefix: Its name inside the feature model.

    Returns:
        One :class:`BlockSites` per block.
    """
    if is_timm_tower(visual):
        return timm_sites(visual, prefix)
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
    if is_timm_tower(visual):
        patch = visual.trunk.patch_embed.patch_size[0]
        if h % patch:
            raise ValueError(f"image_size={h} is not divisible by the timm trunk's patch size {patch}")
        width = timm_width(visual)
        stats = timm_image_stats(visual)
        pre = {**stats, **pre}
        blocks = f"{OpenCLIPFeatures.prefix}.trunk.blocks"
    else:
        width = visual.output_dim if visual.proj is not None else visual.transformer.width
        blocks = f"{OpenCLIPFeatures.prefix}.transformer.resblocks"
    return Backbone(
        model=model,
        image=resolve_image_spec(cfg, h, pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD)),
        width=int(width),
        sites=openclip_sites(visual),
        name=f"openclip:{cfg.name}",
        source=source,
        blocks_path=blocks,
    )


def _construct_visual(model_cfg: Mapping[str, Any], args: BuildArgs) -> nn.Module:
    """The image tower, constructed in ``args.dtype`` (on ``args.device``, or partitioned)."""
    from open_clip.model import _build_vision_tower

    vision = dict(model_cfg["vision_cfg"])
    timm = bool(vision.get("timm_model_name"))
    with ExitStack() as stack:
        stack.enter_context(args.shard.device if args.shard is not None else args.device)
        stack.enter_context(construct_in_dtype(args.dtype))
        if timm:
            stack.enter_context(timm_create_kwargs(vision))
        if args.shard is not None:
            stack.enter_context(args.shard.construct())
            if timm:
                stack.enter_context(gathered_named_apply(args.shard))
        vision.pop(TIMM_KWARGS, None)
        # cast_dtype=None: plain LayerNorm that runs in the weights' dtype
        visual = _build_vision_tower(
            model_cfg["embed_dim"],
            vision,
            model_cfg.get("quick_gelu", False),
            None,
        )
    if args.shard is not None:
        with construct_in_dtype(args.dtype):  # the same init numerics as during construction
            _finish_sharded_init(visual, args.shard)
    return visual


def _finish_sharded_init(visual: nn.Module, shard: ShardHooks) -> None:
    """Initialisation a parent module writes into a child's (already partitioned) weights."""
    if is_timm_tower(visual):
        finish_sharded_init(visual, shard)
    for m in visual.modules():
        # nn.MultiheadAttention._reset_parameters zeroes its out_proj's bias after out_proj was built
        if isinstance(m, nn.MultiheadAttention) and m.out_proj.bias is not None:
            with torch.no_grad(), shard.modify(sharded_params(m.out_proj, shard, children=False)):
                m.out_proj.bias.zero_()


@register_backbone("openclip")
def build_openclip(cfg: BackboneConfig, args: BuildArgs) -> Backbone:
    """Build the frozen OpenCLIP image tower (no text tower). Use ``build_backbone``."""
    ckpt, pre, source = resolve_openclip_weights(cfg)  # before importing/allocating anything
    _open_clip()
    model_cfg = openclip_model_cfg(cfg)
    visual = _construct_visual(model_cfg, args)
    _check_supported(visual)
    bb = _make_backbone(cfg, visual, source, pre)
    if ckpt is not None:
        bb.loaded = load_openclip_weights(bb.model, ckpt, shard=args.shard)  # type: ignore[arg-type]
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
    custom = bool(model_cfg.pop("custom_text", False)) or bool(model_cfg["text_cfg"].get("hf_model_name"))
    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa models are not supported")
    dt = resolve_dtype(cfg, dtype)
    dev = torch.device(device)
    with ExitStack() as stack:
        stack.enter_context(dev)
        vision = model_cfg["vision_cfg"]
        if vision.get("timm_model_name"):
            stack.enter_context(timm_create_kwargs(vision))
            model_cfg["vision_cfg"] = {k: v for k, v in vision.items() if k != TIMM_KWARGS}
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
