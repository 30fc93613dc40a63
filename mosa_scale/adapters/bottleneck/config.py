"""Config of the bottleneck methods (``parallel``, ``sequential``, ``houlsby``)."""

from __future__ import annotations

from dataclasses import dataclass

from mosa_scale.adapters.config import AdapterConfig, positive_int
from mosa_scale.config.errors import Problems


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """The shared fields plus the bottleneck's own.

    Attributes:
        bottleneck: Bottleneck width r of Down ``(D -> r)`` and Up ``(r -> D)``.
    """

    bottleneck: int = 64

    def validate_into(self, p: Problems, *, prefix: str, methods: list[str]) -> None:
        super().validate_into(p, prefix=prefix, methods=methods)
        positive_int(p, f"{prefix}.bottleneck", self.bottleneck)
