"""One tidy CSV row per run: grid labels, the resolved config, evaluations, TensorBoard scalars,
the adapter manifest, and sizes / FLOPs counted on a meta-device copy of the model."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from mosa_scale.backbones import count_parameters
from mosa_scale.config.errors import ConfigError
from mosa_scale.config.run import REPO_ROOT, load_run_config
from mosa_scale.model.assembly import build_model
from mosa_scale.model.flops import step_flops
from mosa_scale.sparse import Router
from mosa_scale.sweep.launch import is_done

log = logging.getLogger(__name__)

FIRST_COLUMNS = ("run", "status")
METRIC_COLUMNS = (
    "family",
    "backbone",
    "width",
    "blocks",
    "backbone_params",
    "method",
    "num_experts",
    "bottleneck",
    "share",
    "zero_stage",
    "precision",
    "seed",
    "ranks",
    "global_batch",
    "steps",
    "consistency",
    "step",
    "top1",
    "best_top1",
    "samples_per_s",
    "samples_per_s_per_gpu",
    "step_time_s",
    "peak_memory_mb",
    "trainable_params",
    "adapter_params",
    "flops_per_sample",
    "tflops_per_s_per_gpu",
    "mfu",
)


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard folder (all event files, no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _steady(series: list[tuple[int, float]]) -> list[float]:
    """Values after the first logged step (compilation, allocation and cache warm-up)."""
    values = [v for _, v in sorted(series)]
    return values[1:] if len(values) > 1 else values


def _zero_stage(path: str) -> int | None:
    p = Path(path)
    p = p if p.is_file() else REPO_ROOT / p
    if not p.is_file():
        return None
    return int(json.loads(p.read_text()).get("zero_optimization", {}).get("stage", 0))


def model_counts(cfg: Any, num_classes: int, image_size: int | None = None) -> dict[str, float]:
    """Frozen / trainable parameters and FLOPs of a run's model, built on the meta device."""
    model, backbone, _ = build_model(cfg, Router(cfg.train.seed), num_classes=num_classes, meta=True)
    flops = step_flops(
        model,
        backbone,
        image_size=image_size or backbone.image.size,
        global_batch=cfg.train.global_batch,
        consistency=cfg.consistency.enabled,
    )
    frozen = sum(int(p.numel()) for p in backbone.model.parameters() if not p.requires_grad)
    return {
        "backbone_params": frozen,
        "trainable_params": flops["trainable_params"],
        "width": backbone.width,
        "blocks": len(backbone.sites),
        "flops_per_sample": flops["per_sample"],
        "flops_per_step": flops["per_step"],
        "total_params": count_parameters(model),
    }


def collect_run(run_dir: Path, ranks: int) -> dict[str, Any]:
    """The metrics of one finished (or partial) run directory."""
    row: dict[str, Any] = {"ranks": ranks}
    if (run_dir / "config.yaml").is_file():
        cfg = load_run_config(run_dir / "config.yaml", world_size=ranks, check_files=False)
        m = cfg.model
        row.update(
            family=m.family,
            backbone=m.name if m.family == "openclip" else m.family,
            method=cfg.adapter.method,
            num_experts=cfg.adapter.num_experts,
            bottleneck=getattr(cfg.adapter, "bottleneck", None),  # a field of the built-in methods
            share=cfg.adapter.share,
            zero_stage=_zero_stage(cfg.train.zero_config),
            precision=cfg.train.precision,
            seed=cfg.train.seed,
            global_batch=cfg.train.global_batch,
            steps=cfg.train.steps,
            consistency=cfg.consistency.enabled,
        )
    else:
        cfg = None
    if (run_dir / "metrics.jsonl").is_file():
        evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if evals:
            row.update(step=evals[-1]["step"], top1=evals[-1]["top1"], best_top1=max(e["top1"] for e in evals))
    manifest_file = run_dir / "adapter" / "adapter_config.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    if manifest is not None:
        shapes = [t["shape"] for t in manifest.get("tensors", {}).values()]
        row["adapter_params"] = sum(_prod(s) for s in shapes)
    scalars = tb_scalars(run_dir / "tb")
    if "throughput/samples_per_s" in scalars:
        sps = statistics.fmean(_steady(scalars["throughput/samples_per_s"]))
        row.update(samples_per_s=sps, samples_per_s_per_gpu=sps / ranks)
    if "time/step_s" in scalars:
        row["step_time_s"] = statistics.median(_steady(scalars["time/step_s"]))
    if "memory/peak_mb" in scalars:
        row["peak_memory_mb"] = max(v for _, v in scalars["memory/peak_mb"])
    for tag, col in (("perf/tflops_per_s_per_gpu", "tflops_per_s_per_gpu"), ("perf/mfu", "mfu")):
        if tag in scalars:  # logged by the trainer once it is wired to mosa_scale.model.flops
            row[col] = statistics.fmean(_steady(scalars[tag]))
    if cfg is not None and manifest is not None:
        try:
            counts = model_counts(cfg, int(manifest["num_classes"]), cfg.data.image_size)
        except (ValueError, RuntimeError, OSError, ImportError) as e:
            log.warning("%s: could not build the model on the meta device (%s); sizes left empty", run_dir, e)
        else:
            row.update(
                {k: counts[k] for k in ("backbone_params", "trainable_params", "width", "blocks", "flops_per_sample")}
            )
            if "tflops_per_s_per_gpu" not in row and "step_time_s" in row:
                row["tflops_per_s_per_gpu"] = counts["flops_per_step"] / row["step_time_s"] / ranks / 1e12
    return row


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def collect(out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per grid point of the sweep in ``out_dir`` (from its ``sweep.json``).

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``sweep.json`` (the sweep never started).
    """
    out = Path(out_dir)
    grid_file = out / "sweep.json"
    if not grid_file.is_file():
        raise FileNotFoundError(f"{grid_file} does not exist: run the sweep first")
    grid = json.loads(grid_file.read_text())
    state = json.loads((out / "state.json").read_text())["runs"] if (out / "state.json").is_file() else {}
    rows = []
    for run in grid["runs"]:
        run_dir = Path(run["run_dir"])
        status = "done" if is_done(run_dir) else state.get(run["name"], "pending")
        try:
            metrics = collect_run(run_dir, int(grid["ranks"]))
        except ConfigError as e:
            log.warning("%s: config.yaml does not load (%s)", run_dir, e)
            metrics = {}
        rows.append({"run": run["name"], "status": status, **metrics, **run["labels"]})  # labels name the point
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path, axes: list[str] | None = None) -> Path:
    """Writes ``rows`` with a fixed column order: run, status, the axes, then the metrics."""
    axes = axes or []
    extra = sorted({k for r in rows for k in r} - set(FIRST_COLUMNS) - set(axes) - set(METRIC_COLUMNS))
    columns = list(dict.fromkeys([*FIRST_COLUMNS, *axes, *METRIC_COLUMNS, *extra]))  # an axis may be a metric
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in columns})
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
