"""Sweep files: a declarative grid of training runs, expanded into named runs with overrides.

A sweep YAML::

    config: launchers/configs/digits_default.yaml   # base run config
    out_dir: runs/sweeps/tiny_grid                   # run dirs, logs, CSV and plots go here
    ranks: 2                                         # deepspeed --num_gpus for local launches
    set: {train.steps: 12}                           # dotted overrides for every run
    axes:                                            # every combination of one value per axis
      size:                                          # label -> several overrides
        w32: {model.hf_config.hidden_size: 32}
        w64: {model.hf_config.hidden_size: 64}
      method: {key: adapter.method, values: [parallel, lora]}    # one key, labels = values
      zero: {key: train.zero_config, values: {z2: ds_configs/zero2.json}}   # explicit labels
    plot: {x: size, average: [seed]}                 # x axis of the plots; axes averaged over
    cluster: "sbatch launchers/slurm/train.sbatch {config} {overrides}"   # --print template

Run names join ``axis-label`` in axis order: ``size-w32_method-parallel_zero-z2``.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mosa_scale.config.errors import ConfigError, Problems
from mosa_scale.config.loader import load_yaml, parse_overrides
from mosa_scale.config.run import load_run_config

TOP_KEYS = ("config", "out_dir", "ranks", "set", "axes", "plot", "cluster")
DEFAULT_CLUSTER = "deepspeed launchers/train.py --config {config} {overrides}"
_LABEL = re.compile(r"[^A-Za-z0-9.+=-]+")


@dataclass(frozen=True)
class Axis:
    """One grid dimension: ordered labels, each with the overrides it sets."""

    name: str
    values: tuple[tuple[str, dict[str, Any]], ...]

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in self.values]


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid."""

    name: str
    labels: dict[str, str]  # axis -> label
    overrides: dict[str, Any]  # dotted key -> value: common ``set`` first, then the axes
    run_dir: Path

    def override_args(self) -> list[str]:
        """``key=value`` arguments for ``launchers/train.py`` (values as YAML/JSON), run dir last."""
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()] + [f"train.run_dir={self.run_dir}"]


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file."""

    config: Path
    out_dir: Path
    ranks: int
    common: dict[str, Any]
    axes: tuple[Axis, ...]
    plot_x: str
    plot_average: tuple[str, ...]
    cluster: str = DEFAULT_CLUSTER
    source: Path | None = field(default=None, compare=False)

    def runs(self) -> list[RunSpec]:
        """Every grid point, in axis order (the first axis varies slowest)."""
        out = []
        for combo in itertools.product(*(a.values for a in self.axes)):
            labels = {a.name: label for a, (label, _) in zip(self.axes, combo)}
            overrides = dict(self.common)
            for _, sets in combo:
                overrides.update(sets)
            name = run_name(labels)
            out.append(RunSpec(name, labels, overrides, self.out_dir / "runs" / name))
        return out


def format_value(value: Any) -> str:
    """A value as the override parser reads it back (YAML): plain strings stay bare."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
        return json.dumps(value)
    if isinstance(value, (Mapping, list, tuple)):  # flow style keeps int keys (experts_per_block)
        plain = list(value) if isinstance(value, tuple) else value
        return yaml.safe_dump(plain, default_flow_style=True, width=10**9).strip()
    return json.dumps(value)


def run_name(labels: Mapping[str, str]) -> str:
    """``axis-label`` pairs joined by ``_``, unsafe characters replaced by ``+``."""
    return "_".join(f"{_LABEL.sub('+', str(a))}-{_LABEL.sub('+', str(v))}" for a, v in labels.items())


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}`` (dotted or nested, both fine)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _axis(name: str, raw: Any, p: Problems) -> Axis | None:
    where = f"axes.{name}"
    if not isinstance(raw, Mapping) or not raw:
        p.add(where, "must be {key: K, values: [...]} or {label: {key: value, ...}, ...}")
        return None
    if set(raw) == {"key", "values"}:
        key, values = raw["key"], raw["values"]
        if not isinstance(key, str) or not key:
            p.add(f"{where}.key", f"got {key!r}; give a dotted run-config key such as adapter.num_experts")
            return None
        if isinstance(values, Mapping):
            pairs = [(str(label), {key: v}) for label, v in values.items()]
        elif isinstance(values, Sequence) and not isinstance(values, str):
            pairs = [(str(v), {key: v}) for v in values]
        else:
            p.add(f"{where}.values", f"got {values!r}; give a list or a label -> value mapping")
            return None
    else:
        pairs = []
        for label, sets in raw.items():
            if not isinstance(sets, Mapping) or not sets:
                p.add(f"{where}.{label}", f"got {sets!r}; give a mapping of dotted keys to values")
                continue
            pairs.append((str(label), _flatten(sets)))
    if not pairs:
        p.add(where, "has no values")
        return None
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        p.add(where, f"labels {labels} repeat; each value needs its own label")
    return Axis(name, tuple(pairs))


