"""How a frozen tower is constructed: directly in its dtype, replicated or sharded.

Two pieces shared by every family:

* :func:`construct_in_dtype`: while a library constructor runs, every floating-point parameter
  and buffer is cast to the tower's dtype the moment it is registered on its module, so the
  module's own initialisation (``reset_parameters``, ``trunc_normal_`` ...) runs in that dtype
  and no full-precision copy of the tower ever exists (at most one tensor at a time). The
  replicated and the sharded construction both use it, so a random tower is the same in both.
* :class:`ShardHooks`: what a sharded construction needs from the distributed engine
  (ZeRO-3), as a protocol so that this package never imports DeepSpeed. The engine's
  implementation builds the tower inside ``deepspeed.zero.Init`` (each module's parameters are
  partitioned right after its ``__init__``), gathers a module's parameters when a library
  initialises them from a parent module (:meth:`ShardHooks.modify`), and writes checkpoint
  tensors straight into each rank's partition (:meth:`ShardHooks.write_local`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn


class ShardHooks(Protocol):
    """The engine side of a sharded (ZeRO-3) tower construction."""

    device: torch.device  # where the tower is built and its partitions live

    def construct(self) -> AbstractContextManager[None]:
        """Context in which modules built are partitioned right after their ``__init__``."""
        ...

    def modify(self, params: Iterable[nn.Parameter]) -> AbstractContextManager[None]:
        """Context in which ``params`` are whole on every rank; on exit rank 0's values become
        every rank's partition (the same code runs on every rank, so they agree anyway)."""
        ...

    def is_sharded(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a partitioned parameter."""
        ...

    def local_range(self, param: nn.Parameter) -> tuple[int, int]:
        """``(start, count)``: the flat elements of ``param`` this rank holds (count may be 0)."""
        ...

    def write_local(self, param: nn.Parameter, values: torch.Tensor) -> None:
        """Writes this rank's elements (``values``, 1-D, ``count`` long, the param's dtype)."""
        ...

    def gathered(self, params: Iterable[nn.Parameter]) -> AbstractContextManager[None]:
        """Context in which ``params`` are whole on every rank, read only."""
        ...


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _full_precision(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn(tensor, ...)`` computed on an fp32 copy of a bf16/fp16 ``tensor``, then rounded into it."""

    def wrapped(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tensor.dtype not in (torch.bfloat16, torch.float16):
            return fn(tensor, *args, **kwargs)
        tmp = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
        fn(tmp, *args, **kwargs)
        with torch.no_grad():
            return tensor.copy_(tmp)

    return wrapped


@contextlib.contextmanager
def _truncated_normal_in_fp32() -> Iterator[None]:
    """Truncated-normal init (torch's and timm's: uniform draws pushed through ``erfinv``) in
    bf16 saturates at the truncation bounds (std 0.02 comes out near 0.1): compute it in fp32."""
    targets: list[tuple[Any, str]] = [(torch.nn.init, "_no_grad_trunc_normal_")]
    try:
        import timm.layers.weight_init as timm_init

        targets.append((timm_init, "_trunc_normal_"))
    except ImportError:  # pragma: no cover - timm is a dependency of open_clip's timm towers only
        pass
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]
    for obj, name, fn in saved:
        setattr(obj, name, _full_precision(fn))
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


@contextlib.contextmanager
def construct_in_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Cast floating-point parameters and buffers to ``dtype`` as modules register them.

    A parameter registered under two names (weight tying) stays one parameter. Buffers are
    cast too (computed buffers such as rotary tables are computed in full precision, then
    rounded once), as ``module.to(dtype)`` would. Truncated-normal initialisation is computed in
    fp32 and rounded (see :func:`_truncated_normal_in_fp32`); other inits run in ``dtype``.

    Args:
        dtype: The tower's weight dtype; ``torch.float32`` changes nothing.
    """
    if dtype == torch.float32:
        yield
        return
    # original parameter (weakly, so its memory goes) -> its cast; keyed by id, checked by identity
    seen: dict[int, tuple[weakref.ref, nn.Parameter]] = {}

    def on_param(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or not param.is_floating_point() or param.dtype == dtype:
            return None
        hit = seen.get(id(param))
        if hit is None or hit[0]() is not param:
            hit = (weakref.ref(param), nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
            seen[id(param)] = hit
        return hit[1]

    def on_buffer(module: nn.Module, name: str, buf: torch.Tensor | None) -> torch.Tensor | None:
        if buf is None or not buf.is_floating_point() or buf.dtype == dtype:
            return None
        return _cast(buf, dtype)

    hp = torch.nn.modules.module.register_module_parameter_registration_hook(on_param)
    hb = torch.nn.modules.module.register_module_buffer_registration_hook(on_buffer)
    try:
        with _truncated_normal_in_fp32():
            yield
    finally:
        hp.remove()
        hb.remove()


def sharded_params(module: nn.Module, shard: ShardHooks, *, children: bool = True) -> list[nn.Parameter]:
    """The partitioned parameters of ``module`` itself and (``children``) of its direct
    children: what a library's per-module init function may touch."""
    params = list(module.parameters(recurse=False))
    if children:
        for child in module.children():
            params.extend(child.parameters(recurse=False))
    out, ids = [], set()
    for p in params:
        if shard.is_sharded(p) and id(p) not in ids:
            ids.add(id(p))
            out.append(p)
    return out
