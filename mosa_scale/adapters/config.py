"""Adapter configuration: the fields every method shares; each method folder subclasses it with
its own fields (peft's ``PeftConfig`` / ``LoraConfig``).

``AdapterConfig(method=..., ...)`` builds the named method's config class, and the YAML section
``adapter:`` is read the same way (:meth:`AdapterConfig.select_class`), so the keys of every
method stay flat under ``adapter:``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mosa_scale.adapters.catalog import config_classes, registered_methods
from mosa_scale.config.errors import Problems
from mosa_scale.sparse.partition import MAX_EXPERTS, Mode

Share = Literal["none", "down", "up"]
SHARE_VALUES: tuple[str, ...] = get_args(Share)
DEFAULT_METHOD = "parallel"


@dataclass(frozen=True)
class AdapterConfig:
    """What to inject and how it is split into sparse experts (MOSA_SPEC sections 1-3).

    Attributes:
        method: Registered adapter method: ``parallel`` (AdaptFormer), ``sequential`` (Pfeiffer),
            ``houlsby`` or ``lora``. Its folder's config class adds the method's own fields.
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
    """

    method: str = DEFAULT_METHOD
    num_experts: int = 4
    share: Share = "down"
    mode: Mode = "all"
    split_bias: bool = False
    scale: float | None = None
    dropout: float | None = None
    blocks: tuple[int, ...] | None = None
    mosa_blocks: tuple[int, ...] | None = None
    experts_per_block: dict[int, int] = field(default_factory=dict)

    def __new__(cls, *args: Any, **kwargs: Any) -> AdapterConfig:
        # AdapterConfig(method="lora", ...) is the registered method's config class; an unknown
        # method stays a plain AdapterConfig, whose validation names the registered methods
        if cls is AdapterConfig:
            cls = _method_class(args[0] if args else kwargs.get("method", DEFAULT_METHOD))
        return object.__new__(cls)

    def __post_init__(self) -> None:
        p = Problems()
        self.validate_into(p, prefix="adapter", methods=registered_methods())
        expected = _method_class(self.method)
        if expected is not AdapterConfig and type(self) is not expected:
            p.add("adapter.method", f"{self.method!r} is configured by {expected.__name__}, not {type(self).__name__}")
        p.raise_if_any()

    def validate_into(self, p: Problems, *, prefix: str, methods: list[str]) -> None:
        """Records every problem of this config into ``p`` (fields named ``prefix.field``); a
        method's config class adds its own fields' problems."""
        p.choice(f"{prefix}.method", self.method, methods)
        p.choice(f"{prefix}.share", self.share, SHARE_VALUES)
        p.choice(f"{prefix}.mode", self.mode, get_args(Mode))
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            p.add(f"{prefix}.num_experts", f"got {self.num_experts!r}; must be an integer >= 1 (1 = dense)")
        elif self.num_experts > MAX_EXPERTS:
            p.add(f"{prefix}.num_experts", f"got {self.num_experts}; at most {MAX_EXPERTS} experts are supported")
        for blk, n in self.experts_per_block.items():
            if not isinstance(n, int) or n < 1 or n > MAX_EXPERTS:
                p.add(f"{prefix}.experts_per_block.{blk}", f"got {n!r}; must be an integer in 1..{MAX_EXPERTS}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            p.add(f"{prefix}.dropout", f"got {self.dropout!r}; must be in [0, 1)")
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

    @classmethod
    def select_class(
        cls, data: Mapping[str, Any], prefix: str, p: Problems
    ) -> tuple[type[AdapterConfig], dict[str, Any]]:
        """The config class for a plain ``adapter:`` section (its ``method``) and the section's
        keys for it (called by the YAML loader before it checks keys and types).

        A key of another method is a problem, except at that method's default: configs written
        before the per-method classes carry every method's fields (``lora_targets: [q, v]``).
        """
        classes = config_classes()
        method = data.get("method", DEFAULT_METHOD)
        chosen = _method_class(method)
        own = {f.name for f in dataclasses.fields(chosen)}
        out: dict[str, Any] = {}
        for key, value in data.items():
            owners = {m: c for m, c in classes.items() if key in {f.name for f in dataclasses.fields(c)}}
            if key in own or not owners:
                out[key] = value  # the loader checks its type, or reports it as unknown
            elif chosen is not AdapterConfig and not all(_is_default(c, key, value) for c in owners.values()):
                p.add(
                    f"{prefix}.{key}",
                    f"belongs to method {' / '.join(sorted(owners))}, not to {method!r}; remove it or change "
                    f"{prefix}.method",
                )
        return chosen, out


def _method_class(method: object) -> type[AdapterConfig]:
    return config_classes().get(method, AdapterConfig) if isinstance(method, str) else AdapterConfig


def _is_default(cls: type[AdapterConfig], key: str, value: Any) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return _plain(value) == _plain(default)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value  # YAML lists, tuple defaults


def positive_int(p: Problems, field_name: str, value: object) -> None:
    """Records a problem unless ``value`` is a positive integer (a width, a rank)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        p.add(field_name, f"got {value!r}; must be a positive integer")
