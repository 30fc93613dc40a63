"""The study's report, rebuilt from its rows: ``report.md`` (tables), ``summary.json`` (the same
numbers for machines), ``top1_vs_steps.png`` and ``gain_vs_experts.png``."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mosa_scale.study.grid import Rows, StudyGrid
from mosa_scale.study.run import DENSE, SPARSE, RunSpec, Variant, parse_method

log = logging.getLogger(__name__)
PLOTS = ("top1_vs_steps.png", "gain_vs_experts.png")
NONE = {"mean": None, "std": None, "n": 0}


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return dict(NONE)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _pct(s: dict[str, Any], signed: bool = False) -> str:
    """``mean ± std`` in percent (points when ``signed``); a dash without values."""
    if not s["n"]:
        return "—"
    mean = f"{100 * s['mean']:+.2f}" if signed else f"{100 * s['mean']:.2f}"
    return mean if s["n"] == 1 else f"{mean} ± {100 * s['std']:.2f}"


def _val(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def _val_top1(grid: StudyGrid, rows: Rows, method: str, variant: Variant, lr: float) -> dict[str, float | None]:
    ids = {t: RunSpec(t, method, variant, lr, grid.select_steps, grid.select_seed, "val").id for t in grid.tasks}
    return {t: rows[i]["top1"] if i in rows else None for t, i in ids.items()}


def summarize(grid: StudyGrid, rows: Rows) -> dict[str, Any]:
    """Every number of the report, from the rows alone (a study in progress gives partial tables)."""
    lrs = grid.choose_lrs(rows)
    lr_table = [
        {
            "method": m,
            "variant": grid.first_variant(m).tag,
            "lr": lr,
            "val_top1": _val_top1(grid, rows, m, grid.first_variant(m), lr),
            "mean": grid.val_score(rows, m, grid.first_variant(m), lr),
            "chosen": lrs.get(m) == lr,
        }
        for m in grid.methods
        for lr in grid.method_lrs(rows, m)
    ]
    chosen = grid.choose_variants(rows, lrs) if len(lrs) == len(grid.methods) else {}
    sparse = [m for m in grid.methods if parse_method(m)[0] in SPARSE]
    variant_table = [
        {
            "method": m,
            **asdict(v),
            "tag": v.tag,
            "lr": lrs[m],
            "val_top1": _val_top1(grid, rows, m, v, lrs[m]),
            "mean": grid.val_score(rows, m, v, lrs[m]),
            "chosen": m in chosen and chosen[m][None] == v,
        }
        for m in sparse
        if m in lrs
        for v in grid.variants(m)
    ]
    configs = (
        grid.final_configs(lrs, chosen, grid.gain_method(rows, lrs, chosen))
        if len(chosen) == len(sparse) and len(lrs) == len(grid.methods)
        else []
    )
    final, by_seed = [], {}
    for c in configs:
        for t in grid.tasks:
            for steps in grid.final_steps:
                ids = {s: RunSpec(t, c.method, c.variant, c.lr, steps, s, "test").id for s in grid.final_seeds}
                accs = {s: rows[i]["top1"] for s, i in ids.items() if i in rows}
                by_seed[(c.method, c.variant, t, steps)] = accs
                final.append(
                    {
                        "method": c.method,
                        "variant": c.variant.tag,
                        "lr": c.lr,
                        "role": c.role,
                        "task": t,
                        "steps": steps,
                        "seeds": sorted(accs),
                        **_stats(list(accs.values())),
                    }
                )
    gains = []
    for c in configs:
        dense = SPARSE.get(parse_method(c.method)[0])  # the dense method a sparse one is measured against
        if dense is None or dense not in lrs:
            continue
        for t in grid.tasks:
            for steps in grid.final_steps:
                ours, base = by_seed[(c.method, c.variant, t, steps)], by_seed.get((dense, DENSE, t, steps), {})
                paired = [ours[s] - base[s] for s in sorted(set(ours) & set(base))]  # same seed: same labels
                gains.append(
                    {
                        "method": c.method,
                        "variant": c.variant.tag,
                        "num_experts": c.variant.num_experts,
                        "against": dense,
                        "task": t,
                        "steps": steps,
                        **_stats(paired),
                    }
                )
    runs, complete = grid.plan(rows)
    done = [rows[r.id] for r in runs if r.id in rows]
    times = [r["time"] for r in done if "time" in r]
    return {
        "chosen_lr": lrs,
        "chosen_variant": {
            m: {"best" if n is None else f"N{n}": v.tag for n, v in d.items()} for m, d in chosen.items()
        },
        "final_configs": [{"method": c.method, "variant": c.variant.tag, "lr": c.lr, "role": c.role} for c in configs],
        "lr_table": lr_table,
        "variant_table": variant_table,
        "final": final,
        "gains": gains,
        "runs_done": len(done),
        "runs_planned": len(runs),
        "plan_final": complete,
        "compute_seconds": sum(r["seconds"] for r in done),
        "first_row_time": min(times, default=None),
        "last_row_time": max(times, default=None),
    }


def _markdown(grid: StudyGrid, settings: dict[str, Any], tower: dict[str, Any], s: dict[str, Any]) -> str:
    tasks, schedules = list(grid.tasks), [f"{n} steps" for n in grid.final_steps]
    state = "complete" if s["runs_done"] == s["runs_planned"] and s["plan_final"] else "in progress"
    planned = s["runs_planned"] if s["plan_final"] else f"about {s['runs_planned']}"
    wall = (
        f", wall {(s['last_row_time'] - s['first_row_time']) / 3600:.2f} h from the first to the last row"
        if s["first_row_time"] is not None
        else ""
    )
    out = [
        "# Transfer study: where MoSA wins",
        "",
        f"Status: {state}, {s['runs_done']} of {planned} runs done; compute {s['compute_seconds'] / 3600:.2f} h{wall}.",
        "",
    ]
    if tower:
        out.append(
            f"Tower: HF ViT width 128, 6 blocks, patch 7, pretrained {tower['epochs']} epochs on "
            f"{tower['samples']} Fashion-MNIST images of classes 0-4 (test top-1 "
            f"{100 * tower['test_top1_classes_0-4']:.2f}%)."
        )
    out += [
        f"Recipe: r {settings['bottleneck']}, AdamW (eps 1e-6, wd {settings['weight_decay']}), batch "
        f"{settings['batch']}, 10% warm-up then cosine; {settings['labelled']} labels per task and seed; "
        f"choices on a validation split of {settings['val_fraction']:.0%} of them (seed {grid.select_seed}, "
        f"{grid.select_steps} steps), jointly over the tasks (mean validation top-1); final runs train on all "
        f"labels and read the test split once; seeds {', '.join(map(str, grid.final_seeds))}.",
        "",
    ]
    longer = [n for n in grid.final_steps if n > grid.select_steps]
    if grid.long_methods and longer:
        out += [
            f"Pruned: {', '.join(map(str, longer))} steps only for {', '.join(grid.long_methods)} "
            "(a dash where a method was not run).",
            "",
        ]
    out += [
        "## Final results (test top-1 %, mean ± std over seeds)",
        "",
    ]
    if not s["final_configs"]:
        out += ["None yet: the final configurations are known once phases A and B are done.", ""]
    seeds = len(grid.final_seeds)
    for t in ([*tasks, "mean over tasks"] if len(tasks) > 1 else tasks) if s["final_configs"] else []:
        lines = []
        for c in s["final_configs"]:
            cells = []
            for steps in grid.final_steps:
                per = [
                    f
                    for f in s["final"]
                    if (f["method"], f["variant"], f["steps"]) == (c["method"], c["variant"], steps)
                ]
                if t == "mean over tasks":  # of the per-task means, once every seed of every task is in
                    whole = all(f["n"] == seeds for f in per)
                    cells.append(f"{100 * statistics.fmean(f['mean'] for f in per):.2f}" if whole else "—")
                else:
                    f = next(f for f in per if f["task"] == t)
                    cells.append(_pct(f) + ("" if f["n"] in (0, seeds) else f" (n {f['n']})"))
            lines.append([c["method"], c["variant"], f"{c['lr']:g}", c["role"], *cells])
        out += [f"### {t}", "", *_table(["method", "variant", "lr", "role", *schedules], lines)]
    if s["gains"]:
        keys = list(dict.fromkeys((g["method"], g["variant"], g["against"], g["task"]) for g in s["gains"]))
        lines = [
            [
                *k,
                *(
                    _pct(g, signed=True)
                    for g in s["gains"]
                    if (g["method"], g["variant"], g["against"], g["task"]) == k
                ),
            ]
            for k in keys
        ]
        out += [
            "## Sparse against dense (test top-1 points, paired by seed)",
            "",
            *_table(["method", "variant", "against", "task", *schedules], lines),
        ]
    if s["final_configs"]:
        out += ["![top-1 against steps](top1_vs_steps.png)", ""]
    if any(g["n"] for g in s["gains"]):
        out += ["![gain over the dense adapter against N](gain_vs_experts.png)", ""]
    yes = lambda r: "**yes**" if r["chosen"] else ""  # noqa: E731
    out += [
        f"## Phase A: learning rate (validation top-1 %, {grid.select_steps} steps, seed {grid.select_seed})",
        "",
        *_table(
            ["method", "variant", "lr", *tasks, "mean", "chosen"],
            [
                [
                    r["method"],
                    r["variant"],
                    f"{r['lr']:g}",
                    *(_val(r["val_top1"][t]) for t in tasks),
                    _val(r["mean"]),
                    yes(r),
                ]
                for r in s["lr_table"]
            ],
        ),
    ]
    if s["variant_table"]:
        out += [
            "## Phase B: variant screen (validation top-1 %, at each method's chosen lr)",
            "",
            *_table(
                ["method", "N", "share", "consistency", "lr", *tasks, "mean", "chosen"],
                [
                    [
                        r["method"],
                        str(r["num_experts"]),
                        r["share"],
                        "on" if r["consistency"] else "off",
                        f"{r['lr']:g}",
                        *(_val(r["val_top1"][t]) for t in tasks),
                        _val(r["mean"]),
                        yes(r),
                    ]
                    for r in s["variant_table"]
                ],
            ),
        ]
    return "\n".join(out)


def _plot(grid: StudyGrid, s: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(grid.tasks)

    def figure(name: str, draw) -> Path:
        fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            draw(ax, t)
            ax.set_title(t)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        return out_dir / name

    def top1(ax, t: str) -> None:
        for c in s["final_configs"]:
            pts = [
                f
                for f in s["final"]
                if (f["method"], f["variant"], f["task"]) == (c["method"], c["variant"], t) and f["n"]
            ]
            if pts:
                ax.errorbar(
                    [f["steps"] for f in pts],
                    [100 * f["mean"] for f in pts],
                    yerr=[100 * f["std"] for f in pts],
                    marker="o",
                    capsize=3,
                    label=c["method"] + ("" if c["variant"] == "dense" else f" {c['variant']}"),
                )
        ax.set_xscale("log")
        ax.set_xticks(list(grid.final_steps), [str(n) for n in grid.final_steps])
        ax.set_xticks([], minor=True)  # a log axis labels its minor ticks too
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("test top-1 (%)")

    def gain(ax, t: str) -> None:
        styles = dict(zip(grid.final_steps, ("-", "--", ":", "-.")))
        for m in (m for m in grid.methods if parse_method(m)[0] == "mosa"):
            for steps in grid.final_steps:
                # one final configuration per N (the best variant at that N); N 1 is the adapter itself
                best = {
                    g["num_experts"]: g
                    for g in s["gains"]
                    if (g["method"], g["task"], g["steps"]) == (m, t, steps) and g["n"]
                }
                if best:
                    ns = sorted(best)
                    ax.errorbar(
                        [1, *ns],
                        [0.0, *(100 * best[n]["mean"] for n in ns)],
                        yerr=[0.0, *(100 * best[n]["std"] for n in ns)],
                        marker="o",
                        capsize=3,
                        linestyle=styles.get(steps, "-"),
                        label=f"{m}, {steps} steps",
                    )
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks([1, *grid.experts])
        ax.set_xlabel("experts N (1 = dense adapter)")
        ax.set_ylabel("test top-1 gain over the dense adapter (points)")

    written = [figure(PLOTS[0], top1)]
    if any(g["n"] for g in s["gains"]):  # else no sparse method has its dense counterpart's result yet
        written.append(figure(PLOTS[1], gain))
    return written


def write_report(
    out_dir: Path, grid: StudyGrid, settings: dict[str, Any], tower: dict[str, Any], rows: Rows, *, plots: bool = True
) -> list[Path]:
    """Writes ``report.md`` and ``summary.json`` (and, with ``plots``, the PNGs) into ``out_dir``.

    Returns:
        The files written. Without matplotlib the plots are skipped with a warning.
    """
    s = summarize(grid, rows)
    written = [out_dir / "report.md", out_dir / "summary.json"]
    written[0].write_text(_markdown(grid, settings, tower, s))
    written[1].write_text(json.dumps({**s, "grid": grid.to_dict(), "settings": settings, "tower": tower}, indent=1))
    if plots and s["final_configs"]:
        try:
            written += _plot(grid, s, out_dir)
        except ImportError:
            log.warning("matplotlib is not installed (pip install -e '.[test]'): plots skipped")
    return written
