"""Activation checkpointing of backbone blocks without renaming any module.

Each block listed under ``Backbone.blocks_path`` gets an instance-level ``forward`` that runs the
block's original forward through ``checkpoint_fn(block_forward, *args, **kwargs)``. Module names
and state-dict keys are unchanged, so adapter sites, optimizer groups and checkpoints are not
affected, and forward hooks on inner modules (adapters) run again during the recompute.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from mosa_scale.backbones.base import Backbone

logger = logging.getLogger(__name__)

CheckpointFn = Callable[..., Any]

_ORIG = "_mosa_orig_forward"


def default_checkpoint_fn(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint`` with ``use_reentrant=False``."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _checkpointed_forward(checkpoint_fn: CheckpointFn, orig: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # eval / no_grad: nothing to save, skip the wrapper
        return orig(*args, **kwargs)
    return checkpoint_fn(orig, *args, **kwargs)


def _blocks(backbone: Backbone) -> nn.ModuleList | nn.Sequential:
    blocks = backbone.model.get_submodule(backbone.blocks_path)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):  # timm ViT keeps its blocks in a Sequential
        raise TypeError(
            f"blocks_path={backbone.blocks_path!r} is a {type(blocks).__name__}, not a ModuleList or Sequential"
        )
    return blocks


def enable_gradient_checkpointing(backbone: Backbone, checkpoint_fn: CheckpointFn | None = None) -> int:
    """Run every block's forward through ``checkpoint_fn``.

    Calling it again replaces the previous ``checkpoint_fn``.

    Args:
        backbone: The backbone whose blocks to wrap.
        checkpoint_fn: ``fn(block_forward, *args, **kwargs) -> output``; default
            :func:`default_checkpoint_fn`. A routing-aware function must replay the same expert
            choice during the recompute.

    Returns:
        The number of wrapped blocks.

    Raises:
        TypeError: If ``blocks_path`` does not name a ModuleList / Sequential.
    """
    fn = checkpoint_fn or default_checkpoint_fn
    blocks = _blocks(backbone)
    for blk in blocks:
        orig = blk.__dict__.get(_ORIG) or blk.forward
        blk.__dict__[_ORIG] = orig
        # a partial (not a closure) so deepcopy rebinds `orig` to the copied block
        blk.forward = functools.partial(_checkpointed_forward, fn, orig)
    logger.info("gradient checkpointing on %d blocks of %s", len(blocks), backbone.name)
    return len(blocks)


def disable_gradient_checkpointing(backbone: Backbone) -> int:
    """Restore the original block forwards.

    Args:
        backbone: The backbone.

    Returns:
        The number of blocks restored.
    """
    n = 0
    for blk in _blocks(backbone):
        if _ORIG in blk.__dict__:
            del blk.__dict__[_ORIG]
            del blk.__dict__["forward"]
            n += 1
    return n
