"""Offline consolidation: a sharded DeepSpeed checkpoint (any ZeRO stage, any world size) -> one
merged adapter, in one CPU process.

Every file of the tag is first checked against the tag's manifest (size, sha256), then every
DeepSpeed file is read with ``torch.load(weights_only=True)`` (``mosa_scale.ckpt.safe_load``). The
model-states files need nothing more; the optimizer-states files hold three pickled DeepSpeed
objects that the weights-only loader refuses (the loss scaler, the ZeRO-stage enum, ZeRO-1/2's
fragment addresses). They are read as the inert stand-ins of :data:`DEEPSPEED_STAND_INS`: no
DeepSpeed code runs and ``deepspeed`` is not imported.

The fp32 master values are rebuilt from the flat partitions exactly as DeepSpeed's
``zero_to_fp32`` does (ZeRO-1/2: one flat group per param group, split evenly over ranks, with
per-param alignment padding; ZeRO-3: every param split over ranks on its own), and checked
against the run config: the adapter's structure (names and shapes), the routing state and the
seeded partition of every MoSA layer (MOSA_SPEC section 2), before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mosa_scale.adapters.factory import is_adapter_name
from mosa_scale.ckpt.adapter_file import MANIFEST, WEIGHTS, read_adapter, write_adapter
from mosa_scale.ckpt.manifest import MANIFEST_NAME, verify_tag
from mosa_scale.ckpt.merge import merge_state_dict
from mosa_scale.ckpt.safe_load import DEEPSPEED_STAND_INS, CheckpointError, DeepSpeedObject, load_weights_only  # noqa: F401
from mosa_scale.config.loader import load_yaml, to_plain
from mosa_scale.config.run import HeadConfig, RunConfig, run_config_from_plain
from mosa_scale.model.assembly import build_model
from mosa_scale.sparse.layout import layer_prefixes, legacy_layers, read_layer, to_current_layout
from mosa_scale.sparse.partition import partition
from mosa_scale.sparse.routing import Router

log = logging.getLogger(__name__)

HEAD_PREFIX = "mosa_head."
TOWER_PREFIX = "tower."  # AdaptedClassifier.tower: MoSA layer names are relative to it
# the RunConfig sections that decide the adapter's tensors; a difference elsewhere (lr, steps) does not
ADAPTER_DEFINING = ("model", "adapter", "head", "routing", "train.seed", "data.num_classes")


class CheckpointMismatch(ValueError):
    """A checkpoint does not match the config it was checked against.

    Attributes:
        differences: One line per difference, naming what differs and both values.
    """

    def __init__(self, differences: Sequence[str]) -> None:
        self.differences = list(differences)
        lines = [f"the checkpoint does not match the config ({len(self.differences)} difference(s)):"]
        lines += [f"  - {d}" for d in self.differences]
        lines.append("pass the run's own config (--config RUN_DIR/config.yaml), or the checkpoint of that run")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------- reading
@dataclass
class ZeroCheckpoint:
    """The consolidated content of one DeepSpeed checkpoint tag.

    Attributes:
        path: The tag directory.
        stage: ZeRO stage (0-3) it was written under.
        world_size: Data-parallel ranks that wrote it.
        params: Full fp32 values of every trainable parameter, by qualified name.
        buffers: Persistent buffers (the MoSA ``base``/``assign``/``decay``/``dims``...).
        step: Optimizer steps taken (the trainer's ``step``, else DeepSpeed's ``global_steps``).
        router: The saved routing state (seed, scope, world size, N per route), if any.
        group_steps: Optimizer steps each param group took, by group name (a MoSA slice steps
            only when its expert was active, so these are expert activation counts).
        files: Bytes of every file of the tag.
    """

    path: Path
    stage: int
    world_size: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    step: int | None = None
    router: dict[str, Any] | None = None
    group_steps: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers selected by the adapter-name contract (the unmerged state), in
        the current MoSA layout (a legacy one-parameter-per-expert checkpoint is converted)."""
        return to_current_layout({k: v for k, v in {**self.buffers, **self.params}.items() if is_adapter_name(k)})

    @property
    def legacy_layout(self) -> bool:
        """Written by a mosa_scale that kept one parameter (and param group) per expert slice."""
        return bool(legacy_layers({**self.buffers, **self.params}))


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """The tag directory for a run directory, its ``checkpoints/`` folder or a tag folder.

    Raises:
        CheckpointError: when no checkpoint is found, naming what was looked for.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"{p}: no such directory; give a run directory, its checkpoints/ folder or one "
            "checkpoint folder (checkpoints/<tag>)"
        )
    if (p / "checkpoints").is_dir() and not any(p.glob("*_model_states.pt")):
        p = p / "checkpoints"
    if any(p.glob("*_model_states.pt")):
        if tag is not None and p.name != tag:
            raise CheckpointError(f"{p} is checkpoint {p.name!r}, not tag {tag!r}")
        return p
    if tag is None:
        latest = p / "latest"
        if not latest.is_file():
            raise CheckpointError(
                f"{p}: no *_model_states.pt and no 'latest' file; give one checkpoint folder or pass --tag"
            )
        tag = latest.read_text().strip()
    d = p / tag
    if not d.is_dir():
        raise CheckpointError(
            f"{d}: checkpoint tag {tag!r} does not exist (tags here: "
            f"{', '.join(sorted(x.name for x in p.iterdir() if x.is_dir())) or 'none'})"
        )
    return d


def run_dir_of(tag_dir: Path) -> Path | None:
    """The run directory (holding config.yaml) of ``RUN/checkpoints/<tag>``, if there is one."""
    run = tag_dir.parent.parent
    return run if (run / "config.yaml").is_file() else None


def _zero12_params(
    world: int,
    partitions: list[list[torch.Tensor]],
    param_shapes: list[Mapping[str, Any]],
    paddings: list[list[int]] | None,
) -> dict[str, torch.Tensor]:
    """ZeRO-1/2 (and bf16 optimizer): group i is the concatenation of every rank's partition i."""
    out: dict[str, torch.Tensor] = {}
    if any(len(parts) != len(param_shapes) for parts in partitions):
        raise CheckpointError(
            f"the optimizer shards hold {[len(p) for p in partitions]} param groups, the model "
            f"states {len(param_shapes)}: the shards come from different runs or checkpoints"
        )
    align = 2 * world  # ZeRO-1/2 pads each flat group to a multiple of 2 x world size
    for gi, shapes in enumerate(param_shapes):
        flat = torch.cat([parts[gi].reshape(-1) for parts in partitions])
        offset = 0
        for pi, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise CheckpointError(
                    f"param group {gi} holds {flat.numel()} values, too few for {name}: the shards "
                    "come from different runs or checkpoints"
                )
            out[name] = flat[offset : offset + n].reshape(tuple(shape)).float().clone()
            offset += n + (int(paddings[gi][pi]) if paddings is not None else 0)
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise CheckpointError(
                f"param group {gi}: {flat.numel()} values for {offset} expected; the shards come "
                "from different runs or checkpoints"
            )
    return out


