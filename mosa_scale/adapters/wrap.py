"""Injection by wrapping, and its undoing (:func:`remove_adapters`).

An adapter method never edits a frozen module. It puts a :class:`Wrapper` in the module's place
in its parent; the wrapper adopts the module's own parameter and buffer dicts (the same
``Parameter`` objects, so values, names and any ZeRO-3 partitioning and ``ds_*`` attributes are
untouched), its children, and holds the module itself out of the module tree to call it. The
state-dict keys of the frozen tower therefore do not change; an adapter's own modules are new
children named ``mosa_*`` (of the wrapper, or of the block for the bottleneck adapters).
Removal puts the original module object back, unmodified, and drops the adapter children.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# nn.Module state the wrapper shares with the module it stands in for (same objects, not copies)
_SHARED = (
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class Wrapper(nn.Module):
    """Stands in for ``base`` in the tower with the same parameter, buffer and child names.

    ``base`` is not a child (its tensors would be named twice): it is kept in ``base_layer``,
    called by the subclass's ``forward``, and put back by :func:`remove_adapters`. The parameter
    and buffer dicts are shared, not copied, so an in-place or dict-level change through either
    (``.to()``, ``load_state_dict``) is seen by both. ``base``'s own hooks run when it is called.

    Args:
        base: The frozen module to stand in for.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        for name in _SHARED:
            self.__dict__[name] = base.__dict__[name]
        self.__dict__["_modules"] = dict(base._modules)  # same children; adapter children go here only
        self.__dict__["_mosa_base"] = base
        self.__dict__["_mosa_attached"] = []  # (owner, name): adapter modules this wrapper put on other modules
        self.training = base.training

    @property
    def base_layer(self) -> nn.Module:
        """The wrapped frozen module (peft's name)."""
        return self.__dict__["_mosa_base"]

    def attach(self, owner: nn.Module, name: str, adapter: nn.Module) -> nn.Module:
        """Registers ``adapter`` as ``owner.<name>`` (its state-dict home) and records it so that
        removal drops it again; the wrapper itself keeps only a plain reference."""
        owner.add_module(name, adapter)
        self.__dict__["_mosa_attached"].append((owner, name))
        return adapter

    def train(self, mode: bool = True) -> Wrapper:
        super().train(mode)
        self.base_layer.training = mode  # the base reads its own flag (dropout, attention fast path)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, children
        except AttributeError:
            base = self.__dict__.get("_mosa_base")
            if base is None:
                raise
            return getattr(base, name)  # plain attributes of the base (in_features, embed_dim ...)

    def extra_repr(self) -> str:
        return f"wraps {type(self.base_layer).__name__}({self.base_layer.extra_repr()})"


def unwrap(module: nn.Module) -> nn.Module:
    """The frozen module behind any wrappers (``module`` itself when it is not wrapped)."""
    while isinstance(module, Wrapper):
        module = module.base_layer
    return module


def put(model: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at qualified name ``path`` of ``model`` (its parent's child slot keeps its
    position, so registration order is unchanged)."""
    parent_path, _, key = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if key not in parent._modules:
        raise ValueError(f"{path}: not a child module of {type(parent).__name__}")
    parent._modules[key] = module


def wrap(model: nn.Module, path: str, make: Callable[[nn.Module], Wrapper]) -> Wrapper:
    """Replaces the module at ``path`` by ``make(module)``; returns the wrapper."""
    wrapper = make(model.get_submodule(path))
    put(model, path, wrapper)
    return wrapper


def remove_adapters(model: nn.Module) -> int:
    """Undoes adapter injection in ``model``: every wrapper is replaced by the module it wraps and
    every adapter module it attached elsewhere is dropped. Afterwards the state dict (keys and
    values) and the outputs are the untouched tower's. Parameters stay frozen (injection froze
    them) and the router keeps its registered layers.

    Returns:
        The number of wrappers removed.
    """
    removed = 0
    while True:  # one at a time: removing a wrapper can uncover another (a wrapper of a wrapper)
        found = next(((n, m) for n, m in model.named_modules() if isinstance(m, Wrapper)), None)
        if found is None:
            return removed
        name, wrapper = found
        for owner, key in wrapper.__dict__["_mosa_attached"]:
            owner._modules.pop(key, None)
        wrapper.__dict__["_mosa_attached"].clear()
        put(model, name, wrapper.base_layer)
        removed += 1


def map_first(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Applies ``fn`` to a tensor output, or to the first element of a tuple output."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)
