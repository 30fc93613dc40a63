"""Scaling sweeps: a declarative grid of training runs, launched and resumed, collected into one
CSV and plotted."""

from __future__ import annotations

from pathlib import Path

from mosa_scale.sweep.collect import collect, read_csv, tb_scalars, write_csv
from mosa_scale.sweep.launch import SweepRunner, is_done
from mosa_scale.sweep.plots import plot_sweep
from mosa_scale.sweep.spec import RunSpec, SweepSpec, check_runs, load_sweep, parse_sweep, run_name

__all__ = [
    "RunSpec",
    "SweepRunner",
    "SweepSpec",
    "check_runs",
    "collect",
    "is_done",
    "load_sweep",
    "parse_sweep",
    "plot_sweep",
    "read_csv",
    "report",
    "run_name",
    "tb_scalars",
    "write_csv",
]


def report(spec: SweepSpec) -> tuple[Path, list[Path]]:
    """Collects ``spec``'s runs into ``results.csv`` and draws the plots, all in ``out_dir``."""
    axes = [a.name for a in spec.axes]
    rows = collect(spec.out_dir)
    csv_path = write_csv(rows, spec.out_dir / "results.csv", axes)
    return csv_path, plot_sweep(rows, spec.out_dir, axes=axes, x=spec.plot_x, average=list(spec.plot_average))
