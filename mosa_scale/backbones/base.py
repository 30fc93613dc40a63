"""The backbone contract: config, image spec, adapter sites and the frozen feature model.

Every backbone family (OpenCLIP, Hugging Face ViT, Hugging Face CLIP vision) is built into the same
:class:`Backbone` record. The adapter injection code reads only :class:`BlockSites` (qualified
module names relative to ``Backbone.model``) and never looks at the family.

State-dict prefixes of :class:`FeatureModel` (the tower is registered under one attribute, so the
tower's own keys stay intact behind a stable prefix):

===========  =================  ==========================================================
family       prefix             matches
===========  =================  ==========================================================
openclip     ``visual.``        full OpenCLIP checkpoints (``visual.*`` keys)
hf-vit       ``vit.``           ``ViTForImageClassification`` checkpoints (base prefix)
hf-clip      ``vision_model.``  ``CLIPModel`` / ``CLIPVisionModelWithProjection`` checkpoints
===========  =================  ==========================================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from mosa_scale.config.errors import Problems

logger = logging.getLogger(__name__)

Family = Literal["openclip", "hf-vit", "hf-clip"]
Precision = Literal["fp32", "bf16", "fp16"]
Pooling = Literal["cls", "mean", "pooler"]

# the normalisation OpenAI's CLIP (and so OpenCLIP and HF CLIP) was trained with
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FAMILIES: tuple[str, ...] = get_args(Family)
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
POOLINGS: dict[str, tuple[str, ...]] = {
    "openclip": ("cls", "mean"),
    "hf-vit": ("cls", "mean", "pooler"),
    "hf-clip": ("cls", "mean"),
}


@dataclass(frozen=True)
class ImageSpec:
    """Image preprocessing the tower was trained with."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class BlockSites:
    """Where adapters go in one pre-LN transformer block.

    Every field is a qualified module name relative to ``Backbone.model`` (as in
    ``model.get_submodule``).
    """

    block: str  # the block module itself
    attn: str  # output (tensor, or tuple whose [0] is it) = attention branch before the residual add
    ln2: str  # pre-FFN LayerNorm: its INPUT is the residual stream h after attention
    mlp: str  # FFN module: its output is the FFN branch before the residual add (before layer-scale)
    q: str | None = None  # nn.Linear of the query projection (HF families, EVA02-B/L)
    v: str | None = None  # nn.Linear of the value projection (HF families, EVA02-B/L)
    qkv_fused: str | None = None  # nn.MultiheadAttention with in_proj_weight (OpenCLIP)
    qkv_linear: str | None = None  # nn.Linear whose output is [q; k; v] (timm towers)


