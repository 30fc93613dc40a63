"""The table of adapter methods, filled by discovery: a method is one folder (a subpackage) that
registers itself when imported (peft ``tuners/<method>/``).

The built-in methods are the subpackages of :mod:`mosa_scale.adapters`; another package's method
folders are added with :func:`discover_methods`. This module imports no other module of the
package, so that the config (which picks a method's config class) and the registry (which checks a
method before it enters the table) both import it at module level.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Protocol


class Method(Protocol):
    """What the table needs of a method (:class:`~mosa_scale.adapters.registry.AdapterMethod`)."""

    name: str
    config_class: type


_METHODS: dict[str, Method] = {}
_BUILTIN = "mosa_scale.adapters"
_builtin_found = False


def check_name_free(method: Method) -> None:
    """Raises:
    ValueError: if another method holds ``method.name``.
    """
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"adapter method {method.name!r} is already registered")


def enter(method: Method) -> None:
    """Puts ``method`` into the table under ``method.name`` (:func:`check_name_free` first)."""
    check_name_free(method)
    _METHODS[method.name] = method


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


def config_classes() -> dict[str, type]:
    """{method name: its config class}."""
    _discover_builtin()
    return {name: m.config_class for name, m in _METHODS.items()}


def find_method(name: str) -> Method:
    """Raises:
    ValueError: naming the registered methods when ``name`` is unknown.
    """
    _discover_builtin()
    if name not in _METHODS:
        raise ValueError(f"adapter.method: got {name!r}; allowed values are {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
