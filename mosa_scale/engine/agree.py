"""Small agreements between ranks: one rank decides, every rank acts the same (no rank is left
waiting in a collective while another has stopped)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable, between this run's own processes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[[], T], *, errors: tuple[type[BaseException], ...], share: bool = False) -> T | None:
    """Runs ``fn`` on rank 0 only; an error of the given types is raised on every rank alike.

    Args:
        fn: What rank 0 does.
        errors: Error types to pass to the other ranks (their constructor must take one message).
        share: Return rank 0's result on every rank (it must be picklable); otherwise the other
            ranks get None.
    """
    rank, _ = rank_world()
    outcome: tuple[str, Any] = ("ok", None)
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
            outcome = ("ok", result if share else None)
        except errors as e:
            error, outcome = e, ("error", (type(e), str(e)))
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        cls, message = outcome[1]
        raise cls(message)
    return result if rank == 0 else outcome[1]
