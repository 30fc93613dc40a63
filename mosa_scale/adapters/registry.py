"""Registry of adapter methods: a method folder calls :func:`register_method` when imported (peft
``tuners/<method>/``); the table and its discovery are :mod:`mosa_scale.adapters.catalog`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

from torch import nn

from mosa_scale.adapters.catalog import Method, check_name_free, enter, find_method
from mosa_scale.adapters.config import AdapterConfig

if TYPE_CHECKING:
    from mosa_scale.adapters.factory import InjectContext
    from mosa_scale.backbones.base import BlockSites


class AdapterMethod(Method, Protocol):
    """What a method folder provides: its name, its config class and how it wraps one block."""

    name: str
    config_class: type[AdapterConfig]  # AdapterConfig or a subclass holding the method's own fields

    def inject_block(
        self, model: nn.Module, site: BlockSites, block: int, cfg: AdapterConfig, ctx: InjectContext
    ) -> dict[str, nn.Module]:
        """Wraps the block's modules (:class:`~mosa_scale.adapters.wrap.Wrapper`, so that
        :func:`~mosa_scale.adapters.wrap.remove_adapters` undoes it); returns {qualified name:
        added adapter module}."""
        ...


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Registers ``method`` under ``method.name`` (called by the method folder's ``__init__``).

    Raises:
        ValueError: if the name is taken or the config class is not an :class:`AdapterConfig`.
    """
    check_name_free(method)
    if not (isinstance(method.config_class, type) and issubclass(method.config_class, AdapterConfig)):
        raise ValueError(f"adapter method {method.name!r}: config_class must subclass AdapterConfig")
    enter(method)
    return method


def get_method(name: str) -> AdapterMethod:
    """Raises:
    ValueError: naming the registered methods when ``name`` is unknown.
    """
    return cast("AdapterMethod", find_method(name))
