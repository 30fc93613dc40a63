"""OpenCLIP's timm-based image towers: SigLIP / SigLIP2 (timm ``VisionTransformer``) and
EVA02 (timm ``Eva``), as wrapped by OpenCLIP's ``TimmModel`` (``trunk`` + ``head``).

Adapter sites per block ``visual.trunk.blocks.<i>``:

* pre-norm blocks (timm ``Block``, ``EvaBlock``): attention ``attn``, pre-FFN norm ``norm2``,
  FFN ``mlp``; LoRA on the fused ``attn.qkv`` (``qkv_linear``) or on ``attn.q_proj`` /
  ``attn.v_proj`` when the tower keeps them separate (EVA02-B/L).
* post-norm blocks (``EvaBlockPostNorm``, EVA02-E): ``x + norm1(attn(x))``, then
  ``h + norm2(mlp(h))``; the attention branch ends at ``norm1``, the FFN branch at ``norm2``
  and the FFN's input is the residual stream ``h``: attn ``norm1``, ln2 ``mlp`` (its input is
  ``h``), mlp ``norm2``.

``vision_cfg.timm_model_kwargs`` (a mosa_scale extension of the OpenCLIP config) passes extra
architecture arguments to ``timm.create_model`` (``depth``, ``embed_dim``, ...: tiny test towers);
the image size always reaches timm (OpenCLIP's own builder keeps timm's default size).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from mosa_scale.backbones.base import BlockSites
from mosa_scale.backbones.construct import ShardHooks, sharded_params

TIMM_KWARGS = "timm_model_kwargs"


def is_timm_tower(visual: nn.Module) -> bool:
    """Whether ``visual`` is OpenCLIP's ``TimmModel``."""
    from open_clip.timm_model import TimmModel

    return isinstance(visual, TimmModel)


def _classes() -> tuple[type, type, type, type]:
    from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva, EvaBlock, EvaBlockPostNorm


@contextlib.contextmanager
def timm_create_kwargs(vision_cfg: Mapping[str, Any]) -> Iterator[None]:
    """Pass ``img_size`` and ``vision_cfg[timm_model_kwargs]`` to the ``timm.create_model`` call
    inside OpenCLIP's ``TimmModel`` (only the name bound in ``open_clip.timm_model`` changes)."""
    import open_clip.timm_model as tm
    import timm

    extra = dict(vision_cfg.get(TIMM_KWARGS) or {})
    extra.setdefault("img_size", vision_cfg.get("image_size", 224))
    orig = tm.timm
    tm.timm = types.SimpleNamespace(create_model=partial(timm.create_model, **extra))
    try:
        yield
    finally:
        tm.timm = orig


