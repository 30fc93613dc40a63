"""Adapter configuration shared by every adapter method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from mosa_scale.config.errors import Problems
from mosa_scale.sparse.partition import MAX_EXPERTS, Mode

Share = Literal["none", "down", "up"]
SHARE_VALUES: tuple[str, ...] = get_args(Share)


@dataclass(frozen=True)
class AdapterConfig:
    """What to inject and how it is split into sparse experts (MOSA_SPEC sections 1-3).

    Attributes:
        method: Registered adapter method: ``parallel`` (AdaptFormer), ``sequential`` (Pfeiffer),
            ``houlsby`` or ``lora``.
        bottleneck: Bottleneck width r (LoRA rank for ``lora``).
        num_experts: N, the number of sparse experts; 1 trains the plain dense adapter.
        share: Which projection stays one dense weight trained every step: ``down`` (only Up is
            split), ``up`` (only Down is split) or ``none`` (both split). For LoRA, Down is A and
            Up is B.
        mode: Partition ranking: ``all`` (global), ``row`` or ``column``.
        split_bias: Split biases like weights instead of giving each expert its own bias vector.
        scale: Output scale s; None takes the method's default (0.1 parallel, 1.0 otherwise).
        dropout: Dropout inside the adapter; None takes the method's default (0.1 parallel, 0).
        blocks: Block indices that carry an adapter; None means every block.
        mosa_blocks: Block indices (among ``blocks``) whose adapters are MoSA; None means all.
        experts_per_block: Per-depth override of N, ``{block_index: N}``.
        lora_targets: Attention projections that get LoRA (``q``, ``v``).
    """

    method: str = "parallel"
    bottleneck: int = 64
    num_experts: int = 4
    share: Share = "down"
    mode: Mode = "all"
    split_bias: bool = False
    scale: float | None = None
    dropout: float | None = None
    blocks: tuple[int, ...] | None = None
    mosa_blocks: tuple[int, ...] | None = None
    experts_per_block: dict[int, int] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        from mosa_scale.adapters.registry import registered_methods

        p = Problems()
        self.validate_into(p, prefix="adapter", methods=registered_methods())
        p.raise_if_any()

    def validate_into(self, p: Problems, *, prefix: str, methods: list[str]) -> None:
        """Records every problem of this config into ``p`` (fields named ``prefix.field``)."""
        p.choice(f"{prefix}.method", self.method, methods)
        p.choice(f"{prefix}.share", self.share, SHARE_VALUES)
        p.choice(f"{prefix}.mode", self.mode, get_args(Mode))
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            p.add(f"{prefix}.bottleneck", f"got {self.bottleneck!r}; must be a positive integer")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            p.add(f"{prefix}.num_experts", f"got {self.num_experts!r}; must be an integer >= 1 (1 = dense)")
        elif self.num_experts > MAX_EXPERTS:
            p.add(f"{prefix}.num_experts", f"got {self.num_experts}; at most {MAX_EXPERTS} experts are supported")
        for blk, n in self.experts_per_block.items():
            if not isinstance(n, int) or n < 1 or n > MAX_EXPERTS:
                p.add(f"{prefix}.experts_per_block.{blk}", f"got {n!r}; must be an integer in 1..{MAX_EXPERTS}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            p.add(f"{prefix}.dropout", f"got {self.dropout!r}; must be in [0, 1)")
        for t in self.lora_targets:
            p.choice(f"{prefix}.lora_targets", t, ("q", "v"))
        for name in ("blocks", "mosa_blocks"):
            value = getattr(self, name)
            if value is not None and any((not isinstance(i, int)) or i < 0 for i in value):
                p.add(f"{prefix}.{name}", f"got {value!r}; must be a list of non-negative block indices")

    def experts_for(self, block: int) -> int:
        """N for one block: 1 (dense) outside ``mosa_blocks``, else the per-depth override or N."""
        if self.mosa_blocks is not None and block not in self.mosa_blocks:
            return 1
        return self.experts_per_block.get(block, self.num_experts)

    def carries_adapter(self, block: int) -> bool:
        return self.blocks is None or block in self.blocks
