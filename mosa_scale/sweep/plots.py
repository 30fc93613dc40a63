"""PNG plots of a collected sweep (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

PLOTS = (
    ("samples_per_s_per_gpu", "samples / s per GPU", "throughput.png"),
    ("peak_memory_mb", "peak memory (MB, rank 0)", "memory.png"),
)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _series(rows: list[dict[str, Any]], axes: list[str], x: str, average: list[str]) -> dict[str, list]:
    """Rows grouped by the axes other than ``x`` and the averaged ones: label -> [(x label, row)]."""
    keys = [a for a in axes if a != x and a not in average]
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        label = " ".join(f"{k}={r.get(k)}" for k in keys) or "all"
        groups[label].append((r.get(x), r))
    return groups


def _mean(rows: list[dict[str, Any]], col: str) -> float | None:
    vals = [v for v in (_num(r.get(col)) for r in rows) if v is not None]
    return statistics.fmean(vals) if vals else None


def plot_sweep(
    rows: list[dict[str, Any]], out_dir: str | Path, *, axes: list[str], x: str, average: list[str] = ()
) -> list[Path]:
    """Draws ``throughput.png``, ``memory.png`` (against the ``x`` axis, one line per other
    setting, averaged over ``average`` axes) and ``accuracy_vs_params.png`` (top-1 against
    trainable parameters, log scale). Rows without the metric are left out.

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_labels = list(dict.fromkeys(r.get(x) for r in rows))
    groups = _series(rows, axes, x, list(average))
    written = []
    for col, ylabel, fname in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, items in groups.items():
            by_x: dict[Any, list] = defaultdict(list)
            for xv, r in items:
                by_x[xv].append(r)
            pts = [(x_labels.index(xv), _mean(rs, col)) for xv, rs in by_x.items()]
            pts = sorted((i, v) for i, v in pts if v is not None)
            if pts:
                ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", label=label)
        ax.set_xticks(range(len(x_labels)), [str(v) for v in x_labels])
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = _series(rows, axes, x="", average=[x, *average])  # one series per setting, all x values
    for label, items in series.items():
        pts = [(_num(r.get("trainable_params")), _num(r.get("top1"))) for _, r in items]
        pts = [(p, a) for p, a in pts if p is not None and a is not None]
        if pts:
            ax.scatter([p for p, _ in pts], [a for _, a in pts], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("top-1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png", dpi=120)
    plt.close(fig)
    written.append(out / "accuracy_vs_params.png")
    return written