def check_timm_supported(visual: nn.Module) -> None:
    """Raises ValueError for timm trunks other than ViT / EVA with the known block types."""
    vit_cls, eva_cls, eva_block, eva_post = _classes()
    from timm.models.vision_transformer import Attention, Block

    trunk = visual.trunk
    if isinstance(trunk, vit_cls):
        for i, blk in enumerate(trunk.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise ValueError(
                    f"timm block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}: only "
                    "timm Block with fused-qkv Attention is supported (SigLIP / SigLIP2 towers)"
                )
    elif isinstance(trunk, eva_cls):
        for i, blk in enumerate(trunk.blocks):
            if type(blk) not in (eva_block, eva_post):
                raise ValueError(
                    f"timm EVA block {i} is a {type(blk).__name__}: only EvaBlock / EvaBlockPostNorm are supported"
                )
    else:
        raise ValueError(
            f"timm trunk {type(trunk).__name__}: only VisionTransformer (SigLIP) and Eva (EVA02) trunks are supported"
        )


def timm_sites(visual: nn.Module, prefix: str) -> list[BlockSites]:
    """Adapter sites of every block of a timm ViT / EVA trunk (see the module docstring)."""
    _, _, _, eva_post = _classes()
    base = f"{prefix}.trunk.blocks"
    sites = []
    for i, blk in enumerate(visual.trunk.blocks):
        b = f"{base}.{i}"
        fused = getattr(blk.attn, "qkv", None) is not None
        lora = dict(qkv_linear=f"{b}.attn.qkv") if fused else dict(q=f"{b}.attn.q_proj", v=f"{b}.attn.v_proj")
        if isinstance(blk, eva_post):
            sites.append(BlockSites(block=b, attn=f"{b}.norm1", ln2=f"{b}.mlp", mlp=f"{b}.norm2", **lora))
        else:
            sites.append(BlockSites(block=b, attn=f"{b}.attn", ln2=f"{b}.norm2", mlp=f"{b}.mlp", **lora))
    return sites


def timm_width(visual: nn.Module) -> int:
    """Output width of a ``TimmModel`` (its head's projection, the trunk's classifier, or the
    trunk's features)."""
    for m in reversed(list(visual.head.modules())):
        if isinstance(m, nn.Linear):
            return int(m.out_features)
    head = getattr(visual.trunk, "head", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    return int(visual.trunk.num_features)


def timm_image_stats(visual: nn.Module) -> dict[str, tuple[float, ...]]:
    """Normalisation of the trunk's pretrained config (SigLIP: 0.5; EVA: OpenAI CLIP)."""
    cfg = getattr(visual.trunk, "pretrained_cfg", None) or {}
    return {k: tuple(float(x) for x in cfg[k]) for k in ("mean", "std") if k in cfg}


@contextlib.contextmanager
def gathered_named_apply(shard: ShardHooks) -> Iterator[None]:
    """timm ViT initialises its modules from the parent with its own ``named_apply`` (not
    ``Module.apply``, which ``zero.Init`` already handles): gather each module's (and its
    direct children's) parameters around the init function, in the same order and on every
    rank, so the random draws equal a replicated build's."""
    import timm.models.vision_transformer as vt

    orig = vt.named_apply

    def named_apply(fn, module, name="", depth_first=True, include_root=False):  # noqa: ANN001, ANN202
        def gathered(module: nn.Module, name: str = "") -> None:
            with shard.modify(sharded_params(module, shard)):
                fn(module=module, name=name)

        return orig(gathered, module, name, depth_first, include_root)

    vt.named_apply = named_apply
    try:
        yield
    finally:
        vt.named_apply = orig


def finish_sharded_init(visual: nn.Module, shard: ShardHooks) -> None:
    """Replays, in timm's order, the end of the trunk's ``init_weights`` that writes straight
    into children's weights (a no-op on partitioned parameters during construction): the
    ``fix_init_weight`` rescale of each block's output projections (EVA always, ViT with
    ``fix_init``), then EVA's classifier init (``trunc_normal_`` then ``head_init_scale``). Nothing
    draws random numbers between the trunk's construction and this call, so the draws match."""
    from timm.layers import trunc_normal_

    vit_cls, eva_cls, _, _ = _classes()
    trunk = visual.trunk
    if isinstance(trunk, eva_cls) or (isinstance(trunk, vit_cls) and getattr(trunk, "fix_init", False)):
        # timm's fix_init_weight, one block at a time (the whole rescale at once would gather
        # every block's projections together)
        for layer_id, layer in enumerate(trunk.blocks):
            weights = [layer.attn.proj.weight, layer.mlp.fc2.weight]
            with torch.no_grad(), shard.modify(weights):
                for w in weights:
                    w.div_(math.sqrt(2.0 * (layer_id + 1)))
    scale = getattr(trunk, "head_init_scale", None)
    if isinstance(trunk, eva_cls) and scale and isinstance(trunk.head, nn.Linear):
        with torch.no_grad(), shard.modify(sharded_params(trunk.head, shard, children=False)):
            trunc_normal_(trunk.head.weight, std=0.02)
            trunk.head.weight.mul_(scale)
            trunk.head.bias.mul_(scale)


def timm_pos_embed_resize(visual: nn.Module) -> Any:
    """A transform resampling a checkpoint's ``trunk.pos_embed`` to the built grid."""
    from timm.layers import resample_abs_pos_embed

    trunk = visual.trunk
    prefix_tokens = 0 if getattr(trunk, "no_embed_class", False) else int(getattr(trunk, "num_prefix_tokens", 1))

    def resize(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return resample_abs_pos_embed(
            t.float(), new_size=list(trunk.patch_embed.grid_size), num_prefix_tokens=prefix_tokens
        ).to(t.dtype)

    return resize
