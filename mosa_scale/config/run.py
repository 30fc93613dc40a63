"""The run configuration: one frozen dataclass per concern, validated once before anything is built."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from mosa_scale.adapters.config import AdapterConfig
from mosa_scale.backbones.base import BackboneConfig, Precision
from mosa_scale.backbones.head import HeadKind
from mosa_scale.config.errors import Problems
from mosa_scale.config.loader import build_dataclass, deep_merge, load_yaml, parse_overrides
from mosa_scale.data.config import DataConfig, check_data_paths
from mosa_scale.sparse.routing import Scope

REPO_ROOT = Path(__file__).resolve().parents[2]
# settings whose one home is the run config; a ds_configs file must not carry them
RUN_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


Inactive = Literal["skip", "coast"]  # optim.inactive, read by MoSAAdamW


def _validated(section: Any, prefix: str) -> None:
    """Raises every problem ``section.validate_into`` records, as one ConfigError."""
    p = Problems()
    section.validate_into(p, prefix=prefix)
    p.raise_if_any()


@dataclass(frozen=True)
class HeadConfig:
    """Classification head: ``linear`` or ``zeroshot`` (CLIP towers, from class-name prompts)."""

    kind: HeadKind = "linear"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _validated(self, "head")

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        p.choice(f"{prefix}.kind", self.kind, get_args(HeadKind))
        if self.kind == "zeroshot" and not self.class_names:
            p.add(f"{prefix}.class_names", "'zeroshot' needs the class names for its prompts")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (MOSA_SPEC section 7) with linear warm-up then cosine decay, per optimizer step.

    ``inactive`` is how an expert slice that no unit used this step is treated (MOSA_SPEC
    section 4): ``skip`` leaves it untouched (the N-copies reference under torch >= 2, where an
    unused copy has no gradient); ``coast`` steps it with a zero gradient from its first use on, as
    the authors' published runs did under PyTorch 1.11 (stale momentum keeps moving it, weight
    decay shrinks it)."""

    lr: float = 1e-3
    inactive: Inactive = "skip"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_grad: float = 0.0

    def __post_init__(self) -> None:
        _validated(self, "optim")

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        """Records this section's problems; ``warmup_steps < train.steps`` is :func:`check_run`'s."""
        p.positive(f"{prefix}.lr", self.lr)
        p.choice(f"{prefix}.inactive", self.inactive, get_args(Inactive))
        if self.warmup_steps < 0:
            p.add(f"{prefix}.warmup_steps", f"got {self.warmup_steps}; must be >= 0")
        if self.clip_grad < 0:
            p.add(f"{prefix}.clip_grad", f"got {self.clip_grad}; must be >= 0 (0 = off)")
        if not 0 <= self.min_lr_ratio <= 1:
            p.add(f"{prefix}.min_lr_ratio", f"got {self.min_lr_ratio}; must be in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """Steps, batch sizes (``global_batch = micro_batch x accumulation x world``), schedules.

    ``seed`` is the one run seed: MoSA partitions, adapter and head init, a random-init tower,
    routing, dropout and the data order are all drawn from it."""

    steps: int = 100
    global_batch: int = 32
    micro_batch: int = 16
    precision: Precision = "fp32"
    seed: int = 3407
    eval_every: int = 50
    eval_batches: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 5
    gradient_checkpointing: bool = False
    zero_config: str = "ds_configs/zero2.json"
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        _validated(self, "train")

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        """Records this section's problems; the batch arithmetic (it needs the world size) and the
        ZeRO file are :func:`check_run`'s."""
        for name in _POSITIVE_TRAIN:
            p.positive(f"{prefix}.{name}", getattr(self, name))
        p.choice(f"{prefix}.precision", self.precision, get_args(Precision))


_POSITIVE_TRAIN = (
    "steps",
    "global_batch",
    "micro_batch",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "max_bad_steps",
)


@dataclass(frozen=True)
class RoutingConfig:
    scope: Scope = "global"

    def __post_init__(self) -> None:
        _validated(self, "routing")

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        p.choice(f"{prefix}.scope", self.scope, get_args(Scope))


@dataclass(frozen=True)
class ConsistencyConfig:
    """Second pass with fresh experts (MOSA_SPEC section 6)."""

    enabled: bool = False
    weight: float = 1.0
    hidden_blocks: int = 0
    hidden_weight: float = 0.01
    second_ce: bool = False

    def __post_init__(self) -> None:
        _validated(self, "consistency")

    def validate_into(self, p: Problems, *, prefix: str) -> None:
        if self.hidden_blocks < 0:
            p.add(f"{prefix}.hidden_blocks", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)

    def accumulation(self, world_size: int) -> int:
        return self.train.global_batch // (self.train.micro_batch * world_size)


def check_run(cfg: RunConfig, world_size: int, p: Problems, *, files: bool = True) -> None:
    """The checks no section can make alone (each section checked itself when it was built): batch
    arithmetic for ``world_size``, the warm-up against the steps, a zero-shot head's backbone, the
    ZeRO file; with ``files``, also the data and backbone files this machine must have (shard paths
    and their index, the number of classes, an OpenCLIP name, an HF ``config.json``). Sections that
    failed to build (None) are skipped so the other sections' problems are still reported."""
    t, o = cfg.train, cfg.optim
    if t is not None:
        _check_batches(t, world_size, p)
    if t is None or o is None or cfg.data is None or cfg.head is None or cfg.model is None:
        return
    if o.warmup_steps >= max(t.steps, 1):
        p.add("optim.warmup_steps", f"got {o.warmup_steps}; must be in [0, train.steps={t.steps})")
    _check_zero_config(t.zero_config, p)
    if files:
        check_data_paths(cfg.data, p)
        _check_backbone_files(cfg.model, p)
    if cfg.head.kind == "zeroshot" and cfg.model.family != "openclip":
        p.add("head.kind", "'zeroshot' needs model.family 'openclip' (its text tower makes the head)")


def _check_batches(t: TrainConfig, world_size: int, p: Problems) -> None:
    if t.micro_batch > 0 and t.global_batch > 0 and t.global_batch % (t.micro_batch * world_size):
        p.add(
            "train.global_batch",
            f"{t.global_batch} is not micro_batch ({t.micro_batch}) x accumulation x "
            f"world size ({world_size}) for any whole accumulation; use a multiple of {t.micro_batch * world_size}",
        )


def _check_zero_config(value: str, p: Problems) -> None:
    """The DeepSpeed file exists, is JSON and holds none of the settings the run config owns."""
    path = Path(value) if Path(value).is_file() else REPO_ROOT / value
    if not path.is_file():
        p.add("train.zero_config", f"file {value!r} does not exist (see ds_configs/)")
        return
    try:
        ds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        p.add("train.zero_config", f"file {str(path)!r} is not valid JSON ({e})")
        return
    if not isinstance(ds, dict):
        p.add("train.zero_config", f"file {str(path)!r} must hold a JSON object")
        return
    for key in RUN_OWNED:
        if key in ds:
            p.add(
                "train.zero_config",
                f"file {str(path)!r} sets {key}={json.dumps(ds[key])}; it comes from the run "
                "config (train.*, optim.clip_grad): remove it from the DeepSpeed file",
            )


def _openclip_config_names() -> list[str] | None:
    """OpenCLIP's built-in model names, from its model_configs folder (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model_configs"
    return sorted(f.stem for f in folder.glob("*.json")) if folder.is_dir() else None


def _check_backbone_files(m: BackboneConfig, p: Problems) -> None:
    """An OpenCLIP name that exists; an HF ``pretrained`` folder with a readable config.json."""
    if m.family == "openclip" and m.openclip_cfg is None and not m.name.startswith(("hf-hub:", "local-dir:")):
        names = _openclip_config_names()
        if names is not None and m.name not in names:
            close = difflib.get_close_matches(m.name, names, n=3)
            p.add(
                "model.name",
                f"got {m.name!r}; not an OpenCLIP model (did you mean {', '.join(map(repr, close))}?); "
                "or give the architecture as model.openclip_cfg",
            )
    if m.family != "openclip" and m.pretrained is not None:
        folder = Path(m.pretrained).expanduser()
        conf = folder / "config.json"
        if not folder.is_dir():
            p.add("model.pretrained", f"{m.pretrained!r} is not a folder (a save_pretrained folder with config.json)")
        elif not conf.is_file():
            p.add("model.pretrained", f"{m.pretrained!r} has no config.json (a save_pretrained folder is needed)")
        else:
            try:
                json.loads(conf.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                p.add("model.pretrained", f"file {str(conf)!r} is not valid JSON ({e}); copy the model again")


def load_run_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, world_size: int = 1, check_files: bool = True
) -> RunConfig:
    """Loads, overrides, type-checks and validates a run config.

    Args:
        path: The YAML file (None: defaults).
        overrides: Dotted ``key=value`` overrides.
        world_size: Ranks the run will have (batch arithmetic).
        check_files: Also check the data and backbone files exist here (off to read a config
            written for another machine, e.g. a recipe or a finished run's config.yaml).

    Raises:
        ConfigError: listing every problem found (unknown keys, wrong types, bad values, batch
            sizes that do not multiply out, missing or unreadable files).
    """
    p = Problems()
    data = load_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides, p))
    built = _build_sections(data, p)
    check_run(types.SimpleNamespace(**built), world_size, p, files=check_files)  # type: ignore[arg-type]
    p.raise_if_any()
    return RunConfig(**built)


def run_config_from_plain(data: Mapping[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from its plain form (a run's config.yaml, an adapter manifest's
    ``config``): every section type-checked and validated, without the training-only cross
    checks of :func:`load_run_config` (batch arithmetic, the ZeRO file existing here).

    Raises:
        ConfigError: listing every problem.
    """
    p = Problems()
    built = _build_sections(data, p)
    p.raise_if_any()
    return RunConfig(**built)


def _build_sections(data: Mapping[str, Any], p: Problems) -> dict[str, Any]:
    """Each RunConfig section built from ``data``; unknown top-level keys and every section's
    problems recorded in ``p``."""
    data = _read_legacy_seed(data, p)
    hints = typing.get_type_hints(RunConfig)
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    for key in data:
        if key not in sections:
            p.unknown(key, sections)
    return {name: build_dataclass(hints[name], data.get(name), name, p) for name in sections}


def _read_legacy_seed(data: Mapping[str, Any], p: Problems) -> Mapping[str, Any]:
    """``adapter.seed``, the partition seed of configs written before ``train.seed`` became the one
    run seed, is accepted when it equals the run seed (every recipe, run config.yaml and adapter
    file of that time set both to the same value) and dropped; a different value is a problem:
    this version seeds partitions and adapter init from ``train.seed``, so it cannot rebuild them."""
    adapter, train = data.get("adapter"), data.get("train")
    if not isinstance(adapter, Mapping) or "seed" not in adapter:
        return data
    run_seed = train.get("seed", TrainConfig.seed) if isinstance(train, Mapping) else TrainConfig.seed
    if adapter["seed"] != run_seed:
        p.add(
            "adapter.seed",
            f"got {adapter['seed']!r}, train.seed is {run_seed!r}; adapter.seed was removed: the run seed "
            "train.seed also seeds the MoSA partitions and the adapter init. Remove adapter.seed (set "
            "train.seed to its value to keep its partitions)",
        )
    return {**data, "adapter": {k: v for k, v in adapter.items() if k != "seed"}}
