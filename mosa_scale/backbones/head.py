"""Classification heads: a plain linear head, or a zero-shot head initialised from CLIP text.

Both are ``nn.Linear`` (keys ``weight`` (C, D) and ``bias`` (C,)), so saving, merging and
exporting treat them alike. :class:`ZeroShotHead` L2-normalises its input features first, so with
``weight = logit_scale * normalize(text_embedding)`` and zero bias its logits are exactly CLIP's
image-text logits ``logit_scale * cos(image, text)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

HeadKind = Literal["linear", "zeroshot"]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""Prompt templates: ``str.format`` strings with one ``{}`` (or callables ``name -> prompt``)."""

LINEAR_INIT_STD = 0.02
"""Linear head init: weights truncated normal (std 0.02, cut at +-2 std), zero bias (timm ViT)."""


class ZeroShotHead(nn.Linear):
    """A linear head over L2-normalised features.

    ``forward(x) = normalize(x) @ weight.T + bias``: the input features do NOT need to be
    normalised by the caller (this head does it); raw backbone features go straight in.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D) -> (B, C)
        return F.linear(F.normalize(x, dim=-1), self.weight, self.bias)


@torch.no_grad()
def zeroshot_text_embeddings(
    openclip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """Class embeddings from CLIP's text tower: per class, the renormalised mean of the
    normalised prompt embeddings (OpenCLIP's ``build_zero_shot_classifier``).

    Args:
        openclip_model: A full OpenCLIP model (with ``encode_text``).
        tokenizer: Its tokenizer.
        class_names: One name per class.
        templates: Prompt templates (format strings with ``{}`` or callables).

    Returns:
        (C, D) unit-norm class embeddings, fp32.
    """
    import open_clip

    device = next(openclip_model.parameters()).device
    was_training = openclip_model.training
    openclip_model.eval()
    try:
        w = open_clip.build_zero_shot_classifier(
            openclip_model,
            tokenizer,
            list(class_names),
            list(templates),
            num_classes_per_batch=None,
            device=device,
        )  # (D, C)
    finally:
        openclip_model.train(was_training)
    return w.T.float().contiguous()


def build_head(
    kind: HeadKind,
    width: int,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    openclip_model: nn.Module | None = None,
    tokenizer: Any = None,
    templates: Sequence[str | Callable[[str], str]] = DEFAULT_TEMPLATES,
    init_std: float = LINEAR_INIT_STD,
    generator: torch.Generator | None = None,
) -> nn.Linear:
    """Build a trainable fp32 classification head.

    Args:
        kind: ``"linear"``: ``nn.Linear(width, num_classes)``, weights truncated normal with
            ``init_std`` (0 gives zeros), zero bias. ``"zeroshot"``: :class:`ZeroShotHead` with
            ``weight = logit_scale.exp() * text_embedding`` of ``templates`` filled with
            ``class_names`` through the text tower of ``openclip_model``, zero bias.
        width: Feature width (input of the head).
        num_classes: Number of classes.
        class_names: Required for ``"zeroshot"``; ``len == num_classes``.
        openclip_model: Required for ``"zeroshot"``: the full OpenCLIP model (text tower present).
        tokenizer: Required for ``"zeroshot"``: its tokenizer.
        templates: Prompt templates for ``"zeroshot"``.
        init_std: Std of the linear head init.
        generator: Optional generator for a seeded linear init.

    Returns:
        The head (``nn.Linear`` or :class:`ZeroShotHead`), on the device of ``openclip_model``
        for zero-shot, on CPU otherwise.

    Raises:
        ValueError: Unknown kind, bad sizes, or missing/mismatched zero-shot inputs.
    """
    if width <= 0 or num_classes <= 0:
        raise ValueError(f"width={width}, num_classes={num_classes}: both must be positive")
    if kind == "linear":
        head = nn.Linear(width, num_classes)
        with torch.no_grad():
            if init_std > 0:
                nn.init.trunc_normal_(head.weight, std=init_std, a=-2 * init_std, b=2 * init_std, generator=generator)
            else:
                head.weight.zero_()
            head.bias.zero_()
        return head
    if kind != "zeroshot":
        raise ValueError(f"kind={kind!r}: allowed values are ['linear', 'zeroshot']")
    missing = [
        n
        for n, v in (
            ("class_names", class_names),
            ("openclip_model", openclip_model),
            ("tokenizer", tokenizer),
        )
        if v is None
    ]
    if missing:
        raise ValueError(
            f"kind='zeroshot' needs {missing}: build it with build_openclip_zeroshot(), which "
            "passes the full OpenCLIP model and its tokenizer"
        )
    assert class_names is not None and openclip_model is not None
    if len(class_names) != num_classes:
        raise ValueError(f"len(class_names)={len(class_names)} != num_classes={num_classes}")
    if not templates:
        raise ValueError("templates is empty: give at least one prompt such as 'a photo of a {}.'")
    if not hasattr(openclip_model, "encode_text"):
        raise ValueError("openclip_model has no encode_text: pass the full OpenCLIP model, not its visual tower")
    text = zeroshot_text_embeddings(openclip_model, tokenizer, class_names, templates)  # (C, D)
    if text.shape[1] != width:
        raise ValueError(
            f"text embedding width {text.shape[1]} != feature width {width}: zero-shot needs the "
            "projected image features (OpenCLIP visual output)"
        )
    scale = openclip_model.logit_scale.detach().float().exp().reshape(())
    head = ZeroShotHead(width, num_classes, device=text.device)
    with torch.no_grad():
        head.weight.copy_(scale * text)
        head.bias.zero_()
    logger.info(
        "zero-shot head: %d classes x %d templates, logit scale %.2f",
        num_classes,
        len(templates),
        float(scale),
    )
    return head
