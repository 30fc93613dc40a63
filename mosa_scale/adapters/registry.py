"""Registry of adapter methods, found by discovery: a method is one folder (a subpackage) that
calls :func:`register_method` when imported (peft ``tuners/<method>/``).

The built-in methods are the subpackages of :mod:`mosa_scale.adapters`; another package's method
folders are added with :func:`discover_methods`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Protocol

from torch import nn

from mosa_scale.adapters.config import AdapterConfig

if TYPE_CHECKING:
    from mosa_scale.adapters.factory import InjectContext
    from mosa_scale.backbones.base import BlockSites


class AdapterMethod(Protocol):
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


_METHODS: dict[str, AdapterMethod] = {}
_BUILTIN = "mosa_scale.adapters"
_builtin_found = False


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Registers ``method`` under ``method.name`` (called by the method folder's ``__init__``).

    Raises:
        ValueError: if the name is taken or the config class is not an :class:`AdapterConfig`.
    """
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"adapter method {method.name!r} is already registered")
    if not (isinstance(method.config_class, type) and issubclass(method.config_class, AdapterConfig)):
        raise ValueError(f"adapter method {method.name!r}: config_class must subclass AdapterConfig")
    _METHODS[method.name] = method
    return method


def discover_methods(package: str) -> list[str]:
    """Imports every subpackage of ``package`` (a regular or namespace package: a folder on the
    import path), each a method folder that registers itself.

    Returns:
        The names of all registered methods afterwards.
    """
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        if info.ispkg:
            importlib.import_module(info.name)
    return sorted(_METHODS)


def _discover_builtin() -> None:
    global _builtin_found
    if not _builtin_found:
        _builtin_found = True  # first, so that a method folder importing the registry does not recurse
        try:
            discover_methods(_BUILTIN)
        except BaseException:
            _builtin_found = False
            raise


def registered_methods() -> list[str]:
    _discover_builtin()
    return sorted(_METHODS)


def config_classes() -> dict[str, type[AdapterConfig]]:
    """{method name: its config class}."""
    _discover_builtin()
    return {name: m.config_class for name, m in _METHODS.items()}


def get_method(name: str) -> AdapterMethod:
    """Raises:
    ValueError: naming the registered methods when ``name`` is unknown.
    """
    _discover_builtin()
    if name not in _METHODS:
        raise ValueError(f"adapter.method: got {name!r}; allowed values are {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
