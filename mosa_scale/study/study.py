"""The resumable transfer study: one output folder, one command.

Layout of ``out_dir``:

* ``study.json``: the settings every result depends on (fixed for the folder), the grid last run
  and the pretraining record,
* ``tower/``: the pretrained ViT (``save_pretrained``), trained once and reused,
* ``rows.jsonl``: one JSON row per finished run, appended and flushed as it finishes,
* ``report.md``, ``summary.json``, ``top1_vs_steps.png``, ``gain_vs_experts.png``.

Rerunning the same command skips every run whose id has a row and continues with the rest; a
killed study loses at most the run in progress. The grid may grow between invocations (rows are
found by id); the settings may not.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mosa_scale.study.grid import StudyGrid
from mosa_scale.study.report import write_report
from mosa_scale.study.rows import RowStore
from mosa_scale.study.run import RunSpec, Variant, train_and_evaluate
from mosa_scale.study.tasks import Split, Task, load_tasks
from mosa_scale.study.tower import ensure_tower

log = logging.getLogger(__name__)
STUDY_FILE = "study.json"


class StudyError(ValueError):
    """An output folder that cannot hold this study (the message says why and what to do)."""


@dataclass(frozen=True)
class StudySettings:
    """What every run's result depends on besides its own id; fixed for an output folder."""

    batch: int = 64
    bottleneck: int = 16
    weight_decay: float = 0.01
    labelled: int = 1000
    val_fraction: float = 0.2
    pretrain_epochs: int = 5
    pretrain_samples: int | None = None
    pretrain_seed: int = 0


def _duration(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _cost(row: dict[str, Any]) -> float:
    return RunSpec(
        row["task"],
        row["method"],
        Variant(row["num_experts"], row["share"], row["consistency"]),
        row["lr"],
        row["steps"],
        row["seed"],
        row["eval"],
    ).cost


class Study:
    """Runs the phases of ``grid`` in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | Path, grid: StudyGrid, settings: StudySettings) -> None:
        self.out = Path(out_dir)
        self.grid, self.settings = grid, settings
        self.out.mkdir(parents=True, exist_ok=True)
        meta = self.out / STUDY_FILE
        self.meta: dict[str, Any] = json.loads(meta.read_text()) if meta.is_file() else {}
        old = self.meta.get("settings")
        if old is not None and old != asdict(settings):
            diff = ", ".join(
                f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in asdict(settings).items() if old.get(k) != v
            )
            raise StudyError(
                f"{self.out} holds a study with other settings ({diff}); its rows would not be "
                "comparable: pass the same settings, or use a new --out-dir"
            )
        self.meta.update(settings=asdict(settings), grid=grid.to_dict())
        self._write_meta()
        self.rows = RowStore(self.out / "rows.jsonl")
        self.tasks: dict[str, Task] = {}
        self._splits: dict[tuple[str, int, str], tuple[Split, Split]] = {}
        self._started = time.time()

    def _write_meta(self) -> None:
        tmp = self.out / f".{STUDY_FILE}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.out / STUDY_FILE)

    # ------------------------------------------------------------------ running
    def run(self) -> list[Path]:
        """Runs every unfinished run, phase by phase; returns the report files."""
        s = self.settings
        pre_train, pre_test, self.tasks = load_tasks(
            self.grid.tasks, labelled=s.labelled, val_fraction=s.val_fraction, pretrain_samples=s.pretrain_samples
        )
        self.meta["tower"] = ensure_tower(
            self.out / "tower", pre_train, pre_test, epochs=s.pretrain_epochs, seed=s.pretrain_seed
        )
        self._write_meta()
        runs, _ = self.grid.plan(self.rows.rows)
        log.info(
            "study in %s: %d of about %d runs already done", self.out, sum(r.id in self.rows for r in runs), len(runs)
        )
        g = self.grid
        runs = g.phase_a(self.rows.rows)
        while True:
            self._execute(runs, "A")
            runs = g.phase_a(self.rows.rows)  # a rate added where the best one sat at the grid's edge
            if all(r.id in self.rows for r in runs):
                break
        lrs = g.choose_lrs(self.rows.rows)
        log.info("phase A chose the learning rates %s", ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()))
        self._execute(g.phase_b(lrs), "B")
        variants = g.choose_variants(self.rows.rows, lrs)
        configs = g.final_configs(lrs, variants, g.gain_method(self.rows.rows, lrs, variants))
        log.info(
            "phase B chose the final configurations: %s", "; ".join(f"{c.name} lr {c.lr:g} ({c.role})" for c in configs)
        )
        self._execute(g.phase_c(configs), "C")
        files = self.report()
        log.info("study complete: %d runs; report in %s", len(self.rows), files[0])
        return files

    def report(self, plots: bool = True) -> list[Path]:
        return write_report(
            self.out, self.grid, asdict(self.settings), self.meta.get("tower", {}), self.rows.rows, plots=plots
        )

    def _split(self, run: RunSpec) -> tuple[Split, Split]:
        key = (run.task, run.seed, run.eval)
        if key not in self._splits:
            task = self.tasks[run.task]
            self._splits[key] = task.selection_split(run.seed) if run.eval == "val" else task.final_split(run.seed)
        return self._splits[key]

    def _execute(self, runs: list[RunSpec], phase: str) -> None:
        todo = [r for r in runs if r.id not in self.rows]
        log.info("phase %s: %d runs, %d already done", phase, len(runs), len(runs) - len(todo))
        s = self.settings
        for run in todo:
            train, evaluate = self._split(run)
            result = train_and_evaluate(
                run,
                self.out / "tower",
                train,
                evaluate,
                batch=s.batch,
                bottleneck=s.bottleneck,
                weight_decay=s.weight_decay,
            )
            self.rows.append({**run.labels(), **result, "time": time.time()})
            self._progress(run, result)
            self.report(plots=False)  # the tables stay current; plots at the end of each phase
        if todo:
            self.report()

    def _progress(self, run: RunSpec, result: dict[str, Any]) -> None:
        planned, final = self.grid.plan(self.rows.rows)
        left = [r for r in planned if r.id not in self.rows]
        done = self.rows.values()
        per_unit = sum(r["seconds"] for r in done) / max(1e-9, sum(_cost(r) for r in done))
        eta = per_unit * sum(r.cost for r in left)
        finish = datetime.datetime.fromtimestamp(time.time() + eta).strftime("%a %H:%M")
        log.info(
            "[%d/%s] %s %s %s %s lr %g, %d steps, seed %d: %s top-1 %.2f%% (%.0f s); %d left, ETA %s (%s)%s",
            len(planned) - len(left),
            len(planned) if final else f"~{len(planned)}",
            run.phase,
            run.task,
            run.method,
            run.variant.tag,
            run.lr,
            run.steps,
            run.seed,
            run.eval,
            100 * result["top1"],
            result["seconds"],
            len(left),
            _duration(eta),
            finish,
            "" if final else " (estimated before all choices)",
        )


def report_only(out_dir: str | Path) -> list[Path]:
    """Rebuilds the report of the study in ``out_dir`` from its rows and ``study.json``.

    Raises:
        StudyError: ``out_dir`` holds no study.
    """
    out = Path(out_dir)
    meta_file = out / STUDY_FILE
    if not meta_file.is_file():
        raise StudyError(f"{meta_file} does not exist: run the study into {out} first")
    meta = json.loads(meta_file.read_text())
    rows = RowStore(out / "rows.jsonl")
    return write_report(out, StudyGrid.from_dict(meta["grid"]), meta["settings"], meta.get("tower", {}), rows.rows)
