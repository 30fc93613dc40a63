"""Counts the ``torch.distributed`` collectives this process issues (calls and bytes), for benches and
tests that compare communication (MoSA against a dense adapter, ZeRO stages, planner predictions).

The functions are wrapped where callers find them: ``torch.distributed`` and its ``distributed_c10d``
module, and the gather / reduce-scatter functions DeepSpeed's comm backend captured when it started.
A call made from inside another counted call (a library composing collectives) counts once, as the
outer call. Bytes are those of the collective's full buffer: the largest tensor argument (a tensor
list counts as the sum of its tensors), e.g. the gathered output of an all-gather and the input of a
reduce-scatter.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather",
    "scatter",
    "all_reduce_coalesced",
    "all_gather_coalesced",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveCounter:
    """Context manager counting collectives by name: ``calls[name]`` and ``bytes[name]``.

    Example::

        with CollectiveCounter() as comm:
            engine.step()
        print(comm.total_calls(), comm.calls)
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._depth = 0
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.calls[name] += 1
                self.bytes[name] += max([_nbytes(a) for a in (*args, *kwargs.values())], default=0)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        counted.__mosa_counted__ = True  # type: ignore[attr-defined]
        return counted

    def _patch(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None or getattr(fn, "__mosa_counted__", False):
            return
        self._undo.append((owner, attr, fn))
        setattr(owner, attr, self._wrap(name, fn))

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            self._patch(dist, name, name)
            self._patch(c10d, name, name)
        try:  # the functions DeepSpeed's torch backend captured at start-up
            from deepspeed.comm import comm as ds_comm

            backend = getattr(ds_comm, "cdb", None)
            if backend is not None:
                self._patch(backend, "all_gather_function", "all_gather_into_tensor")
                self._patch(backend, "reduce_scatter_function", "reduce_scatter_tensor")
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": dict(sorted(self.calls.items())),
            "bytes": dict(sorted(self.bytes.items())),
            "total_calls": self.total_calls(),
            "total_bytes": self.total_bytes(),
        }
