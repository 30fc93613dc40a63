"""Resume checkpoints: DeepSpeed's sharded save without the frozen backbone, per-rank RNG and data
state, a manifest of every file (size, sha256) written once all ranks finished, and a ``latest``
pointer replaced atomically only after that.

Nothing read on resume can run code. Before DeepSpeed touches a tag, every file of it is checked
against the manifest and unpickled weights-only (tensor data mapped, not read): only tensors,
plain containers and the DeepSpeed types of :data:`~mosa_scale.ckpt.safe_load.DEEPSPEED_TYPES`
pass; the work is split over the ranks and the verdict is shared, so every rank refuses alike.
DeepSpeed then loads through :class:`WeightsOnlyLoads`, its own checkpoint engine with a
weights-only ``load`` allowing the same types, and the per-rank state (RNG states as tensors) is
read weights-only too.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosa_scale.ckpt.manifest import (
    MANIFEST_NAME,
    digest_files,
    file_problems,
    manifest_step,
    read_manifest,
    refusal,
    tag_files,
    unlisted_files,
    write_manifest,
)
from mosa_scale.ckpt.safe_load import (
    DEEPSPEED_TYPES,
    CheckpointError,
    check_loadable,
    load_weights_only,
    refusal_message,
)
from mosa_scale.engine.agree import broadcast_object, gather_objects, on_rank0, rank_world
from mosa_scale.engine.deepspeed_engine import barrier

log = logging.getLogger(__name__)
LATEST = "latest"
RANK_STATE = "rank{rank:05d}_state.pt"


def _tag(step: int) -> str:
    return f"step{step:08d}"


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------- DeepSpeed's loads
def deepspeed_types() -> list[type]:
    """The real DeepSpeed classes named by the allow-list (imported, never unpickled by name)."""
    out = []
    for name in DEEPSPEED_TYPES:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with ``load`` replaced by a weights-only ``torch.load`` that
    allows tensors, plain containers and the DeepSpeed types of the allow-list; everything else
    (saving, commit, writer choice) is the wrapped engine's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._allowed = deepspeed_types()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(self._allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(refusal_message(path, e)) from e


# ---------------------------------------------------------------------------- save
def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / LATEST)
    fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def retain(ckpt_dir: Path, *, keep: int, step: int, protect: set[str]) -> list[str]:
    """Deletes complete tags (those with a manifest) at or before ``step`` beyond the newest ``keep``
    by step number, and this run's interrupted saves (``step%08d`` without a manifest) of earlier
    steps; never a tag in ``protect`` nor one from a later step (a later save of this run replaces
    it). Returns the names deleted."""
    complete, interrupted = [], []
    for d in ckpt_dir.iterdir():
        if not d.is_dir():
            continue
        s = manifest_step(d)
        if s is None:
            own = re.fullmatch(r"step(\d{8})", d.name)
            if own and int(own.group(1)) < step:
                interrupted.append(d.name)
        elif s <= step:
            complete.append((s, d.name))
    complete.sort()
    keepers = {name for _, name in complete[-keep:]} | protect
    removed = [name for _, name in complete if name not in keepers] + [n for n in interrupted if n not in protect]
    for name in removed:
        shutil.rmtree(ckpt_dir / name)
    return removed


def save(
    engine: Any, ckpt_dir: Path, step: int, *, client_state: dict[str, Any], rank_state: dict[str, Any], keep: int = 2
) -> Path:
    """Writes checkpoint ``step``, its manifest, then points ``latest`` at it; keeps the newest ``keep``.

    A folder of the same tag left by an interrupted save is removed first. Every rank takes part.
    """
    tag = _tag(step)
    d = ckpt_dir / tag
    rank, world = rank_world()
    if rank == 0:
        if latest_tag(ckpt_dir) == tag:
            raise RuntimeError(f"checkpoint {tag} is the one {ckpt_dir / LATEST} names; it is not rewritten")
        if d.exists():
            log.warning("removing %s: an earlier save of step %d that did not finish", d, step)
            shutil.rmtree(d)
    barrier()
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(rank_state, d / RANK_STATE.format(rank=rank))
    barrier()  # every rank's files are written and closed
    names = broadcast_object(tag_files(d) if rank == 0 else None)
    files: dict[str, Any] = {}
    for part in gather_objects(digest_files(d, names[rank::world], sync=True)):  # hashing split over ranks
        files.update(part)
    if rank == 0:
        write_manifest(d, files, step=step, world_size=world)
        _write_latest(ckpt_dir, tag)  # only now: the tag is complete and on disk
        removed = retain(ckpt_dir, keep=keep, step=step, protect={tag})
        if removed:
            log.info("removed old checkpoint(s) %s", ", ".join(removed))
    barrier()
    return d


# ---------------------------------------------------------------------------- resume
def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


def _tag_like(d: Path) -> bool:
    return d.is_dir() and ((d / MANIFEST_NAME).is_file() or any(d.glob("*.pt")))


def resume_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names; None for a fresh run (no checkpoint at all).

    Raises:
        CheckpointError: when there are checkpoints but no ``latest`` (saying how to resume one or
            start fresh), or ``latest`` names no checkpoint.
    """
    tags = sorted(d.name for d in ckpt_dir.iterdir() if _tag_like(d)) if ckpt_dir.is_dir() else []
    tag = latest_tag(ckpt_dir)
    if tag is None:
        if not tags:
            return None
        complete = sorted((s, t) for t in tags if (s := manifest_step(ckpt_dir / t)) is not None)
        how = (
            f"to resume, point it at a complete checkpoint: echo {complete[-1][1]} > {ckpt_dir / LATEST}"
            if complete
            else "none of them is complete (no manifest.json)"
        )
        raise CheckpointError(
            f"{ckpt_dir} holds checkpoint(s) {', '.join(tags)} but no '{LATEST}' file, so it is not known which "
            f"one to resume; {how}; to start fresh, move {ckpt_dir} away or set another train.run_dir"
        )
    if not tag or "/" in tag or not (ckpt_dir / tag).is_dir():
        raise CheckpointError(
            f"{ckpt_dir / LATEST} names checkpoint {tag!r}, which does not exist in {ckpt_dir} "
            f"(checkpoints there: {', '.join(tags) or 'none'}); write an existing tag into it, or "
            f"move {ckpt_dir} away to start fresh"
        )
    return tag


