"""Seeded partition of a weight's entries into N experts (MOSA_SPEC section 2)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from mosa_scale.config.errors import Problems
from mosa_scale.seeding import derive_seed

Mode = Literal["all", "row", "column"]
MAX_EXPERTS = 127  # the partition is stored as int8


def _bins(scores: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Ranks ``scores`` along the last dim and cuts the ranking into N near-equal bins."""
    n = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, stable=True)
    bin_of_rank = (torch.arange(n, dtype=torch.int64) * num_experts) // n  # (n,) sizes differ by <= 1
    out = torch.empty_like(order)
    out.scatter_(-1, order, bin_of_rank.expand_as(order))
    return out


def partition(shape: tuple[int, ...], num_experts: int, *, seed: int, name: str, mode: Mode = "all") -> torch.Tensor:
    """Assigns every entry of a weight to one of N experts.

    Scores come from a generator seeded by (``seed``, ``name``) only, so the partition never
    depends on global RNG state, rank, world size, device or construction order.

    Args:
        shape: Weight shape, ``(out, in)`` or ``(out,)`` for a bias.
        num_experts: N in 1..MAX_EXPERTS (checked here too: consolidation passes N read from a file).
        seed: Run seed.
        name: The parameter's qualified name.
        mode: ``all`` ranks all entries together; ``row`` / ``column`` rank within each row /
            column. A 1-D weight (a split bias) is always ranked as a whole.

    Returns:
        int8 tensor of ``shape`` with the expert index of each entry.

    Raises:
        ValueError: on an unknown mode, N < 1, or N larger than the entries ranked together.
    """
    p = Problems()
    p.choice("mode", mode, get_args(Mode))
    if not 1 <= num_experts <= MAX_EXPERTS:
        p.add("num_experts", f"got {num_experts}; must be in 1..{MAX_EXPERTS}")
    p.raise_if_any()
    if len(shape) == 1:
        mode = "all"
    mat = torch.Size(shape) if len(shape) == 2 else torch.Size((1, shape[0]))
    group = {"all": mat.numel(), "row": mat[1], "column": mat[0]}[mode]
    if num_experts > group:
        raise ValueError(
            f"num_experts: {num_experts} experts cannot split {name!r} of shape {tuple(shape)} in mode "
            f"{mode!r}: only {group} entries are ranked together; use fewer experts or another mode"
        )
    gen = torch.Generator(device="cpu").manual_seed(derive_seed("partition", seed, name))
    scores = torch.rand(mat, generator=gen, dtype=torch.float64)
    if mode == "all":
        assign = _bins(scores.reshape(-1), num_experts).reshape(mat)
    elif mode == "row":
        assign = _bins(scores, num_experts)
    else:
        assign = _bins(scores.t(), num_experts).t()
    return assign.to(torch.int8).reshape(shape)
