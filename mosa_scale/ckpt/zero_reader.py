"""Reading a DeepSpeed checkpoint tag (any ZeRO stage, any world size) into full fp32 tensors, in one
CPU process, without DeepSpeed.

The tag's files are first checked against its manifest (:func:`~mosa_scale.ckpt.verify.verify_files`),
then every DeepSpeed file is read with ``torch.load(weights_only=True)``
(:mod:`mosa_scale.ckpt.safe_load`). The model-states files need nothing more; the optimizer-states
files hold three pickled DeepSpeed objects that the weights-only loader refuses (the loss scaler,
the ZeRO-stage enum, ZeRO-1/2's fragment addresses). They are read as the inert stand-ins of
:data:`~mosa_scale.ckpt.safe_load.DEEPSPEED_STAND_INS`: no DeepSpeed code runs and ``deepspeed`` is
not imported.

The fp32 master values are rebuilt from the flat partitions exactly as DeepSpeed's ``zero_to_fp32``
does (ZeRO-1/2: one flat group per param group, split evenly over ranks, with per-param alignment
padding; ZeRO-3: every param split over ranks on its own). What the adapter tensors mean is
:mod:`mosa_scale.sparse.layout`'s business: :meth:`ZeroCheckpoint.trained_state` hands them over
in its current layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mosa_scale.adapters.factory import is_adapter_name
from mosa_scale.ckpt.safe_load import CheckpointError, load_weights_only
from mosa_scale.ckpt.verify import verify_files
from mosa_scale.sparse.layout import legacy_layers, to_current_layout

MODEL_STATES = "*_model_states.pt"


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


# ---------------------------------------------------------------------------- where the files are
def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def model_state_files(tag_dir: Path) -> list[Path]:
    """The tag's model-states files, rank 0's first."""
    return sorted(tag_dir.glob(MODEL_STATES), key=_natural)


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
    if (p / "checkpoints").is_dir() and not any(p.glob(MODEL_STATES)):
        p = p / "checkpoints"
    if any(p.glob(MODEL_STATES)):
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


def _check_files_present(d: Path, stage: int, world: int, bf16: bool) -> None:
    """Raises when a file a tag of this stage and world size holds is missing."""
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


# ---------------------------------------------------------------------------- ZeRO's flat partitions
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


def _partitioned_params(
    d: Path, world: int, param_shapes: list[Mapping[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Full fp32 params and steps per param group from the ranks' optimizer-states files."""
    shards = [load_weights_only(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(world)]
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
        return params, _group_steps(osds[0].get("optimizer_state_dict"))
    params = _zero12_params(
        world,
        [o["single_partition_of_fp32_groups"] for o in osds],
        param_shapes,
        osds[0].get("param_alignment_paddings"),
    )
    return params, _group_steps(osds[0].get("base_optimizer_state"))


def _check_buffers_agree(model_files: list[Path], buffers: Mapping[str, torch.Tensor]) -> None:
    """ZeRO-3 saves the buffers on every rank: they must agree with rank 0's."""
    for f in model_files[1:]:
        other = load_weights_only(f)["module"]
        differ = [k for k in buffers if k not in other or not torch.equal(other[k].to(buffers[k].dtype), buffers[k])]
        if differ:
            raise CheckpointError(
                f"{f}: buffers {differ[:3]} differ from rank 0's: the files come from different runs or checkpoints"
            )


# ---------------------------------------------------------------------------- reading
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
    verify_files(d, unverified=unverified)  # sizes and sha256 of every file, before anything is unpickled
    model_files = model_state_files(d)
    main = load_weights_only(model_files[0])
    if not isinstance(main, dict) or "module" not in main or "param_shapes" not in main:
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model-states file (no 'module'/'param_shapes')")
    if int(main.get("mp_world_size", 1)) != 1:
        raise CheckpointError(f"{d}: model parallel size {main['mp_world_size']}; only data parallelism is supported")
    ds_config = main.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    world = int(main.get("dp_world_size", 1))
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled"))
    _check_files_present(d, stage, world, bf16)
    buffer_names = list(main.get("buffer_names") or [])
    buffers = {
        k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
        for k, v in main["module"].items()
        if k in buffer_names
    }
    param_shapes = main.get("param_shapes")
    if isinstance(param_shapes, Mapping):
        param_shapes = [param_shapes]
    if stage == 0 and not bf16:  # no partitions: the module holds the full (fp32) trainable values
        params = {k: v.float().clone() for k, v in main["module"].items() if k not in buffer_names}
        group_steps = _group_steps(main.get("optimizer"))
    elif not param_shapes:
        raise CheckpointError(f"{model_files[0]}: no 'param_shapes' to rebuild the ZeRO-{stage} partitions from")
    else:
        params, group_steps = _partitioned_params(d, world, param_shapes)
    if stage == 3:
        _check_buffers_agree(model_files, buffers)
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
    files = model_state_files(d)
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
