"""AdamW that trains MoSA experts exactly like the N-copies reference (MOSA_SPEC section 4) while
keeping the param groups of a dense adapter.

A MoSA layer holds all its experts in one tensor (:mod:`mosa_scale.sparse.layout`); DeepSpeed
flattens the groups and hands the optimizer one flat fp32 partition per group (ZeRO-1/2) or
sub-group (ZeRO-3). The optimizer knows, for every tensor it steps, which element ranges belong to
which (layer, expert) slice (:meth:`MoSAAdamW.bind`; a model parameter stepped directly needs no
binding), and steps a slice's elements only when the update semantics say the reference copy
steps:

* ``skip``: a slice no unit used this step is untouched (values, both moments, its step count
  and s_k): the reference where an unused copy has ``grad = None`` (torch >= 2 ``zero_grad``).
* ``coast``: the authors' published runs (PyTorch 1.11, ``zero_grad()`` left zero tensors): from
  its first use on, a slice steps every step, with a zero gradient when not chosen; its stale
  moments keep moving it and weight decay shrinks it (s_k too).

Each slice's bias correction uses its own step count (the layer's ``steps`` buffer), and the
layer's ``decay`` buffer s_k follows what decoupled weight decay does to the off-mask W0 entries
of the reference copy. Both buffers are replicated on every rank and advanced once per optimizer
step, so they are identical everywhere and are saved with the model.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, get_args

import torch

from mosa_scale.config.run import Inactive
from mosa_scale.optim.groups import build_param_groups, sparse_layers
from mosa_scale.sparse.layout import BIASES, SLICES
from mosa_scale.sparse.linear import SparseExpertLinear
from mosa_scale.sparse.routing import Router, Window


class Fragment(NamedTuple):
    """Where a piece of a model parameter sits in a tensor the optimizer steps.

    Attributes:
        param: The model parameter.
        param_start: First element of the piece in the parameter's flat values.
        target_start: Its first element in the stepped tensor.
        numel: Length of the piece.
    """

    param: torch.Tensor
    param_start: int
    target_start: int
    numel: int


@dataclass
class _Runs:
    """A stepped tensor cut into runs: ``lengths[i]`` elements of slot ``slots[i]`` (-1 = dense)."""

    starts: list[int]
    lengths: list[int]
    slots: list[int]
    numel: int
    lengths_t: torch.Tensor  # (R,) int64
    slots_t: torch.Tensor  # (R,) int64
    _pieces: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)

    def pieces(self, numel: int) -> list[tuple[int, int, int, int]]:
        """Consecutive runs grouped into pieces of at most ``numel`` elements (a longer run alone):
        ``(first run, end run, first element, elements)`` each, in order, covering the tensor."""
        if numel not in self._pieces:
            out, r0, start = [], 0, 0
            for r, length in enumerate(self.lengths):
                size = self.starts[r] - start
                if r > r0 and size + length > numel:
                    out.append((r0, r, start, size))
                    r0, start = r, self.starts[r]
            out.append((r0, len(self.lengths), start, self.numel - start))
            self._pieces[numel] = out
        return self._pieces[numel]


def _per_element(x: torch.Tensor, *, lengths: torch.Tensor, runs: slice, n: int) -> torch.Tensor:
    """Per-run values ``x[runs]`` repeated over their runs' ``lengths``: (runs,) -> (n,)."""
    return torch.repeat_interleave(x[runs], lengths, output_size=n)