def _zero3_params(
    world: int, partitions: list[list[torch.Tensor]], param_shapes: list[Mapping[str, Any]]
) -> dict[str, torch.Tensor]:
    """ZeRO-3: every param is split on its own into ``ceil(numel / world)`` values per rank."""
    flats = [torch.cat([t.reshape(-1) for t in parts]) for parts in partitions]
    if len({f.numel() for f in flats}) != 1:
        raise CheckpointError(
            f"the ranks' fp32 partitions differ in size ({[f.numel() for f in flats]}): the shards "
            "come from different runs or checkpoints"
        )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            full = torch.cat([f[offset : offset + part] for f in flats])[:n]
            out[name] = full.reshape(tuple(shape)).float().clone()
            offset += part
    if offset != flats[0].numel():
        raise CheckpointError(
            f"consumed {offset} of {flats[0].numel()} values per rank: the shards come from "
            "different runs or checkpoints"
        )
    return out


def _group_steps(opt_state: Mapping[str, Any] | None) -> dict[str, int]:
    """Steps per named param group from an inner optimizer state dict (``state`` + ``param_groups``)."""
    if not opt_state or "param_groups" not in opt_state:
        return {}
    state = opt_state.get("state", {})
    out: dict[str, int] = {}
    for i, g in enumerate(opt_state["param_groups"]):
        steps = [state[idx]["step"] for idx in g.get("params", []) if idx in state and "step" in state[idx]]
        out[str(g.get("name", f"group{i}"))] = int(max((float(s) for s in steps), default=0))
    return out