@dataclass
class Backbone:
    """A frozen vision tower and everything the adapter code needs to know about it."""

    model: nn.Module  # FeatureModel: forward(pixels (B,3,H,W)) -> pooled features (B, width)
    image: ImageSpec
    width: int  # feature width of model's output
    sites: list[BlockSites]  # one per transformer block, in depth order
    name: str  # e.g. "openclip:ViT-B-16", "hf-vit", "hf-clip"
    source: str  # where the weights came from ("random", an OpenCLIP tag, a path)
    blocks_path: str  # qualified name of the ModuleList holding the blocks
    loaded: dict[str, float] | None = None  # this rank's pretrained-load counters (tensors, bytes_read, seconds)


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen tower to build and how.

    Attributes:
        family: Builder family: ``"openclip"``, ``"hf-vit"`` (``transformers.ViTModel``) or
            ``"hf-clip"`` (``transformers.CLIPVisionModel``).
        name: OpenCLIP model name (``"ViT-B-16"`` ... ``"ViT-bigG-14"``); for a custom
            ``openclip_cfg`` it is only a label. Unused by the HF families.
        pretrained: ``None`` (random init); OpenCLIP: a pretrained tag, a local checkpoint file or
            a local directory holding one; HF: a local directory written by ``save_pretrained``.
        hf_config: Overrides for the ``ViTConfig`` / ``CLIPVisionConfig`` built in-process (random
            init) or passed to ``from_pretrained`` (e.g. ``{"hidden_dropout_prob": 0.0}``).
        openclip_cfg: A full OpenCLIP model config dict (``embed_dim``, ``vision_cfg``,
            ``text_cfg``) for models that are not built in (tiny test models). Takes precedence
            over the built-in config for ``name``.
        precision: dtype of the frozen tower weights (adapters stay fp32).
        image_size: Input resolution override; pretrained position embeddings are resized
            (OpenCLIP) or interpolated on the fly (HF).
        pooling: ``"cls"`` (class token after the final norm; OpenCLIP: the tower's own pooling
            and projection), ``"mean"`` (mean of patch tokens) or ``"pooler"`` (HF ViT pooler).
        image_mean: Override of the normalisation mean (3 floats).
        image_std: Override of the normalisation std (3 floats).
    """

    family: Family = "hf-vit"
    name: str = "ViT-B-16"
    pretrained: str | None = None
    hf_config: Mapping[str, Any] | None = None
    openclip_cfg: Mapping[str, Any] | None = None
    precision: Precision = "fp32"
    image_size: int | None = None
    pooling: Pooling = "cls"
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        p = Problems()
        self.validate_into(p, prefix="model")
        p.raise_if_any()
        # normalise sequences from YAML lists to tuples (frozen dataclass: bypass __setattr__)
        for fname in ("image_mean", "image_std"):
            val = getattr(self, fname)
            if val is not None:
                object.__setattr__(self, fname, tuple(float(x) for x in val))

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        """Records every problem of this config into ``p`` (``prefix.field: got field=value; ...``)."""

        def bad(name: str, fix: str) -> None:
            p.add(f"{prefix}.{name}", f"got {name}={getattr(self, name)!r}; {fix}")

        if self.family not in FAMILIES:
            bad("family", f"allowed values are {list(FAMILIES)}")
        if self.precision not in get_args(Precision):
            bad("precision", f"allowed values are {list(get_args(Precision))}")
        allowed_pool = POOLINGS.get(self.family, get_args(Pooling))
        if self.pooling not in allowed_pool:
            bad("pooling", f"allowed values for family {self.family!r} are {list(allowed_pool)}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained.strip()):
            bad("pretrained", "give a tag, a file or a directory, or None")
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0
        ):
            bad("image_size", "must be a positive int or None")
        for name in ("image_mean", "image_std"):
            val = getattr(self, name)
            if val is None:
                continue
            if len(val) != 3 or not all(isinstance(x, (int, float)) for x in val):
                bad(name, "must be 3 floats (one per RGB channel) or None")
            elif name == "image_std" and any(x <= 0 for x in val):
                bad(name, "every entry must be > 0")
        if self.family == "openclip":
            if not self.name:
                bad("name", "give an OpenCLIP model name such as 'ViT-B-16'")
            if self.hf_config is not None:
                p.add(f"{prefix}.hf_config", "only used by families 'hf-vit' and 'hf-clip'; remove it")
            if self.openclip_cfg is not None:
                missing = [k for k in ("embed_dim", "vision_cfg") if k not in self.openclip_cfg]
                if missing:
                    p.add(f"{prefix}.openclip_cfg", f"missing keys {missing} (an OpenCLIP model config)")
        elif self.family in FAMILIES and self.openclip_cfg is not None:
            p.add(f"{prefix}.openclip_cfg", "only used by family 'openclip'; remove it")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of ``precision``."""
        return PRECISIONS[self.precision]


