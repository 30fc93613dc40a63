"""Hugging Face vision towers (transformers 5): ``ViTModel`` and ``CLIPVisionModel``.

Feature models and their state-dict prefixes:

* ``hf-vit``  -> :class:`HFViTFeatures`, tower under ``vit`` (as in ``ViTForImageClassification``).
  Output: ``pooling="cls"``: CLS token of ``last_hidden_state`` (already after the final
  ``layernorm``); ``"mean"``: mean of the patch tokens; ``"pooler"``: ViT's ``pooler`` (dense+tanh).
* ``hf-clip`` -> :class:`HFCLIPFeatures`, tower under ``vision_model`` (as in ``CLIPModel``).
  Output: ``"cls"``: ``pooler_output`` = ``post_layernorm(CLS)`` (no visual projection);
  ``"mean"``: ``post_layernorm(mean of patch tokens)``.

Adapter sites (transformers 5 module names, relative to the feature model):

* ViT:  ``vit.layers.<i>``: ``attention`` (q_proj/k_proj/v_proj/o_proj), ``layernorm_after``,
  ``mlp`` (fc1, fc2).
* CLIP: ``vision_model.encoder.layers.<i>``: ``self_attn`` (q_proj/k_proj/v_proj/out_proj),
  ``layer_norm2``, ``mlp`` (fc1, fc2).
"""

from __future__ import annotations

import json
import logging
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
    resolve_image_spec,
)
from mosa_scale.backbones.construct import ShardHooks, construct_in_dtype, sharded_params
from mosa_scale.backbones.registry import register_backbone
from mosa_scale.backbones.weights import Target, WeightsError, load_tensors, open_checkpoint, state_tensors

logger = logging.getLogger(__name__)

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


class HFViTFeatures(FeatureModel):
    """``transformers.ViTModel`` under prefix ``vit``."""

    prefix = "vit"

    def __init__(self, tower: nn.Module, pooling: str, interpolate_pos_encoding: bool) -> None:
        super().__init__(tower)
        self.pooling = pooling
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, D)
        out = self.vit(pixel_values=pixels, interpolate_pos_encoding=self.interpolate_pos_encoding)
        h = out.last_hidden_state  # (B, 1 + N, D), after the final layernorm
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "mean":
            return h[:, 1:].mean(dim=1)
        return out.pooler_output  # (B, D) dense + tanh on CLS


class HFCLIPFeatures(FeatureModel):
    """``transformers.CLIPVisionModel`` under prefix ``vision_model``."""

    prefix = "vision_model"

    def __init__(self, tower: nn.Module, pooling: str, interpolate_pos_encoding: bool) -> None:
        super().__init__(tower)
        self.pooling = pooling
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, D)
        vm = self.vision_model
        out = vm(pixel_values=pixels, interpolate_pos_encoding=self.interpolate_pos_encoding)
        if self.pooling == "cls":
            return out.pooler_output  # post_layernorm(CLS)
        return vm.post_layernorm(out.last_hidden_state[:, 1:].mean(dim=1))


@dataclass(frozen=True)
class _HFFamily:
    config_cls: str
    model_cls: str
    model_types: tuple[str, ...]  # config.json model_type values this family loads
    features: type[FeatureModel]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    blocks: str  # ModuleList of blocks, relative to the tower
    attn: str
    ln2: str
    mlp: str
    q: str
    v: str


