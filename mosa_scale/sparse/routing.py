"""Stochastic expert activation (MOSA_SPEC section 3).

Every plan is a pure function of (seed, step, micro-batch, pass, rank), drawn from a dedicated
generator seeded by those numbers. That gives three properties for free:

* the plan is fixed before the forward runs, so activation-checkpoint recompute replays it
  (:meth:`Router.checkpoint` captures the plan in the recomputed closure);
* a resumed run replays the same sequence from the step counter alone;
* under ``rank`` scope every rank can compute every other rank's choices locally, so the
  per-slice "how many ranks used it" counts need no collective at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.utils.checkpoint

from mosa_scale.seeding import derive_seed

SliceKey = tuple[int, int]  # (route id, expert)
Scope = Literal["global", "rank"]  # routing.scope
# the pass index of the evaluation's one stochastic probe: training uses passes 0 and 1 (the
# consistency pass), so the probe's routing plan is never one a training forward used
PROBE_PASS = 7


@dataclass(frozen=True)
class Window:
    """Routing of one optimizer step: every micro-batch and pass on every rank."""

    step: int
    choices: torch.Tensor  # (micro, passes, ranks, routes) int64
    counts: torch.Tensor  # (routes, max_N) number of (rank, micro) units that used each slice
    active: frozenset[SliceKey]


class Router:
    """Draws which expert each split projection uses on every training forward.

    Args:
        seed: Run seed.
        scope: ``global`` (all ranks draw the same expert) or ``rank`` (each rank its own).
        rank: This process's data-parallel rank.
        world_size: Data-parallel world size.
    """

    def __init__(self, seed: int, scope: Scope = "global", rank: int = 0, world_size: int = 1) -> None:
        assert scope in get_args(Scope), scope  # routing.scope is checked when the config is loaded
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.seed, self.scope, self.rank, self.world_size = seed, scope, rank, world_size
        self.num_experts: list[int] = []  # per route id
        self.names: list[str] = []
        self.window: Window | None = None
        self._current: torch.Tensor | None = None  # (routes,) plan of the running forward pass
        self._current_list: list[int] | None = None  # the same, as Python ints (read once per layer)
        self._counts_of: tuple[Window | None, list[list[int]]] = (None, [])  # window -> counts as lists

    def register(self, name: str, num_experts: int) -> int:
        """Adds one split projection; returns its route id (registration order)."""
        self.num_experts.append(num_experts)
        self.names.append(name)
        return len(self.num_experts) - 1

    def plan(self, step: int, micro: int = 0, pass_index: int = 0) -> torch.Tensor:
        """Choices of every rank for one forward: (ranks, routes) int64, ranks = 1 under global."""
        routes = len(self.num_experts)
        rows = self.world_size if self.scope == "rank" else 1
        gen = torch.Generator(device="cpu").manual_seed(derive_seed("route", self.seed, step, micro, pass_index))
        u = torch.rand((rows, routes), generator=gen, dtype=torch.float64)
        n = torch.tensor(self.num_experts, dtype=torch.float64)
        choice = torch.floor(u * n).to(torch.int64)  # uniform over 0..N-1 per route
        choice = torch.minimum(choice, n.to(torch.int64) - 1)
        return choice.expand(self.world_size, routes) if rows == 1 else choice

    def begin_step(self, step: int, *, micro_batches: int = 1, passes: int = 1) -> Window:
        """Fixes the plans of one optimizer step (all micro-batches, passes and ranks)."""
        choices = torch.stack(
            [torch.stack([self.plan(step, m, p) for p in range(passes)]) for m in range(micro_batches)]
        )  # (micro, passes, ranks, routes)
        routes = len(self.num_experts)
        max_n = max(self.num_experts, default=1)
        used = torch.zeros((micro_batches, self.world_size, routes, max_n), dtype=torch.bool)
        for p in range(passes):
            used.scatter_(3, choices[:, p].unsqueeze(-1), True)  # a unit uses k if any pass did
        counts = used.sum(dim=(0, 1)).to(torch.int64)  # (routes, max_N)
        active = frozenset((r, k) for r, k in torch.nonzero(counts).tolist())
        self.window = Window(step=step, choices=choices, counts=counts, active=active)
        return self.window

    @contextlib.contextmanager
    def forward_pass(self, micro: int = 0, pass_index: int = 0) -> Iterator[None]:
        """Makes the plan of (micro, pass) on this rank current for one training forward."""
        if self.window is None:
            raise RuntimeError("Router.begin_step(step) must run before a training forward")
        with self.use(self.window.choices[micro, pass_index, self.rank]):
            yield

    @contextlib.contextmanager
    def use(self, plan: torch.Tensor | None) -> Iterator[None]:
        previous = self._current, self._current_list
        self._current, self._current_list = plan, None if plan is None else plan.tolist()
        try:
            yield
        finally:
            self._current, self._current_list = previous

    def choice(self, route_id: int) -> int:
        """The expert of ``route_id`` in the running forward pass.

        Raises:
            RuntimeError: when called outside :meth:`forward_pass`.
        """
        if self._current is None:
            raise RuntimeError(
                f"{self.names[route_id]}: a MoSA layer ran a training forward outside a routing pass; "
                "wrap the forward in `with router.forward_pass(micro, pass_index):` after "
                "router.begin_step(step), or call model.eval() to use merged weights"
            )
        return self._current_list[route_id]

    def grad_scale(self, route_id: int, expert: int) -> float:
        """Factor on slice gradients so that the data-parallel mean becomes the mean over the
        (rank, micro-batch) units that used the slice: ``ranks * micro / count``. A plan set by
        hand with :meth:`use` (outside the window's draws) gets 1."""
        if self.window is None:
            return 1.0
        if self._counts_of[0] is not self.window:  # once per window (it may also be set by hand)
            self._counts_of = (self.window, self.window.counts.tolist())
        count = self._counts_of[1][route_id][expert]
        return self.world_size * self.window.choices.shape[0] / count if count else 1.0

    def active_slices(self) -> frozenset[SliceKey]:
        """Slices used by any rank in the current window (all slices before the first window)."""
        if self.window is None:
            return frozenset((r, k) for r, n in enumerate(self.num_experts) for k in range(n))
        return self.window.active

    def activation_counts(self) -> torch.Tensor:
        """(routes, max_N) how many (rank, micro) units used each expert in the current window."""
        assert self.window is not None
        return self.window.counts.clone()

    def checkpoint(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``torch.utils.checkpoint.checkpoint`` that replays this forward's experts on recompute."""
        plan = self._current

        def run(*a: Any, **kw: Any) -> Any:
            with self.use(plan):
                return fn(*a, **kw)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "scope": self.scope,
            "world_size": self.world_size,
            "num_experts": list(self.num_experts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checks a saved router matches this one (plans depend on nothing else but the step).

        Raises:
            ValueError: naming every field that differs.
        """
        mine = self.state_dict()
        if self.scope == "global":  # global plans do not depend on the world size
            mine.pop("world_size")
        diff = [f"{k}: checkpoint {state.get(k)!r} != run {mine[k]!r}" for k in mine if state.get(k) != mine[k]]
        if diff:
            raise ValueError("routing state does not match this run: " + "; ".join(diff))
