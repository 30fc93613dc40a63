"""What a checkpoint must satisfy before anything is made from it.

* Its files: every file of the tag against the tag's manifest (size, sha256), before anything is
  unpickled (:func:`verify_files`, through :mod:`mosa_scale.ckpt.manifest`).
* Its content against the run config (:func:`check_checkpoint`): the adapter-defining config
  fields, the routing state, the adapter's structure (names and shapes, from a meta-device build
  of the config), and the seeded partition of every MoSA layer (MOSA_SPEC section 2), read through
  :mod:`mosa_scale.sparse.layout`. Every difference is named at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mosa_scale.adapters.factory import is_adapter_name
from mosa_scale.ckpt.manifest import MANIFEST_NAME, verify_tag
from mosa_scale.config.loader import load_yaml, to_plain
from mosa_scale.config.run import HeadConfig, RunConfig, run_config_from_plain
from mosa_scale.model.assembly import HEAD_PREFIX, TOWER_PREFIX, build_model
from mosa_scale.sparse.layout import bias_partition, layer_prefixes, legacy_structure, read_layer, weight_partition
from mosa_scale.sparse.routing import Router

if TYPE_CHECKING:
    from mosa_scale.ckpt.zero_reader import ZeroCheckpoint

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------- files
def verify_files(tag_dir: Path, *, unverified: bool = False) -> None:
    """Checks every file of a tag against its manifest (:func:`~mosa_scale.ckpt.manifest.verify_tag`).

    Args:
        tag_dir: The tag folder.
        unverified: Accept a tag that has no manifest (written before mosa_scale wrote manifests),
            with a warning; a tag that has one is always verified.

    Raises:
        CheckpointError: when the manifest is missing (and not ``unverified``) or a file is
            missing, truncated, altered or unlisted.
    """
    if unverified and not (tag_dir / MANIFEST_NAME).is_file():
        log.warning(
            "%s has no %s (written before mosa_scale wrote manifests): reading it unverified, weights-only; "
            "damage that leaves its files loadable cannot be detected",
            tag_dir,
            MANIFEST_NAME,
        )
        return
    verify_tag(tag_dir)


# ---------------------------------------------------------------------------- config
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


def router_differences(router: Mapping[str, Any] | None, cfg: RunConfig) -> list[str]:
    if not router:
        return []
    out = []
    if router.get("seed") != cfg.train.seed:
        out.append(f"train.seed: checkpoint routing seed {router.get('seed')!r}, config {cfg.train.seed!r}")
    if router.get("scope") != cfg.routing.scope:
        out.append(f"routing.scope: checkpoint {router.get('scope')!r}, config {cfg.routing.scope!r}")
    return out


# ---------------------------------------------------------------------------- MoSA partitions
def partition_differences(state: Mapping[str, torch.Tensor], cfg: RunConfig) -> list[str]:
    """Compares every MoSA layer's saved ``assign`` (and ``bias_assign``) with the seeded partition
    (train.seed, the layer's name, adapter.mode, N) the config gives it."""
    a = cfg.adapter
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
            expected = weight_partition(dims, n, seed=cfg.train.seed, name=name, mode=a.mode)
        except ValueError as e:
            out.append(f"{p}: {e}")
            continue
        if not torch.equal(saved.to(expected.dtype), expected):
            bad = int((saved.to(expected.dtype) != expected).sum())
            out.append(
                f"{p}: partition differs in {bad} of {expected.numel()} entries from the one train.seed="
                f"{cfg.train.seed}, adapter.mode={a.mode!r}, N={n} give (the run used another seed, mode or N)"
            )
        has_split_bias = layer.bias_assign is not None
        if has_split_bias != a.split_bias and layer.biases is not None:
            out.append(f"{p}: adapter.split_bias: config {a.split_bias}, checkpoint {has_split_bias}")
        elif has_split_bias:
            eb = bias_partition(dims[0], n, seed=cfg.train.seed, name=name)
            if not torch.equal(layer.bias_assign.to(eb.dtype), eb):
                out.append(f"{p}: bias partition differs from the one train.seed={cfg.train.seed}, N={n} give")
    return out


# ---------------------------------------------------------------------------- structure
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


# ---------------------------------------------------------------------------- all at once
def check_checkpoint(
    ckpt: ZeroCheckpoint, cfg: RunConfig, *, run_cfg: RunConfig | None = None, skeleton: Skeleton | None = None
) -> None:
    """Refuses a checkpoint that does not match ``cfg``, naming every difference at once.

    Args:
        ckpt: The checkpoint read by :func:`~mosa_scale.ckpt.zero_reader.read_zero_checkpoint`.
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
        expected = legacy_structure(skeleton.shapes) if ckpt.legacy_layout else skeleton.shapes
        diffs += structure_differences(expected, {k: tuple(v.shape) for k, v in state.items()})
    diffs += partition_differences(state, cfg)
    head = state.get(f"{HEAD_PREFIX}weight")
    if head is not None and cfg.data.num_classes is not None and head.shape[0] != cfg.data.num_classes:
        diffs.append(f"data.num_classes: config {cfg.data.num_classes}, checkpoint head {head.shape[0]}")
    if diffs:
        raise CheckpointMismatch(diffs)