_FAMILIES: dict[str, _HFFamily] = {
    "hf-vit": _HFFamily(
        config_cls="ViTConfig",
        model_cls="ViTModel",
        model_types=("vit",),
        features=HFViTFeatures,
        mean=IMAGENET_STANDARD_MEAN,
        std=IMAGENET_STANDARD_STD,
        blocks="layers",
        attn="attention",
        ln2="layernorm_after",
        mlp="mlp",
        q="attention.q_proj",
        v="attention.v_proj",
    ),
    "hf-clip": _HFFamily(
        config_cls="CLIPVisionConfig",
        model_cls="CLIPVisionModel",
        model_types=("clip_vision_model",),
        features=HFCLIPFeatures,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        blocks="encoder.layers",
        attn="self_attn",
        ln2="layer_norm2",
        mlp="mlp",
        q="self_attn.q_proj",
        v="self_attn.v_proj",
    ),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("families 'hf-vit'/'hf-clip' need transformers>=5") from e
    return transformers


def check_hf_dir(cfg: BackboneConfig) -> Path:
    """Check ``cfg.pretrained`` is a ``save_pretrained`` directory of the right model type.

    Runs before transformers is imported, so a wrong path fails at once.

    Args:
        cfg: An ``hf-vit`` / ``hf-clip`` config with ``pretrained`` set.

    Returns:
        The directory.

    Raises:
        FileNotFoundError: The directory or its ``config.json`` is missing; names the path.
        NotADirectoryError: ``pretrained`` is a file.
        ValueError: ``config.json`` describes another model type.
    """
    assert cfg.pretrained is not None
    d = Path(cfg.pretrained).expanduser()
    if not d.exists():
        raise FileNotFoundError(
            f"pretrained={cfg.pretrained!r}: no such directory ({d.resolve()}); family "
            f"{cfg.family!r} loads a local directory written by save_pretrained (hub ids are not "
            "fetched: download the model first)"
        )
    if not d.is_dir():
        raise NotADirectoryError(
            f"pretrained={cfg.pretrained!r} is a file; family {cfg.family!r} needs the directory "
            "written by save_pretrained (config.json + model.safetensors)"
        )
    conf = d / "config.json"
    if not conf.is_file():
        raise FileNotFoundError(f"{conf}: missing; pretrained must be a directory written by save_pretrained")
    with open(conf, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    fam = _FAMILIES[cfg.family]
    if model_type not in fam.model_types:
        raise ValueError(
            f"{conf}: model_type={model_type!r}, but family {cfg.family!r} loads "
            f"{list(fam.model_types)}; pick the family that matches the checkpoint"
        )
    return d


def _dir_image_stats(d: Path) -> dict[str, tuple[float, ...]]:
    f = d / "preprocessor_config.json"
    if not f.is_file():
        return {}
    with open(f, encoding="utf-8") as fh:
        pre = json.load(fh)
    return {k: tuple(pre[f"image_{k}"]) for k in ("mean", "std") if f"image_{k}" in pre}


def hf_sites(fam: _HFFamily, prefix: str, num_layers: int) -> list[BlockSites]:
    """Adapter sites of every block of an HF vision tower."""
    base = f"{prefix}.{fam.blocks}"
    return [
        BlockSites(
            block=f"{base}.{i}",
            attn=f"{base}.{i}.{fam.attn}",
            ln2=f"{base}.{i}.{fam.ln2}",
            mlp=f"{base}.{i}.{fam.mlp}",
            q=f"{base}.{i}.{fam.q}",
            v=f"{base}.{i}.{fam.v}",
        )
        for i in range(num_layers)
    ]


HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")


def _hf_checkpoint(d: Path) -> Path:
    for name in HF_WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(
        f"{d}: no weights file (looked for {list(HF_WEIGHT_FILES)}); pretrained must be a "
        "directory written by save_pretrained"
    )


def _hf_key_map(tower: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model tensor name -> checkpoint key, through transformers' own checkpoint renamings
    (legacy names such as ``encoder.layer.0.attention.attention.query``, base-model prefixes).

    Raises:
        WeightsError: A needed tensor would need a transformers weight conversion (fusing,
            splitting), which is not a per-tensor copy.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(tower)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    names = {name: True for name, _ in state_tensors(tower)}
    out: dict[str, str] = {}
    for key in keys:
        new, converted = rename_source_key(key, renamings, converters, tower.base_model_prefix, names)
        if new in names:
            if converted is not None:
                raise WeightsError(
                    f"checkpoint tensor {key!r} needs a transformers weight conversion "
                    f"({converted}); load this model replicated (ZeRO stage 0-2)"
                )
            out[new] = key
    return out


def load_hf_weights(tower: nn.Module, d: Path, shard: ShardHooks | None = None) -> dict[str, float]:
    """Load a ``save_pretrained`` directory into a built tower, one tensor at a time.

    Checkpoint tensors the tower does not have (e.g. a pooler it was built without) are ignored,
    as ``from_pretrained`` does; every tower tensor must be present.

    Raises:
        FileNotFoundError: No weights file in ``d``.
        WeightsError: A tower tensor is missing or of another shape (names it and the file).
    """
    reader = open_checkpoint(_hf_checkpoint(d))
    try:
        key_of = _hf_key_map(tower, reader.keys())
        targets = [Target(name, t, key_of.get(name, name)) for name, t in state_tensors(tower)]
        return load_tensors(targets, reader, shard=shard, what=f"HF {type(tower).__name__}")
    finally:
        reader.close()


def _hf_sharded_init(tower: nn.Module, shard: ShardHooks) -> None:
    """transformers' weight init (``post_init``) ran on already-partitioned (empty) weights:
    run it again in its own order (``initialize_weights``' module recursion), each module with
    its own and its children's weights gathered, so the draws equal a replicated build's."""
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    for m in tower.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    custom = bool(tower.is_custom_code())

    def apply(module: nn.Module, fn: Any) -> None:
        for child in module.children():
            apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        with shard.modify(sharded_params(module, shard)):
            fn(module, custom)

    with torch.no_grad(), guard_torch_init_functions():
        apply(tower, tower._initialize_weights)


def _build_hf(cfg: BackboneConfig, args: BuildArgs) -> Backbone:
    fam = _FAMILIES[cfg.family]
    overrides = dict(cfg.hf_config or {})
    init_kwargs: dict[str, Any] = {}
    if cfg.family == "hf-vit":
        init_kwargs["add_pooling_layer"] = cfg.pooling == "pooler"
    stats: dict[str, tuple[float, ...]] = {}
    d = check_hf_dir(cfg) if cfg.pretrained is not None else None  # before importing transformers
    tf = _transformers()
    config_cls, model_cls = getattr(tf, fam.config_cls), getattr(tf, fam.model_cls)
    if d is None or args.shard is not None:
        try:
            config = config_cls(**overrides) if d is None else config_cls.from_pretrained(str(d), **overrides)
        except TypeError as e:
            raise ValueError(f"hf_config={overrides}: not accepted by {fam.config_cls}: {e}") from e
        if cfg.image_size is not None and d is None:
            config.image_size = cfg.image_size
        with ExitStack() as stack:
            stack.enter_context(args.shard.device if args.shard is not None else args.device)
            stack.enter_context(construct_in_dtype(args.dtype))
            if args.shard is not None:
                stack.enter_context(args.shard.construct())
            tower = model_cls(config, **init_kwargs)
        if args.shard is not None:
            with construct_in_dtype(args.dtype):  # the same init numerics as during construction
                _hf_sharded_init(tower, args.shard)
        source, loaded = "random", None
        if d is not None:
            stats = _dir_image_stats(d)
            loaded = load_hf_weights(tower, d, args.shard)
            source = str(d)
    else:  # replicated: transformers' own loader (meta init, then tensor by tensor in the dtype)
        stats = _dir_image_stats(d)
        tower = model_cls.from_pretrained(str(d), local_files_only=True, dtype=args.dtype, **init_kwargs, **overrides)
        tower.to(args.device)
        config = tower.config
        source, loaded = str(d), None
    native = int(config.image_size)
    size = cfg.image_size if cfg.image_size is not None else native
    if size % int(config.patch_size):
        raise ValueError(f"image_size={size} is not divisible by patch_size={config.patch_size}")
    model = fam.features(tower, cfg.pooling, interpolate_pos_encoding=size != native)
    width = int(config.hidden_size)
    if cfg.pooling == "pooler":  # ViT pooler: dense hidden_size -> pooler_output_size
        width = int(getattr(config, "pooler_output_size", None) or width)
    return Backbone(
        model=model,
        image=resolve_image_spec(cfg, size, stats.get("mean", fam.mean), stats.get("std", fam.std)),
        width=width,
        sites=hf_sites(fam, fam.features.prefix, int(config.num_hidden_layers)),
        name=cfg.family,
        source=source,
        blocks_path=f"{fam.features.prefix}.{fam.blocks}",
        loaded=loaded,
    )


@register_backbone("hf-vit")
def build_hf_vit(cfg: BackboneConfig, args: BuildArgs) -> Backbone:
    """Build a frozen ``transformers.ViTModel``. Use ``build_backbone``."""
    return _build_hf(cfg, args)


@register_backbone("hf-clip")
def build_hf_clip(cfg: BackboneConfig, args: BuildArgs) -> Backbone:
    """Build a frozen ``transformers.CLIPVisionModel``. Use ``build_backbone``."""
    return _build_hf(cfg, args)
