"""Registry of adapter methods: a new method is one folder that calls :func:`register_method`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from torch import nn

if TYPE_CHECKING:
    from mosa_scale.adapters.config import AdapterConfig
    from mosa_scale.adapters.factory import InjectContext
    from mosa_scale.backbones.base import BlockSites

BUILTIN_METHODS = ("mosa_scale.adapters.bottleneck", "mosa_scale.adapters.lora")


class AdapterMethod(Protocol):
    """What a method provides: how to put its modules into one transformer block."""

    name: str

    def inject_block(
        self, model: nn.Module, site: BlockSites, block: int, cfg: AdapterConfig, ctx: InjectContext
    ) -> dict[str, nn.Module]:
        """Adds the method's modules to one block; returns {qualified name: added module}."""
        ...


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Registers ``method`` under ``method.name``.

    Raises:
        ValueError: if the name is taken.
    """
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    for module in BUILTIN_METHODS:
        importlib.import_module(module)


def registered_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> AdapterMethod:
    """Raises:
    ValueError: naming the registered methods when ``name`` is unknown.
    """
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(f"adapter.method: got {name!r}; allowed values are {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