def read_zero_checkpoint(path: str | Path, *, tag: str | None = None, unverified: bool = False) -> ZeroCheckpoint:
    """Reads a DeepSpeed checkpoint of any ZeRO stage and world size into full fp32 tensors.

    Args:
        path: A run directory, its ``checkpoints/`` folder, or one tag folder.
        tag: Checkpoint tag (default: the one ``latest`` names).
        unverified: Read a tag that has no manifest (written before mosa_scale wrote manifests):
            its files are still read weights-only and cross-checked, but damage that keeps them
            loadable cannot be detected. A tag that has a manifest is always verified against it.

    Raises:
        CheckpointError: when the tag has no manifest, or files are missing (naming them and the
            ranks that wrote the checkpoint), truncated, altered, unlisted in the manifest, or
            inconsistent with each other.
    """
    d = resolve_checkpoint(path, tag)
    if unverified and not (d / MANIFEST_NAME).is_file():
        log.warning(
            "%s has no %s (written before mosa_scale wrote manifests): reading it unverified, weights-only; "
            "damage that leaves its files loadable cannot be detected",
            d,
            MANIFEST_NAME,
        )
    else:
        verify_tag(d)  # sizes and sha256 of every file, before anything is unpickled
    model_files = sorted(d.glob("*_model_states.pt"), key=_natural)
    main = load_weights_only(model_files[0])
    if not isinstance(main, dict) or "module" not in main or "param_shapes" not in main:
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model-states file (no 'module'/'param_shapes')")
    if int(main.get("mp_world_size", 1)) != 1:
        raise CheckpointError(f"{d}: model parallel size {main['mp_world_size']}; only data parallelism is supported")
    ds_config = main.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    world = int(main.get("dp_world_size", 1))
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled"))
    ranks = range(world)
    want = (
        [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks]
        if stage == 3
        else ["mp_rank_00_model_states.pt"]
    )
    if stage >= 1 or bf16:  # bf16 at stage 0 keeps fp32 masters in the same layout as ZeRO-1/2
        want += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
    missing = [f for f in want if not (d / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{d}: written by {world} rank(s) under ZeRO-{stage}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: a rank did not finish writing or a file was lost; "
            f"copy the missing file(s), or use an earlier tag in {d.parent}"
        )
    buffer_names = list(main.get("buffer_names") or [])
    buffers = {
        k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
        for k, v in main["module"].items()
        if k in buffer_names
    }
    param_shapes = main.get("param_shapes")
    if isinstance(param_shapes, Mapping):
        param_shapes = [param_shapes]
    group_steps: dict[str, int] = {}
    if stage == 0 and not bf16:  # no partitions: the module holds the full (fp32) trainable values
        params = {k: v.float().clone() for k, v in main["module"].items() if k not in buffer_names}
        group_steps = _group_steps(main.get("optimizer"))
    elif not param_shapes:
        raise CheckpointError(f"{model_files[0]}: no 'param_shapes' to rebuild the ZeRO-{stage} partitions from")
    else:
        shards = [load_weights_only(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in ranks]
        osds = [s.get("optimizer_state_dict") if isinstance(s, dict) else None for s in shards]
        if any(o is None for o in osds):
            raise CheckpointError(f"{d}: an optimizer-states file has no 'optimizer_state_dict'")
        counts = {max(c) if isinstance(c, list) else int(c) for o in osds for c in [o.get("partition_count", world)]}
        if counts != {world}:
            raise CheckpointError(
                f"{d}: the optimizer shards were partitioned over {sorted(counts)} ranks but the "
                f"model states say {world}: the files come from different runs"
            )
        if "fp32_flat_groups" in osds[0]:
            params = _zero3_params(world, [o["fp32_flat_groups"] for o in osds], param_shapes)
            group_steps = _group_steps(osds[0].get("optimizer_state_dict"))
        else:
            params = _zero12_params(
                world,
                [o["single_partition_of_fp32_groups"] for o in osds],
                param_shapes,
                osds[0].get("param_alignment_paddings"),
            )
            group_steps = _group_steps(osds[0].get("base_optimizer_state"))
    if stage == 3:  # buffers are saved by every rank: they must agree
        for f in model_files[1:]:
            other = load_weights_only(f)["module"]
            differ = [
                k for k in buffers if k not in other or not torch.equal(other[k].to(buffers[k].dtype), buffers[k])
            ]
            if differ:
                raise CheckpointError(
                    f"{f}: buffers {differ[:3]} differ from rank 0's: the files come from different runs or checkpoints"
                )
    step = main.get("step", main.get("global_steps"))
    return ZeroCheckpoint(
        path=d,
        stage=stage,
        world_size=world,
        params=params,
        buffers=buffers,
        step=None if step is None else int(step),
        router=main.get("router"),
        group_steps=group_steps,
        files={f.name: f.stat().st_size for f in sorted(d.iterdir())},
    )


def refuse_legacy_layout(tag_dir: str | Path) -> None:
    """Refuses to resume a checkpoint written in the legacy MoSA layout (one parameter and one param
    group per expert slice): its optimizer state cannot be mapped onto two param groups, and DeepSpeed
    would load it without noticing. Offline tools still read it (:meth:`ZeroCheckpoint.trained_state`).

    Raises:
        CheckpointError: naming the checkpoint and what to do instead.
    """
    d = Path(tag_dir)
    files = sorted(d.glob("*_model_states.pt"), key=_natural)
    if not files:
        return  # nothing to check here; the loader reports missing files
    module = load_weights_only(files[0]).get("module") or {}
    legacy = legacy_layers(module)
    if legacy:
        raise CheckpointError(
            f"{d}: written by an older mosa_scale that kept one parameter and one optimizer param group per expert "
            f"slice ({len(legacy)} MoSA layers, e.g. {legacy[0]}); this version cannot resume it. Its adapter is "
            "still readable: `python tools/merge_adapter.py RUN_DIR --out DIR --unverified` writes the merged adapter "
            "(it predates checkpoint manifests); start a new "
            "run directory to train again"
        )


# ---------------------------------------------------------------------------- checks
def load_config_file(path: str | Path) -> RunConfig:
    """A run config YAML (e.g. RUN/config.yaml), validated section by section.

    Unlike :func:`~mosa_scale.config.run.load_run_config`, the training-only cross checks (batch
    arithmetic, the ZeRO file existing here) are skipped: merging does not train.

    Raises:
        ConfigError: listing every problem.
    """
    return run_config_from_plain(load_yaml(path))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_differences(
    reference: RunConfig,
    given: RunConfig,
    *,
    fields: Sequence[str] = ADAPTER_DEFINING,
    names: tuple[str, str] = ("run", "given"),
) -> list[str]:
    """Differences between two run configs in the fields that decide the adapter's tensors."""
    a, b = _flatten(to_plain(reference)), _flatten(to_plain(given))
    keys = sorted(k for k in set(a) | set(b) if any(k == f or k.startswith(f + ".") for f in fields))
    return [f"{k}: {names[0]} {a.get(k)!r}, {names[1]} {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def partition_differences(state: Mapping[str, torch.Tensor], cfg: RunConfig) -> list[str]:
    """Recomputes every MoSA layer's seeded partition from (train.seed, name, mode, N) and
    compares it with the saved ``assign`` (and ``bias_assign``) buffers."""
    a, seed = cfg.adapter, cfg.train.seed
    out = []
    for p in layer_prefixes(state):
        name = p[len(TOWER_PREFIX) :] if p.startswith(TOWER_PREFIX) else p
        try:
            layer = read_layer(state, p)
        except (KeyError, ValueError) as e:
            out.append(f"{p}: {str(e).strip(chr(39))}")
            continue
        n, dims = layer.num_experts, layer.dims
        if n < 2:
            out.append(f"{p}: incomplete MoSA layer ({n} experts)")
            continue
        saved = layer.assign
        try:
            expected = partition(dims, n, seed=seed, name=f"{name}.weight", mode=a.mode).reshape(-1)
        except ValueError as e:
            out.append(f"{p}: {e}")
            continue
        if not torch.equal(saved.to(expected.dtype), expected):
            bad = int((saved.to(expected.dtype) != expected).sum())
            out.append(
                f"{p}: partition differs in {bad} of {expected.numel()} entries from the one train.seed="
                f"{seed}, adapter.mode={a.mode!r}, N={n} give (the run used another seed, mode or N)"
            )
        has_split_bias = layer.bias_assign is not None
        if has_split_bias != a.split_bias and layer.biases is not None:
            out.append(f"{p}: adapter.split_bias: config {a.split_bias}, checkpoint {has_split_bias}")
        elif has_split_bias:
            eb = partition((dims[0],), n, seed=seed, name=f"{name}.bias", mode="all")
            if not torch.equal(layer.bias_assign.to(eb.dtype), eb):
                out.append(f"{p}: bias partition differs from the one train.seed={seed}, N={n} give")
    return out


def _describe_keys(keys: Sequence[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def structure_differences(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and reshaped adapter tensors (head excluded: its size is the data's)."""
    e = {k: v for k, v in expected.items() if not k.startswith(HEAD_PREFIX)}
    a = {k: v for k, v in actual.items() if not k.startswith(HEAD_PREFIX)}
    out = []
    if set(e) - set(a):
        out.append(f"the config gives adapter tensors the checkpoint lacks: {_describe_keys(list(set(e) - set(a)))}")
    if set(a) - set(e):
        extra = _describe_keys(list(set(a) - set(e)))
        out.append(f"the checkpoint has adapter tensors the config does not give: {extra}")
    shaped = [
        f"{k} config {tuple(e[k])} vs checkpoint {tuple(a[k])}"
        for k in sorted(set(e) & set(a))
        if tuple(e[k]) != tuple(a[k])
    ]
    if shaped:
        out.append(
            f"{len(shaped)} tensor shape(s) differ (adapter.bottleneck / num_experts / backbone?): "
            + "; ".join(shaped[:4])
        )
    return out


def router_differences(router: Mapping[str, Any] | None, cfg: RunConfig) -> list[str]:
    if not router:
        return []
    out = []
    if router.get("seed") != cfg.train.seed:
        out.append(f"train.seed: checkpoint routing seed {router.get('seed')!r}, config {cfg.train.seed!r}")
    if router.get("scope") != cfg.routing.scope:
        out.append(f"routing.scope: checkpoint {router.get('scope')!r}, config {cfg.routing.scope!r}")
    return out


@dataclass
class Skeleton:
    """The adapter structure a config gives, built without backbone weights (meta device)."""

    shapes: dict[str, tuple[int, ...]]  # adapter tensors of the MoSA model
    backbone_name: str


def skeleton_config(cfg: RunConfig, hf_config: Mapping[str, Any] | None = None) -> RunConfig | None:
    """``cfg`` with the backbone weights dropped, for a meta-device build of the same architecture.

    An HF backbone's architecture lives in its pretrained directory's ``config.json`` (or in
    ``hf_config``, e.g. a live model's ``config.to_dict()``); None when it is not available.
    """
    m = cfg.model
    if m.pretrained is None:
        return cfg
    extra: dict[str, Any] = dict(hf_config or {})
    if m.family != "openclip" and not extra:
        conf = Path(m.pretrained).expanduser() / "config.json"
        if not conf.is_file():
            return None
        extra = json.loads(conf.read_text())
    merged = {**extra, **dict(m.hf_config or {})} if m.family != "openclip" else m.hf_config
    model = dataclasses.replace(m, pretrained=None, hf_config=merged)
    return dataclasses.replace(cfg, model=model)


def build_skeleton(cfg: RunConfig, num_classes: int) -> Skeleton | None:
    """The adapter tensors (names, shapes) ``cfg`` gives; None if the backbone's architecture is unknown."""
    sk = skeleton_config(cfg)
    if sk is None:
        return None
    sk = dataclasses.replace(sk, head=HeadConfig())  # a zero-shot head needs the text tower; its keys are not compared
    model, backbone, _ = build_model(sk, Router(cfg.train.seed), num_classes=num_classes, meta=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_adapter_name(k)}
    return Skeleton(shapes=shapes, backbone_name=backbone.name)


def check_checkpoint(
    ckpt: ZeroCheckpoint, cfg: RunConfig, *, run_cfg: RunConfig | None = None, skeleton: Skeleton | None = None
) -> None:
    """Refuses a checkpoint that does not match ``cfg``, naming every difference at once.

    Args:
        ckpt: The checkpoint read by :func:`read_zero_checkpoint`.
        cfg: The config it is told to match.
        run_cfg: The run directory's own config.yaml, when there is one (compared field by field).
        skeleton: The structure ``cfg`` gives (:func:`build_skeleton`); None skips that check.

    Raises:
        CheckpointMismatch: listing what differs.
    """
    diffs: list[str] = []
    if run_cfg is not None:
        diffs += config_differences(run_cfg, cfg, names=("run config.yaml", "given"))
    diffs += router_differences(ckpt.router, cfg)
    state = ckpt.trained_state()
    if skeleton is not None:
        expected = skeleton.shapes
        if ckpt.legacy_layout:  # the legacy layout kept per-expert step counts in the optimizer, not the model
            expected = {k: v for k, v in expected.items() if not k.endswith(".steps")}
        diffs += structure_differences(expected, {k: tuple(v.shape) for k, v in state.items()})
    diffs += partition_differences(state, cfg)
    head = state.get(f"{HEAD_PREFIX}weight")
    if head is not None and cfg.data.num_classes is not None and head.shape[0] != cfg.data.num_classes:
        diffs.append(f"data.num_classes: config {cfg.data.num_classes}, checkpoint head {head.shape[0]}")
    if diffs:
        raise CheckpointMismatch(diffs)


# ---------------------------------------------------------------------------- writing
def write_adapters_atomically(
    out_dir: str | Path, items: Sequence[tuple[str, Mapping[str, torch.Tensor], Mapping[str, Any]]]
) -> list[Path]:
    """Writes adapter directories (``(subdir, state, manifest)``, subdir "" = ``out_dir``) so that no
    partial file is ever left: everything is written and read back (checksums) in a temporary
    folder inside ``out_dir``, then moved in with ``os.replace``; on any error the temporary
    folder is removed and ``out_dir`` is as before."""
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mosa-tmp-", dir=out))
    try:
        for sub, state, manifest in items:
            write_adapter(tmp / sub, dict(state), dict(manifest))
            read_adapter(tmp / sub)  # read back: every checksum verified before anything is moved in
        done = []
        for sub, _, _ in items:
            (out / sub).mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS, MANIFEST):
                os.replace(tmp / sub / name, out / sub / name)
            done.append(out / sub if sub else out)
        return done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an error before anything was moved in: leave no empty folder behind


@dataclass
class ConsolidationResult:
    """Where :func:`consolidate` wrote, what it read, and whether the structure was checked."""

    merged_dir: Path
    unmerged_dir: Path | None
    checkpoint: ZeroCheckpoint
    skeleton_checked: bool


def consolidate(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    tag: str | None = None,
    unmerged: bool = False,
    unverified: bool = False,
) -> ConsolidationResult:
    """Checkpoint -> checked, merged adapter in ``out_dir`` (plus ``out_dir/unmerged`` if asked).

    Args:
        checkpoint: A run directory, its ``checkpoints/`` folder, or one tag folder.
        out_dir: Where ``adapter.safetensors`` and ``adapter_config.json`` go.
        config: Run config YAML the checkpoint must match (default: the run's config.yaml).
        tag: Checkpoint tag (default: ``latest``).
        unmerged: Also write the trained (unmerged MoSA) state to ``out_dir/unmerged`` for
            further training.
        unverified: Accept a tag without a manifest (see :func:`read_zero_checkpoint`).

    Raises:
        CheckpointError: a missing, truncated or inconsistent checkpoint.
        CheckpointMismatch: the config or the partition does not match.
        ConfigError: an invalid config file.
    """
    ckpt = read_zero_checkpoint(checkpoint, tag=tag, unverified=unverified)
    run = run_dir_of(ckpt.path)
    run_cfg = load_config_file(run / "config.yaml") if run is not None else None
    if config is None and run_cfg is None:
        raise CheckpointError(
            f"{ckpt.path}: no config.yaml in the run directory above it; pass --config FILE.yaml "
            "(the run config it was trained with)"
        )
    cfg = load_config_file(config) if config is not None else run_cfg
    assert cfg is not None
    state = ckpt.trained_state()
    head = state.get(f"{HEAD_PREFIX}weight")
    num_classes = int(head.shape[0]) if head is not None else cfg.data.num_classes
    if num_classes is None:
        raise CheckpointError(
            "the number of classes is unknown: the checkpoint has no linear head; set data.num_classes"
        )
    skeleton = build_skeleton(cfg, num_classes)
    if skeleton is None:
        log.warning(
            "backbone %s is not available here: the structure check is skipped (partition, routing and "
            "config checks still run)",
            cfg.model.pretrained,
        )
    check_checkpoint(ckpt, cfg, run_cfg=run_cfg if config is not None else None, skeleton=skeleton)
    merged = merge_state_dict(state)
    family = cfg.model.family
    source = cfg.model.pretrained or "random"
    if family != "openclip" and cfg.model.pretrained is not None:
        source = str(Path(cfg.model.pretrained).expanduser())
    manifest = {
        "config": to_plain(cfg),
        "backbone": {"name": skeleton.backbone_name if skeleton else family, "source": source, "family": family},
        "num_classes": num_classes,
        "step": ckpt.step,
        "checkpoint": {"tag": ckpt.path.name, "zero_stage": ckpt.stage, "world_size": ckpt.world_size},
    }
    items: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, Any]]] = [
        ("", merged, {**manifest, "format": "merged"})
    ]
    if unmerged:
        items.append(("unmerged", state, {**manifest, "format": "unmerged"}))
    dirs = write_adapters_atomically(out_dir, items)
    log.info(
        "merged adapter of %s (ZeRO-%d, %d ranks, step %s) written to %s",
        ckpt.path,
        ckpt.stage,
        ckpt.world_size,
        ckpt.step,
        dirs[0],
    )
    return ConsolidationResult(
        merged_dir=dirs[0],
        unmerged_dir=dirs[1] if unmerged else None,
        checkpoint=ckpt,
        skeleton_checked=skeleton is not None,
    )