def verify(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Checks every file of the tag before anything loads it: listed in the manifest with its
    size and sha256, and readable weights-only. The files are split over the ranks; every rank
    raises the same error.

    Raises:
        CheckpointError: listing every refused file (and the offending pickled global).
    """
    d = ckpt_dir / tag
    rank, world = rank_world()
    manifest = on_rank0(lambda: read_manifest(d), errors=(CheckpointError,), share=True)
    assert manifest is not None
    if int(manifest.get("world_size", world)) != world:
        raise CheckpointError(
            f"checkpoint {d} was written by {manifest['world_size']} rank(s), this run has {world}: "
            "resuming needs the same number of ranks (the adapter can be merged from it at any "
            "size with tools/merge_adapter.py)"
        )
    names = sorted(manifest["files"])[rank::world]
    problems = file_problems(d, manifest, names) + (unlisted_files(d, manifest) if rank == 0 else [])
    bad = {p.split(": ", 1)[0] for p in problems}
    for n in names:
        if n.endswith(".pt") and str(d / n) not in bad:
            try:
                check_loadable(d / n)
            except CheckpointError as e:
                problems.append(str(e))
    problems = [p for part in gather_objects(problems) for p in part]
    if problems:
        raise CheckpointError(refusal(d, sorted(problems)))
    return manifest


def load(engine: Any, ckpt_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a tag that :func:`verify` passed.

    Returns:
        (client state saved by rank 0, this rank's RNG and data state).

    Raises:
        CheckpointError: when a file is refused or DeepSpeed cannot load the tag.
    """
    rank, _ = rank_world()
    rank_file = ckpt_dir / tag / RANK_STATE.format(rank=rank)
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_state = load_weights_only(rank_file, stand_ins=False)
    return client, rank_state
