"""The study's grid, its three phases and the choices made between them.

* Phase A (learning rate): every method at every rate of ``lrs``, ``select_steps`` steps, seed
  ``select_seed``, validation split; sparse methods in their base variant. A method whose best
  rate is the grid's largest (smallest) is also run at the next rate out (the grid's end ratio
  again), up to ``extend_lrs`` more per side, so every chosen rate is bracketed or at that limit.
* Phase B (variant screen): every variant of each sparse method at that method's chosen rate,
  otherwise as phase A (the base variant's runs are phase A's, reused by id).
* Phase C (final): every final configuration at every length of ``final_steps`` and every seed
  of ``final_seeds`` (schedules longer than ``select_steps`` only for the methods of
  ``long_methods`` when it is set), trained on all labelled samples and evaluated once on the
  test split. The final configurations are each method's best variant at its chosen rate, plus,
  for the better MoSA semantics (the parallel adapter whose best variant scores higher), its best
  variant at each N of ``experts`` (for the gain-against-N plot; the other semantics is run at its
  best N only, which saves one configuration of phase C).

Choices are made jointly over the tasks: the highest mean validation top-1 over the tasks; a tie
goes to the earlier entry in grid order (the smaller rate; consistency off before on).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, fields
from typing import Any

from mosa_scale.adapters.config import SHARE_VALUES
from mosa_scale.config.errors import Problems
from mosa_scale.study.run import DENSE, METHODS, SPARSE, RunSpec, Variant, parse_method
from mosa_scale.study.tasks import TASKS

Rows = dict[str, dict[str, Any]]  # run id -> row


@dataclass(frozen=True)
class FinalConfig:
    """A configuration of phase C: a method, its variant and rate, and why it is there."""

    method: str
    variant: Variant
    lr: float
    role: str  # "best" or "best at N k"

    @property
    def name(self) -> str:
        return self.method if self.variant.num_experts == 1 else f"{self.method} ({self.variant.tag})"


def _best(variants: list[Variant], scores: list[float], candidates: list[int]) -> Variant:
    """The best-scoring candidate; a tie goes to the earlier one in grid order."""
    return variants[max(candidates, key=lambda i: (scores[i], -i))]


@dataclass(frozen=True)
class StudyGrid:
    """Which runs the study makes (see the module docstring).

    Raises:
        mosa_scale.config.ConfigError: every invalid field at once.
    """

    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    lrs: tuple[float, ...] = (1e-3, 5e-3, 2e-2)
    extend_lrs: int = 2
    select_steps: int = 1250
    select_seed: int = 0
    final_steps: tuple[int, ...] = (300, 1250, 3000)
    final_seeds: tuple[int, ...] = (0, 1, 2)
    long_methods: tuple[str, ...] = ()  # run beyond select_steps; empty: every method
    base: Variant = field(default_factory=lambda: Variant(4, "down", False))
    experts: tuple[int, ...] = (2, 4)
    shares: tuple[str, ...] = ("down", "none")
    lora_shares: tuple[str, ...] = ("down",)
    consistency: tuple[bool, ...] = (False, True)

    def __post_init__(self) -> None:
        p = Problems()
        for name in (
            "tasks",
            "methods",
            "lrs",
            "final_steps",
            "final_seeds",
            "experts",
            "shares",
            "lora_shares",
            "consistency",
        ):
            values = getattr(self, name)
            if not values:
                p.add(name, "must not be empty")
            elif len(set(values)) != len(values):
                p.add(name, f"got {list(values)}; has duplicates")
        for t in self.tasks:
            p.choice("tasks", t, TASKS)
        for m in self.methods:
            p.choice("methods", m, METHODS)
        for m in self.long_methods:
            p.choice("long_methods", m, self.methods)
        for lr in self.lrs:
            if not lr > 0:
                p.add("lrs", f"got {lr!r}; must be positive")
        if list(self.lrs) != sorted(self.lrs):
            p.add("lrs", f"got {list(self.lrs)}; list them in increasing order")
        if not isinstance(self.extend_lrs, int) or self.extend_lrs < 0:
            p.add("extend_lrs", f"got {self.extend_lrs!r}; must be an integer >= 0")
        for s in (self.select_steps, *self.final_steps):
            if not isinstance(s, int) or s < 1:
                p.add("steps", f"got {s!r}; must be a positive integer")
        for n in (*self.experts, self.base.num_experts):
            if not isinstance(n, int) or not 2 <= n <= 127:
                p.add("experts", f"got {n!r}; a sparse variant needs 2..127 experts")
        for s in (*self.shares, *self.lora_shares, self.base.share):
            p.choice("shares", s, SHARE_VALUES)
        p.raise_if_any()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["base"] = {f.name: getattr(self.base, f.name) for f in fields(Variant)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyGrid:
        d = dict(d)
        base = Variant(**d.pop("base"))
        return cls(base=base, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    # ------------------------------------------------------------------ variants
    def first_variant(self, method: str) -> Variant:
        """The variant of phase A: the base variant for a sparse method, else the dense one."""
        return self.base if parse_method(method)[0] in SPARSE else DENSE

    def variants(self, method: str) -> list[Variant]:
        """Phase B's screen of a sparse method, in grid order (the base variant among them)."""
        family = parse_method(method)[0]
        if family not in SPARSE:
            return [DENSE]
        shares = self.lora_shares if family == "mosa_lora" else self.shares
        return [Variant(n, s, c) for n in self.experts for s in shares for c in self.consistency]

    # ------------------------------------------------------------------ phases
    def method_lrs(self, rows: Rows, method: str) -> list[float]:
        """The rates phase A tries for ``method`` given the rows so far (increasing): ``lrs``, plus
        the next rate out on a side where the best rate sits, while the runs at every rate so far
        are in and ``extend_lrs`` allows."""
        lrs, up, down = list(self.lrs), 0, 0
        while True:
            scores = [self.val_score(rows, method, self.first_variant(method), lr) for lr in lrs]
            if any(s is None for s in scores) or len(lrs) < 2:
                return lrs
            best = max(range(len(lrs)), key=lambda i: (scores[i], -i))
            if best == len(lrs) - 1 and up < self.extend_lrs:
                lrs.append(float(f"{lrs[-1] * self.lrs[-1] / self.lrs[-2]:.6g}"))  # e.g. 2e-2 -> 8e-2
                up += 1
            elif best == 0 and down < self.extend_lrs:
                lrs.insert(0, float(f"{lrs[0] * self.lrs[0] / self.lrs[1]:.6g}"))  # e.g. 1e-3 -> 2e-4
                down += 1
            else:
                return lrs

    def phase_a(self, rows: Rows | None = None) -> list[RunSpec]:
        """The rate runs the rows call for so far (rerun after they are in, until none is missing)."""
        return [
            RunSpec(t, m, self.first_variant(m), lr, self.select_steps, self.select_seed, "val", "A")
            for m in self.methods
            for lr in self.method_lrs(rows or {}, m)
            for t in self.tasks
        ]

    def phase_b(self, lrs: dict[str, float]) -> list[RunSpec]:
        return [
            RunSpec(t, m, v, lrs[m], self.select_steps, self.select_seed, "val", "B")
            for m in self.methods
            if parse_method(m)[0] in SPARSE
            for v in self.variants(m)
            for t in self.tasks
        ]

    def phase_c(self, configs: list[FinalConfig]) -> list[RunSpec]:
        """Shortest schedule first, then seed by seed, so a study stopped early has whole tables."""
        return [
            RunSpec(t, c.method, c.variant, c.lr, steps, seed, "test", "C")
            for steps in self.final_steps
            for seed in self.final_seeds
            for t in self.tasks
            for c in configs
            if self.runs_at(c.method, steps)
        ]

    def runs_at(self, method: str, steps: int) -> bool:
        """Whether phase C runs ``method`` at a schedule of ``steps``."""
        return steps <= self.select_steps or not self.long_methods or method in self.long_methods

    # ------------------------------------------------------------------ choices
    def val_score(self, rows: Rows, method: str, variant: Variant, lr: float) -> float | None:
        """Mean validation top-1 over the tasks; None while a task's run is missing."""
        accs = [
            rows.get(RunSpec(t, method, variant, lr, self.select_steps, self.select_seed, "val").id) for t in self.tasks
        ]
        return None if any(a is None for a in accs) else statistics.fmean(a["top1"] for a in accs)

    def choose_lrs(self, rows: Rows) -> dict[str, float]:
        """Each method's rate (phase A); methods whose phase A is incomplete are left out."""
        chosen = {}
        for m in self.methods:
            lrs = self.method_lrs(rows, m)
            scores = [self.val_score(rows, m, self.first_variant(m), lr) for lr in lrs]
            if all(s is not None for s in scores):
                chosen[m] = lrs[max(range(len(scores)), key=lambda i: (scores[i], -i))]
        return chosen

    def choose_variants(self, rows: Rows, lrs: dict[str, float]) -> dict[str, dict[int | None, Variant]]:
        """Per sparse method with a rate: ``{None: best variant, N: best variant with N experts}``;
        methods whose phase B is incomplete are left out."""
        chosen: dict[str, dict[int | None, Variant]] = {}
        for m in self.methods:
            if parse_method(m)[0] not in SPARSE or m not in lrs:
                continue
            variants = self.variants(m)
            scores = [self.val_score(rows, m, v, lrs[m]) for v in variants]
            if any(s is None for s in scores):
                continue
            chosen[m] = {None: _best(variants, scores, list(range(len(variants))))}
            for n in self.experts:
                chosen[m][n] = _best(variants, scores, [i for i, v in enumerate(variants) if v.num_experts == n])
        return chosen

    def gain_method(
        self, rows: Rows, lrs: dict[str, float], variants: dict[str, dict[int | None, Variant]]
    ) -> str | None:
        """The MoSA semantics whose best variant has the higher validation score (None: no MoSA)."""
        mosa = [m for m in self.methods if parse_method(m)[0] == "mosa" and m in variants]
        if not mosa:
            return None
        scores = [self.val_score(rows, m, variants[m][None], lrs[m]) for m in mosa]
        return mosa[max(range(len(mosa)), key=lambda i: (scores[i], -i))]

    def final_configs(
        self, lrs: dict[str, float], variants: dict[str, dict[int | None, Variant]], gain_method: str | None
    ) -> list[FinalConfig]:
        """Phase C's configurations (each once, in method order); ``gain_method`` also gets its
        best variant at every N."""
        configs: list[FinalConfig] = []
        for m in self.methods:
            family = parse_method(m)[0]
            if family not in SPARSE:
                configs.append(FinalConfig(m, DENSE, lrs[m], "best"))
                continue
            best = variants[m][None]
            configs.append(FinalConfig(m, best, lrs[m], "best"))
            if m == gain_method:
                configs += [
                    FinalConfig(m, variants[m][n], lrs[m], f"best at N {n}")
                    for n in self.experts
                    if variants[m][n] != best
                ]
        return configs

    def plan(self, rows: Rows) -> tuple[list[RunSpec], bool]:
        """Every run of the study as far as the rows decide it; where a choice is still open, a
        provisional one (the middle rate, the base variant) stands in, so the count and cost are
        estimates until phase B is done.

        Returns:
            (runs, whether every choice is made).
        """
        a = self.phase_a(rows)
        lrs = self.choose_lrs(rows)
        final = len(lrs) == len(self.methods)
        lrs_or = {m: lrs.get(m, self.lrs[len(self.lrs) // 2]) for m in self.methods}
        b = self.phase_b(lrs_or)
        chosen = self.choose_variants(rows, lrs) if final else {}
        sparse = [m for m in self.methods if parse_method(m)[0] in SPARSE]
        final = final and len(chosen) == len(sparse)
        gain = (
            self.gain_method(rows, lrs, chosen)
            if final
            else next((m for m in self.methods if parse_method(m)[0] == "mosa"), None)
        )
        for m in sparse:
            if m not in chosen:  # provisional: the base variant, and one more per other N for MoSA
                chosen[m] = {
                    None: self.base,
                    **{n: Variant(n, self.base.share, self.base.consistency) for n in self.experts},
                }
        c = self.phase_c(self.final_configs(lrs_or, chosen, gain))
        runs, seen = [], set()
        for r in (*a, *b, *c):
            if r.id not in seen:
                seen.add(r.id)
                runs.append(r)
        return runs, final
