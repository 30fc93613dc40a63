"""Gradient checkpointing wraps blocks without renaming anything and changes no number."""

import copy
from typing import Any

import torch

from mosa_scale.backbones import (
    BackboneConfig,
    build_backbone,
    default_checkpoint_fn,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
)


def _fwd_bwd(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = pixels.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    ln = [p for n, p in model.named_parameters() if p.requires_grad]
    return (out.detach(), x.grad, *[p.grad.clone() for p in ln])


def test_checkpointing_is_exact_and_keeps_names(tiny_cfg: BackboneConfig, pixels: torch.Tensor) -> None:
    bb = build_backbone(tiny_cfg)
    bb.model.eval()  # no dropout; identical numerics both ways
    site = next(bb.model.get_submodule(bb.sites[1].ln2).parameters())
    site.requires_grad_(True)  # a trainable tensor inside a block, like an adapter
    keys = list(bb.model.state_dict())
    names = [n for n, _ in bb.model.named_modules()]
    ref = _fwd_bwd(bb.model, pixels)
    site.grad = None

    calls: list[int] = []

    def counting_fn(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return default_checkpoint_fn(fn, *args, **kwargs)

    assert enable_gradient_checkpointing(bb, counting_fn) == len(bb.sites)
    assert list(bb.model.state_dict()) == keys
    assert [n for n, _ in bb.model.named_modules()] == names
    got = _fwd_bwd(bb.model, pixels)
    assert len(calls) == len(bb.sites)  # every block ran through checkpoint_fn once
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0  # gradients actually flowed

    with torch.no_grad():  # no graph -> the wrapper is skipped
        bb.model(pixels)
    assert len(calls) == len(bb.sites)

    assert disable_gradient_checkpointing(bb) == len(bb.sites)
    bb.model(pixels).sum().backward()
    assert len(calls) == len(bb.sites)
    blocks = bb.model.get_submodule(bb.blocks_path)
    assert all("forward" not in blk.__dict__ for blk in blocks)


def test_rewrapping_and_deepcopy(tiny_cfg: BackboneConfig) -> None:
    bb = build_backbone(tiny_cfg)
    enable_gradient_checkpointing(bb)
    enable_gradient_checkpointing(bb)  # idempotent: wraps the original forward, not the wrapper
    blk = bb.model.get_submodule(bb.sites[0].block)
    orig = blk.forward.args[1]
    assert orig.__self__ is blk and orig.__func__ is type(blk).forward
    clone = copy.deepcopy(bb.model)
    cblk = clone.get_submodule(bb.sites[0].block)
    assert cblk.forward.args[1].__self__ is cblk  # the copy runs its own weights
