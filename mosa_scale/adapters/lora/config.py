"""Config of ``method: lora``."""

from __future__ import annotations

from dataclasses import dataclass

from mosa_scale.adapters.config import AdapterConfig, positive_int
from mosa_scale.config.errors import Problems

TARGETS = ("q", "v")


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """The shared fields plus LoRA's own.

    Attributes:
        bottleneck: LoRA rank r of A ``(r x in)`` and B ``(out x r)`` (the key is shared with the
            bottleneck methods so that a sweep can vary one width across methods).
        lora_targets: Attention projections that get LoRA (``q``, ``v``).
    """

    bottleneck: int = 64
    lora_targets: tuple[str, ...] = TARGETS

    def validate_into(self, p: Problems, *, prefix: str, methods: list[str]) -> None:
        super().validate_into(p, prefix=prefix, methods=methods)
        positive_int(p, f"{prefix}.bottleneck", self.bottleneck)
        for t in self.lora_targets:
            p.choice(f"{prefix}.lora_targets", t, TARGETS)