def parse_sweep(
    data: Mapping[str, Any], *, source: Path | None = None, out_dir: str | Path | None = None, extra: Sequence[str] = ()
) -> SweepSpec:
    """Validates a sweep mapping; every problem is reported at once.

    Args:
        data: The sweep file's content.
        source: The file it came from.
        out_dir: Overrides ``out_dir``.
        extra: ``key=value`` overrides added to ``set`` (command line).

    Raises:
        ConfigError: listing every problem (unknown keys, malformed axes, keys set by two axes).
    """
    p = Problems()
    for key in data:
        if key not in TOP_KEYS:
            p.unknown(key, TOP_KEYS)
    config = data.get("config")
    config_path = Path(str(config))
    if not config:
        p.add("config", "give the base run config every run starts from")
    elif not config_path.is_file():
        p.add("config", f"file {config!r} does not exist (paths are relative to the working directory)")
    ranks = data.get("ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        p.add("ranks", f"got {ranks!r}; must be an integer >= 1")
    common_raw = data.get("set") or {}
    if not isinstance(common_raw, Mapping):
        p.add("set", f"got {common_raw!r}; give a mapping of dotted keys to values")
        common_raw = {}
    common = {**_flatten(common_raw), **_flatten(parse_overrides(list(extra), p))}
    if "train.run_dir" in common:
        p.add("set.train.run_dir", "the sweep sets each run's directory under out_dir; remove it")
    raw_axes = data.get("axes")
    axes: list[Axis] = []
    if not isinstance(raw_axes, Mapping) or not raw_axes:
        p.add("axes", "give at least one axis")
    else:
        for name, raw in raw_axes.items():
            axis = _axis(str(name), raw, p)
            if axis is not None:
                axes.append(axis)
    owners: dict[str, str] = {}
    for axis in axes:
        for key in {k for _, sets in axis.values for k in sets}:
            if key == "train.run_dir":
                p.add(f"axes.{axis.name}", "must not set train.run_dir")
            if key in owners:
                p.add(f"axes.{axis.name}", f"sets {key!r}, which axis {owners[key]!r} sets too")
            owners[key] = axis.name
    plot = data.get("plot") or {}
    names = [a.name for a in axes]
    plot_x = plot.get("x", names[0] if names else "")
    if axes and plot_x not in names:
        p.add("plot.x", f"got {plot_x!r}; must be one of the axes {names}")
    seed_axes = [a.name for a in axes if any("train.seed" in sets for _, sets in a.values)]
    average = tuple(plot.get("average", seed_axes))
    for a in average:
        if a not in names:
            p.add("plot.average", f"{a!r} is not an axis; axes are {names}")
    cluster = data.get("cluster", DEFAULT_CLUSTER)
    if not isinstance(cluster, str) or "{overrides}" not in cluster:
        p.add("cluster", "must be a command template containing {overrides} (and usually {config})")
    out = out_dir if out_dir is not None else data.get("out_dir")
    if not out:
        p.add("out_dir", "give the folder that holds the sweep's runs, CSV and plots")
    p.raise_if_any()
    return SweepSpec(
        config=config_path,
        out_dir=Path(out),
        ranks=ranks,
        common=common,
        axes=tuple(axes),
        plot_x=plot_x,
        plot_average=average,
        cluster=cluster,
        source=source,
    )


def load_sweep(path: str | Path, *, out_dir: str | Path | None = None, extra: Sequence[str] = ()) -> SweepSpec:
    """Reads and validates a sweep file (see :func:`parse_sweep`).

    Raises:
        ConfigError: the file is missing, not a mapping, or invalid.
    """
    path = Path(path)
    return parse_sweep(load_yaml(path), source=path, out_dir=out_dir, extra=extra)


def check_runs(spec: SweepSpec) -> None:
    """Loads every run's config exactly as ``launchers/train.py`` will, before anything starts.

    Raises:
        ConfigError: listing every problem of every run, prefixed with the run's name.
    """
    problems: list[str] = []
    for run in spec.runs():
        try:
            load_run_config(spec.config, run.override_args(), world_size=spec.ranks)
        except ConfigError as e:
            problems += [f"run {run.name}: {line}" for line in e.problems]
    if problems:
        raise ConfigError(problems)


def cluster_command(spec: SweepSpec, run: RunSpec) -> str:
    """The ``cluster`` template filled in for one run (shell-quoted)."""
    overrides = " ".join(shlex.quote(a) for a in run.override_args())
    return spec.cluster.format(config=shlex.quote(str(spec.config)), overrides=overrides, name=run.name)
