"""The study's report, rebuilt from its rows: ``report.md`` (tables), ``summary.json`` (the same
numbers for machines), ``top1_vs_steps.png`` and ``gain_vs_experts.png``."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mosa_scale.study.grid import FinalConfig, Rows, StudyGrid
from mosa_scale.study.run import DENSE, SPARSE, RunSpec, parse_method

log = logging.getLogger(__name__)
PLOTS = ("top1_vs_steps.png", "gain_vs_experts.png")


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _pct(s: dict[str, Any] | None, signed: bool = False) -> str:
    if s is None:
        return "—"
    mean = f"{100 * s['mean']:+.2f}" if signed else f"{100 * s['mean']:.2f}"
    return mean if s["n"] == 1 else f"{mean} ± {100 * s['std']:.2f}"


def _lr(x: float) -> str:
    return f"{x:g}"


def _counterpart(method: str) -> str:
    """The dense method a sparse one is compared with: ``mosa-coast`` -> ``adapter``."""
    return SPARSE[parse_method(method)[0]]


def summarize(grid: StudyGrid, rows: Rows) -> dict[str, Any]:
    """Every number of the report, from the rows alone."""
    lrs = grid.choose_lrs(rows)
    lr_table = []
    for m in grid.methods:
        for lr in grid.lrs:
            v = grid.first_variant(m)
            per_task = {t: (rows.get(RunSpec(t, m, v, lr, grid.select_steps, grid.select_seed, "val").id) or {}).get("top1")
                        for t in grid.tasks}
            lr_table.append({"method": m, "variant": v.tag, "lr": lr, "val_top1": per_task,
                             "mean": grid.val_score(rows, m, v, lr), "chosen": lrs.get(m) == lr})
    chosen = grid.choose_variants(rows, lrs) if len(lrs) == len(grid.methods) else {}
    variant_table = []
    for m in grid.methods:
        if m not in lrs or parse_method(m)[0] not in SPARSE:
            continue
        for v in grid.variants(m):
            per_task = {t: (rows.get(RunSpec(t, m, v, lrs[m], grid.select_steps, grid.select_seed, "val").id)
                            or {}).get("top1") for t in grid.tasks}
            variant_table.append({"method": m, **asdict(v), "tag": v.tag, "lr": lrs[m], "val_top1": per_task,
                                  "mean": grid.val_score(rows, m, v, lrs[m]),
                                  "chosen": m in chosen and chosen[m][None] == v})
    sparse = [m for m in grid.methods if parse_method(m)[0] in SPARSE]
    configs = (grid.final_configs(lrs, chosen, grid.gain_method(rows, lrs, chosen))
               if len(chosen) == len(sparse) and len(lrs) == len(grid.methods) else [])
    final, by_seed = [], {}
    for c in configs:
        for t in grid.tasks:
            for steps in grid.final_steps:
                accs = {s: rows[r.id]["top1"] for s in grid.final_seeds
                        if (r := RunSpec(t, c.method, c.variant, c.lr, steps, s, "test")).id in rows}
                by_seed[(c.method, c.variant, t, steps)] = accs
                final.append({"method": c.method, "variant": c.variant.tag, "lr": c.lr, "role": c.role, "task": t,
                              "steps": steps, "seeds": sorted(accs),
                              **(_stats(list(accs.values())) if accs else {"mean": None, "std": None, "n": 0})})
    gains = []
    for c in configs:
        if c.variant.num_experts == 1:
            continue
        dense = _counterpart(c.method)
        if dense not in lrs:
            continue
        for t in grid.tasks:
            for steps in grid.final_steps:
                ours, base = by_seed.get((c.method, c.variant, t, steps), {}), by_seed.get((dense, DENSE, t, steps), {})
                paired = [ours[s] - base[s] for s in sorted(set(ours) & set(base))]  # same seed: same labelled set
                gains.append({"method": c.method, "variant": c.variant.tag, "num_experts": c.variant.num_experts,
                              "against": dense, "task": t, "steps": steps,
                              **(_stats(paired) if paired else {"mean": None, "std": None, "n": 0})})
    runs, complete = grid.plan(rows)
    done = [rows[r.id] for r in runs if r.id in rows]
    times = [r["time"] for r in done if "time" in r]
    return {"chosen_lr": lrs,
            "chosen_variant": {m: {"best" if n is None else f"N{n}": v.tag for n, v in d.items()} for m, d in chosen.items()},
            "final_configs": [{"method": c.method, "variant": c.variant.tag, "lr": c.lr, "role": c.role} for c in configs],
            "lr_table": lr_table, "variant_table": variant_table, "final": final, "gains": gains,
            "runs_done": len(done), "runs_planned": len(runs), "plan_final": complete,
            "compute_seconds": sum(r["seconds"] for r in done),
            "first_row_time": min(times, default=None), "last_row_time": max(times, default=None)}


def _markdown(grid: StudyGrid, settings: dict[str, Any], tower: dict[str, Any], s: dict[str, Any]) -> str:
    tasks = list(grid.tasks)
    state = "complete" if s["runs_done"] == s["runs_planned"] and s["plan_final"] else "in progress"
    planned = s["runs_planned"] if s["plan_final"] else f"about {s['runs_planned']}"
    out = ["# Transfer study: where MoSA wins", "",
           f"Status: {state}, {s['runs_done']} of {planned} runs done; compute {s['compute_seconds'] / 3600:.2f} h"
           + (f", wall {(s['last_row_time'] - s['first_row_time']) / 3600:.2f} h from the first to the last row"
              if s["first_row_time"] is not None else "") + ".", ""]
    if tower:
        out.append(f"Tower: HF ViT width 128, 6 blocks, patch 7, pretrained {tower['epochs']} epochs on "
                   f"{tower['samples']} Fashion-MNIST images of classes 0-4 (test top-1 "
                   f"{100 * tower['test_top1_classes_0-4']:.2f}%).")
    out += [f"Recipe: r {settings['bottleneck']}, AdamW (eps 1e-6, wd {settings['weight_decay']}), batch "
           f"{settings['batch']}, 10% warm-up then cosine; {settings['labelled']} labels per task and seed; "
           f"choices on a validation split of {settings['val_fraction']:.0%} of them (seed {grid.select_seed}, "
           f"{grid.select_steps} steps), jointly over the tasks (mean validation top-1); final runs train on all "
           f"labels and read the test split once; seeds {', '.join(map(str, grid.final_seeds))}.", ""]
    out += ["## Final results (test top-1 %, mean ± std over seeds)", ""]
    for t in [*tasks, "mean over tasks"] if len(tasks) > 1 else tasks:
        out += [f"### {t}", "", "| method | variant | lr | role | " + " | ".join(f"{n} steps" for n in grid.final_steps) + " |",
                "|---|---|---|---|" + "---|" * len(grid.final_steps)]
        for c in s["final_configs"]:
            cells = []
            for steps in grid.final_steps:
                if t == "mean over tasks":  # mean over tasks of the per-task means; complete seeds only
                    per = [f for f in s["final"] if (f["method"], f["variant"], f["steps"]) == (c["method"], c["variant"], steps)]
                    ok = all(f["n"] == len(grid.final_seeds) for f in per) and len(per) == len(tasks)
                    cells.append(f"{100 * statistics.fmean(f['mean'] for f in per):.2f}" if ok else "—")
                else:
                    f = next(f for f in s["final"] if (f["method"], f["variant"], f["task"], f["steps"])
                             == (c["method"], c["variant"], t, steps))
                    cells.append(_pct(f if f["n"] else None) + ("" if f["n"] in (0, len(grid.final_seeds)) else f" (n {f['n']})"))
            out.append(f"| {c['method']} | {c['variant']} | {_lr(c['lr'])} | {c['role']} | " + " | ".join(cells) + " |")
        out.append("")
    if s["gains"]:
        out += ["## Sparse against dense (test top-1 points, paired by seed)", "",
                "| method | variant | against | task | " + " | ".join(f"{n} steps" for n in grid.final_steps) + " |",
                "|---|---|---|---|" + "---|" * len(grid.final_steps)]
        keys = list(dict.fromkeys((g["method"], g["variant"], g["against"], g["task"]) for g in s["gains"]))
        for k in keys:
            cells = [_pct(g if g["n"] else None, signed=True) for steps in grid.final_steps for g in s["gains"]
                     if (g["method"], g["variant"], g["against"], g["task"], g["steps"]) == (*k, steps)]
            out.append("| " + " | ".join(k) + " | " + " | ".join(cells) + " |")
        out.append("")
    if s["final_configs"]:
        out += ["![top-1 against steps](top1_vs_steps.png)", ""]
    if any(g["n"] for g in s["gains"]):
        out += ["![gain over the dense adapter against N](gain_vs_experts.png)", ""]
    out += [f"## Phase A: learning rate (validation top-1 %, {grid.select_steps} steps, seed {grid.select_seed})", "",
            "| method | variant | lr | " + " | ".join(tasks) + " | mean | chosen |", "|---|---|---|" + "---|" * (len(tasks) + 2)]
    for r in s["lr_table"]:
        vals = [("—" if r["val_top1"][t] is None else f"{100 * r['val_top1'][t]:.2f}") for t in tasks]
        mean = "—" if r["mean"] is None else f"{100 * r['mean']:.2f}"
        out.append(f"| {r['method']} | {r['variant']} | {_lr(r['lr'])} | " + " | ".join(vals) + f" | {mean} | {'**yes**' if r['chosen'] else ''} |")
    out.append("")
    if s["variant_table"]:
        out += [f"## Phase B: variant screen (validation top-1 %, at each method's chosen lr)", "",
                "| method | N | share | consistency | lr | " + " | ".join(tasks) + " | mean | chosen |",
                "|---|---|---|---|---|" + "---|" * (len(tasks) + 2)]
        for r in s["variant_table"]:
            vals = [("—" if r["val_top1"][t] is None else f"{100 * r['val_top1'][t]:.2f}") for t in tasks]
            mean = "—" if r["mean"] is None else f"{100 * r['mean']:.2f}"
            out.append(f"| {r['method']} | {r['num_experts']} | {r['share']} | {'on' if r['consistency'] else 'off'} | "
                       f"{_lr(r['lr'])} | " + " | ".join(vals) + f" | {mean} | {'**yes**' if r['chosen'] else ''} |")
        out.append("")
    return "\n".join(out)


def _plot(grid: StudyGrid, s: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = list(grid.tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for c in s["final_configs"]:
            pts = [f for f in s["final"] if (f["method"], f["variant"], f["task"]) == (c["method"], c["variant"], t) and f["n"]]
            if pts:
                label = c["method"] + ("" if c["variant"] == "dense" else f" {c['variant']}")
                ax.errorbar([f["steps"] for f in pts], [100 * f["mean"] for f in pts], yerr=[100 * f["std"] for f in pts],
                            marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xticks(list(grid.final_steps), [str(n) for n in grid.final_steps])
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[0], dpi=110)
    plt.close(fig)
    written.append(out_dir / PLOTS[0])
    if not any(g["n"] for g in s["gains"]):
        return written  # no sparse method has a dense counterpart's result yet

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    styles = dict(zip(grid.final_steps, ("-", "--", ":", "-.")))
    for ax, t in zip(axes[0], tasks):
        for m in grid.methods:
            if parse_method(m)[0] != "mosa":
                continue
            for steps in grid.final_steps:
                pts = sorted((g["num_experts"], g) for g in s["gains"]
                             if (g["method"], g["task"], g["steps"]) == (m, t, steps) and g["n"])
                best = dict(pts)  # one final configuration per N (the best variant at that N)
                if best:
                    xs = [1, *sorted(best)]
                    ax.errorbar(xs, [0.0, *(100 * best[n]["mean"] for n in sorted(best))],
                                yerr=[0.0, *(100 * best[n]["std"] for n in sorted(best))], marker="o", capsize=3,
                                linestyle=styles.get(steps, "-"), label=f"{m}, {steps} steps")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("experts N (1 = dense adapter)")
        ax.set_ylabel("test top-1 gain over the dense adapter (points)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[1], dpi=110)
    plt.close(fig)
    written.append(out_dir / PLOTS[1])
    return written


def write_report(out_dir: Path, grid: StudyGrid, settings: dict[str, Any], tower: dict[str, Any], rows: Rows, *,
                 plots: bool = True) -> list[Path]:
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


__all__ = ["FinalConfig", "PLOTS", "summarize", "write_report"]