def _adamw_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lr: float,
    wd: float,
    b1: float,
    b2: float,
    eps: float,
    *,
    step: float,
) -> None:
    """``torch.optim.AdamW``'s single-tensor update of ``p`` (in place), at bias-correction step ``step``."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**step))


class MoSAAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose MoSA slices step as the N-copies reference's copies do.

    Dense parameters (and DeepSpeed's alignment padding) step exactly as ``torch.optim.AdamW``.
    Works as DeepSpeed's client optimizer under ZeRO 0-3 (needs ``zero_allow_untested_optimizer``);
    after ``deepspeed.initialize`` call :func:`mosa_scale.engine.deepspeed_engine.bind_optimizer`.

    Args:
        params: Groups from :func:`~mosa_scale.optim.groups.build_param_groups`.
        router: The routing of the current step; None: every slice is used every step.
        layers: MoSA layers by route id (their ``slices``/``biases`` must be in ``params``).
        inactive: ``skip`` or ``coast`` (see the module docstring).
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.

    Raises:
        ValueError: on an unknown ``inactive`` or a MoSA parameter missing from ``params``.
    """

    def __init__(
        self,
        params: Any,
        *,
        router: Router | None = None,
        layers: Mapping[int, SparseExpertLinear] | None = None,
        inactive: Inactive = "skip",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        assert inactive in get_args(Inactive), inactive  # optim.inactive is checked when the config is loaded
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.router, self.inactive = router, inactive
        self.layers = [layers[r] for r in sorted(layers or {})]
        self.skip_all = False  # set for a step whose loss was not finite: nothing changes
        self._own = {id(p): p for g in self.param_groups for p in g["params"]}
        # DeepSpeed swaps ``param_groups`` while it steps one group; keep the whole list and the
        # group index of every parameter (the lr of a layer's group sets its s_k decay)
        self._groups = list(self.param_groups)
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._slot0: dict[int, int] = {}
        self._layout: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # id(param) -> (first slot, ranges)
        slot = 0
        for layer in self.layers:
            missing = [
                n
                for n, p in ((SLICES, layer.slices), (BIASES, getattr(layer, "biases", None)))
                if p is not None and id(p) not in self._own
            ]
            if missing:
                raise ValueError(f"{layer.name}: {', '.join(missing)} not in the optimizer's param groups")
            self._slot0[layer.route_id] = slot
            self._layout[id(layer.slices)] = (slot, list(layer.ranges))
            if layer.has_bias:
                self._layout[id(layer.biases)] = (slot, list(layer.bias_ranges))
            slot += layer.num_experts
        self.num_slots = slot
        self._sizes = [layer.num_experts for layer in self.layers]
        self._slot_route = torch.tensor(
            [layer.route_id for layer in self.layers for _ in range(layer.num_experts)], dtype=torch.int64
        )
        self._slot_expert = torch.tensor(
            [k for layer in self.layers for k in range(layer.num_experts)], dtype=torch.int64
        )
        self._runs: dict[int, tuple[torch.Tensor, _Runs | None]] = {}
        self._bound = False
        self._window: Window | None | object = object()  # the routing window last advanced for
        self._stepped = torch.ones(slot, dtype=torch.bool)
        self._counts = torch.zeros(slot, dtype=torch.float64)
        self._stepped_list: list[bool] = [True] * slot
        self._counts_list: list[int] = [0] * slot
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ where the slices are
    def bind(self, targets: Iterable[tuple[torch.Tensor, Sequence[Fragment]]]) -> None:
        """Tells the optimizer which tensors it will step and where each parameter's values are
        in them (DeepSpeed's flat partitions). A slice may be cut between two ranks' partitions.

        Raises:
            ValueError: when fragments overlap or run past their tensor.
        """
        self._runs = {id(t): (t, self._build_runs(t.numel(), frags)) for t, frags in targets}
        self._bound = True

    def _build_runs(self, numel: int, fragments: Sequence[Fragment]) -> _Runs | None:
        pieces = []
        for f in fragments:
            if f.target_start < 0 or f.target_start + f.numel > numel:
                raise ValueError(f"a fragment of {f.numel} values at {f.target_start} does not fit a tensor of {numel}")
            layout = self._layout.get(id(f.param))
            if layout is None:
                continue  # a dense parameter: its elements step every step
            slot0, ranges = layout
            lo, hi = f.param_start, f.param_start + f.numel
            for k, (off, n) in enumerate(ranges):
                a, b = max(off, lo), min(off + n, hi)
                if a < b:
                    pieces.append((f.target_start + a - lo, b - a, slot0 + k))
        if not pieces:
            return None
        pieces.sort()
        lengths, slots, pos = [], [], 0
        for start, length, slot in pieces:
            if start < pos:
                raise ValueError(f"MoSA slice fragments overlap at element {start} of a stepped tensor")
            if start > pos:
                lengths.append(start - pos)
                slots.append(-1)
            lengths.append(length)
            slots.append(slot)
            pos = start + length
        if pos < numel:
            lengths.append(numel - pos)
            slots.append(-1)
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        return _Runs(
            starts,
            lengths,
            slots,
            numel,
            torch.tensor(lengths, dtype=torch.int64),
            torch.tensor(slots, dtype=torch.int64),
        )

    def slot_key(self, slot: int) -> tuple[int, int]:
        """``(route id, expert)`` of a slot number."""
        for layer in reversed(self.layers):
            if slot >= self._slot0[layer.route_id]:
                return layer.route_id, slot - self._slot0[layer.route_id]
        raise IndexError(slot)

    def expert_runs(self, tensor: torch.Tensor) -> list[tuple[tuple[int, int], int, int]]:
        """Where the expert slices sit in a tensor this optimizer steps: ``((route, expert), start,
        length)`` per run (an expert cut by a partition boundary has a run on each rank)."""
        runs = self._runs_for(tensor)
        if runs is None:
            return []
        return [
            (self.slot_key(slot), start, length)
            for start, length, slot in zip(runs.starts, runs.lengths, runs.slots)
            if slot >= 0
        ]

    def _runs_for(self, p: torch.Tensor) -> _Runs | None:
        entry = self._runs.get(id(p))
        if entry is not None and entry[0] is p:
            return entry[1]
        if self._own.get(id(p)) is p:  # a model parameter stepped directly (plain torch, ZeRO-0 fp32)
            runs = self._build_runs(p.numel(), [Fragment(p, 0, 0, p.numel())])
            self._runs[id(p)] = (p, runs)
            return runs
        if not self.layers:
            return None  # dense training: every element steps every step
        raise RuntimeError(
            f"MoSAAdamW was asked to step a tensor of {p.numel()} values it cannot map to MoSA expert ranges"
            + (" (bound tensors differ: was the engine rebuilt?)" if self._bound else "")
            + "; call mosa_scale.engine.deepspeed_engine.bind_optimizer(engine, optimizer) after deepspeed.initialize"
        )

    # ------------------------------------------------------------------ per optimizer step
    def _advance(self) -> None:
        """Once per optimizer step (DeepSpeed calls ``step`` once per group or sub-group): which
        slices step, their step counts and the off-mask decay factors s_k, for all layers at once."""
        window = self.router.window if self.router is not None else None
        if window is not None and window is self._window:
            return
        self._window = window
        if not self.layers:
            return
        steps = [layer.steps for layer in self.layers]
        dev = steps[0].device
        before = torch.cat(steps)  # (slots,)
        if window is not None:
            stepped = (window.counts[self._slot_route, self._slot_expert] > 0).to(dev)
        else:
            stepped = torch.ones_like(before, dtype=torch.bool)
        if self.inactive == "coast":
            stepped = stepped | (before > 0)  # a copy steps every step from its first use on
        add = stepped.to(before.dtype)
        torch._foreach_add_(steps, list(add.split(self._sizes)))
        factors = [
            1.0 - float(g["lr"]) * float(g["weight_decay"])
            for g in (self._groups[self._group_index[id(layer.slices)]] for layer in self.layers)
        ]
        if any(f != 1.0 for f in factors):  # the reference's decoupled decay of the copy's off-mask W0 entries
            per_slot = torch.repeat_interleave(
                torch.tensor(factors, dtype=self.layers[0].decay.dtype), torch.tensor(self._sizes)
            ).to(dev)
            mult = torch.where(stepped, per_slot, 1.0)
            torch._foreach_mul_([layer.decay for layer in self.layers], list(mult.split(self._sizes)))
        counts = before + add
        self._stepped, self._counts = stepped, counts.double()
        self._stepped_list, self._counts_list = stepped.tolist(), counts.tolist()
        self._on_device = {}

    def _slot_state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._stepped.to(device), self._counts.to(device))
        return self._on_device[device]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_all:
            return loss
        self._advance()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    # stepped runs of a tensor up to which each is updated on its own view (exactly torch's scalar
    # AdamW); more go through one masked, vectorised update, piece by piece
    loop_runs = 4
    # elements per piece of the masked update (whole runs; a longer run is a piece of its own)
    piece_numel = 1 << 20

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("MoSAAdamW does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        runs = self._runs_for(p)
        g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
        hyper = (float(group["lr"]), float(group["weight_decay"]), *group["betas"], float(group["eps"]))
        state["step"] += 1
        dense_step = float(state["step"])
        if runs is None:
            _adamw_(p, g, m, v, *hyper, step=dense_step)
            return
        # (start, length, bias-correction step) of every run that steps, neighbours with one count merged
        todo: list[list[float]] = []
        for start, length, slot in zip(runs.starts, runs.lengths, runs.slots):
            if slot >= 0 and not self._stepped_list[slot]:
                continue
            count = dense_step if slot < 0 else float(self._counts_list[slot])
            if todo and todo[-1][0] + todo[-1][1] == start and todo[-1][2] == count:
                todo[-1][1] += length
            else:
                todo.append([start, length, count])
        if len(todo) <= self.loop_runs:
            flat = (p.view(-1), g.view(-1), m.view(-1), v.view(-1))
            for start, length, count in todo:
                _adamw_(*(t.narrow(0, int(start), int(length)) for t in flat), *hyper, step=count)
            return
        self._update_masked(p, g, m, v, runs, hyper, dense_step)

    def _update_masked(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        runs: _Runs,
        hyper: tuple[float, ...],
        dense_step: float,
    ) -> None:
        """The same update for many runs at once: per-element bias corrections, elements of runs
        that do not step kept bit-identical. It goes piece by piece (whole runs, about
        ``piece_numel`` elements each), so its temporaries are a few pieces' worth, not a few
        copies of the tensor (under ZeRO a rank's whole flat partition)."""
        lr, wd, b1, b2, eps = hyper
        stepped_slots, counts = self._slot_state(p.device)
        slots, lengths = runs.slots_t.to(p.device), runs.lengths_t.to(p.device)
        is_slice = slots >= 0
        idx = slots.clamp(min=0)
        stepped = torch.where(is_slice, stepped_slots[idx], True)  # (R,) dense runs always step
        count = torch.where(is_slice, counts[idx], dense_step)
        count = torch.where(stepped, count, 1.0)  # (R,) float64 bias-correction steps
        step_size = (lr / (1 - torch.pow(b1, count))).to(p.dtype)  # (R,)
        bc2_sqrt = torch.sqrt(1 - torch.pow(b2, count)).to(p.dtype)  # (R,)
        decay = torch.where(stepped, torch.full_like(count, 1 - lr * wd), 1.0).to(p.dtype)  # (R,)
        every = bool(stepped.all())
        flat = [t.view(-1) for t in (p, g, m, v)]
        for r0, r1, start, n in runs.pieces(self.piece_numel):
            per_element = functools.partial(_per_element, lengths=lengths[r0:r1], runs=slice(r0, r1), n=n)
            pp, gg, mm, vv = (t.narrow(0, start, n) for t in flat)
            size, bc2 = per_element(step_size), per_element(bc2_sqrt)
            if every:
                pp.mul_(1 - lr * wd)
                mm.lerp_(gg, 1 - b1)
                vv.mul_(b2).addcmul_(gg, gg, value=1 - b2)
                pp.sub_(size.mul_(mm).div_((vv.sqrt() / bc2).add_(eps)))
                continue
            # only the stepped runs change; every other element (value, moments) stays bit-identical
            mask = per_element(stepped)
            mm.copy_(torch.where(mask, torch.lerp(mm, gg, 1 - b1), mm))
            vv.copy_(torch.where(mask, (vv * b2).addcmul_(gg, gg, value=1 - b2), vv))
            new = pp * per_element(decay)
            new.sub_(size.mul_(mm).div_((vv.sqrt() / bc2).add_(eps)))
            pp.copy_(torch.where(mask, new, pp))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._groups = list(self.param_groups)  # torch builds new group dicts

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        router: Router | None,
        weight_decay: float,
        inactive: Inactive = "skip",
        **kwargs: Any,
    ) -> MoSAAdamW:
        """Builds the groups of ``model`` and the optimizer over them."""
        layers = {m.route_id: m for m in sparse_layers(model).values()}
        return cls(
            build_param_groups(model, weight_decay=weight_decay),
            router=router,
            layers=layers,
            inactive=inactive,
            weight_decay=weight_decay,
            **kwargs,
        )