class FeatureModel(nn.Module):
    """A frozen tower registered under ``prefix``, returning pooled features.

    ``forward`` casts pixels to the tower's weight dtype and returns features in ``out_dtype``
    (fp32 by default, so a trainable fp32 head can follow a bf16/fp16 tower).
    """

    prefix: ClassVar[str] = "tower"

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.add_module(self.prefix, tower)
        self.out_dtype: torch.dtype = torch.float32

    @property
    def tower(self) -> nn.Module:
        """The wrapped library module (OpenCLIP visual, ViTModel or CLIPVisionModel)."""
        return self.get_submodule(self.prefix)

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype of the tower's first floating-point parameter (what pixels are cast to)."""
        for p in self.tower.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features in the tower's dtype; implemented per family."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, width)
        feats = self.features(pixels.to(self.input_dtype))
        return feats.to(self.out_dtype)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once).

    Works for meta-device modules and for DeepSpeed ZeRO-3 partitioned parameters
    (uses ``ds_numel`` when present).

    Args:
        module: Any module.

    Returns:
        The total element count.
    """
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def check_sites(model: nn.Module, sites: list[BlockSites]) -> None:
    """Check that every site name resolves inside ``model``.

    Args:
        model: The feature model.
        sites: The sites to check.

    Raises:
        RuntimeError: If a name does not resolve (the library renamed its modules); names the site.
    """
    for i, s in enumerate(sites):
        for fname in ("block", "attn", "ln2", "mlp", "q", "v", "qkv_fused", "qkv_linear"):
            name = getattr(s, fname)
            if name is None:
                continue
            try:
                model.get_submodule(name)
            except AttributeError as e:
                raise RuntimeError(
                    f"adapter site {fname}={name!r} of block {i} does not exist in the built "
                    "model; "
                    "the library's module names changed: update the family's site builder"
                ) from e


def resolve_dtype(cfg: BackboneConfig, dtype: torch.dtype | None) -> torch.dtype:
    """The frozen-weight dtype: an explicit ``dtype`` wins over ``cfg.precision``.

    Args:
        cfg: The backbone config.
        dtype: Explicit dtype or None.

    Returns:
        One of float32, bfloat16, float16.

    Raises:
        ValueError: Any other dtype.
    """
    dt = cfg.torch_dtype if dtype is None else dtype
    if dt not in PRECISIONS.values():
        raise ValueError(f"dtype={dt}: frozen weights must be one of {list(PRECISIONS.values())}")
    return dt


def stream_width(model: nn.Module, site: BlockSites) -> int:
    """Width of the residual stream at a block: the pre-FFN norm's size, or (post-norm blocks,
    whose ``ln2`` site is the FFN itself) the input size of its first linear layer.

    Raises:
        ValueError: If the ``ln2`` module has neither.
    """
    m = model.get_submodule(site.ln2)
    shape = getattr(m, "normalized_shape", None)
    if shape:
        return int(shape[0])
    lin = next((x for x in m.modules() if isinstance(x, nn.Linear)), None)
    if lin is None:
        raise ValueError(f"ln2 site {site.ln2!r} ({type(m).__name__}) has no normalized_shape and no linear layer")
    return int(lin.in_features)


def finalize_backbone(bb: Backbone, dtype: torch.dtype, device: torch.device) -> Backbone:
    """Freeze every parameter, check the sites and log a one-line summary.

    Args:
        bb: The freshly built backbone.
        dtype: The frozen-weight dtype (for the log line).
        device: The device it was built on (for the log line).

    Returns:
        ``bb``, frozen.

    Raises:
        RuntimeError: If a site does not resolve.
    """
    bb.model.requires_grad_(False)
    check_sites(bb.model, bb.sites)
    logger.info(
        "built backbone %s (weights: %s): %.1f M frozen params, %s on %s, width %d, %d blocks",
        bb.name,
        bb.source,
        count_parameters(bb.model) / 1e6,
        dtype,
        device,
        bb.width,
        len(bb.sites),
    )
    return bb


def resolve_image_spec(
    cfg: BackboneConfig,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> ImageSpec:
    """Build the ImageSpec, applying the config's overrides."""
    m = cfg.image_mean if cfg.image_mean is not None else mean
    s = cfg.image_std if cfg.image_std is not None else std
    return ImageSpec(
        size=int(size),
        mean=tuple(float(x) for x in m),  # type: ignore[arg-type]
        std=tuple(float(x) for x in s),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class BuildArgs:
    """Resolved build arguments handed to a family builder.

    ``shard`` (a :class:`~mosa_scale.backbones.construct.ShardHooks`) asks for a tower
    partitioned across ranks as it is built (ZeRO-3); None builds a replicated tower.
    """

    device: torch.device
    dtype: torch.dtype
    meta: bool = False
    shard: Any = None
