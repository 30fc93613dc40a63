"""Using a merged adapter outside mosa_scale's training code.

* :func:`attach_merged_adapter`: the one documented way to put a merged adapter (any method) into
  an unmodified backbone: an OpenCLIP visual tower or CLIP model, an HF ``ViTModel`` /
  ``CLIPVisionModel``, or mosa_scale's own feature model. It adds the plain dense adapter modules
  (``num_experts=1``: no MoSA code runs) and loads the merged tensors.
* :func:`export_peft`: a merged LoRA / MoSA-LoRA on an HF backbone in PEFT's LoRA format
  (``adapter_config.json`` + ``adapter_model.safetensors``) for ``PeftModel.from_pretrained``.
* :func:`fold_lora`: a merged LoRA added into the backbone's own weights (``W += s * B @ A``), so
  the plain model can be saved with ``save_pretrained`` (HF) or ``state_dict`` (OpenCLIP).

Adapter keys are relative to the classifier the run trained: ``tower.<prefix>.<path>`` where
``<prefix>`` is the feature model's attribute holding the library tower (``vit``,
``vision_model``, ``visual``) and ``<path>`` the module path inside the library tower.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mosa_scale.adapters import AdapterConfig, inject_adapters, is_adapter_name
from mosa_scale.adapters.inject import InjectionReport
from mosa_scale.backbones import ZeroShotHead, build_backbone
from mosa_scale.backbones.base import stream_width
from mosa_scale.ckpt.adapter_file import MANIFEST, AdapterFileError, read_adapter, staging_folder
from mosa_scale.ckpt.verify import skeleton_config
from mosa_scale.config.run import HeadConfig, RunConfig, run_config_from_plain
from mosa_scale.model.assembly import HEAD_PREFIX, TOWER_PREFIX, build_model
from mosa_scale.sparse.layout import holds_unmerged

log = logging.getLogger(__name__)

PEFT_CONFIG, PEFT_WEIGHTS, HEAD_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "head.safetensors"
_LORA_A = re.compile(r"^tower\.(?P<prefix>[^.]+)\.(?P<path>.+)\.mosa_lora(?:_(?P<slot>[qv]))?\.a\.weight$")


def load_merged(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], RunConfig]:
    """Reads a merged adapter (header, checksums and values verified) and its run config.

    Raises:
        ValueError: when the adapter is an unmerged MoSA state, or its files are damaged,
            inconsistent or hold non-finite values (:class:`AdapterFileError`).
        FileNotFoundError: when a file is missing.
    """
    state, manifest = read_adapter(adapter_dir)
    if manifest.get("format") == "unmerged" or holds_unmerged(state):
        raise ValueError(
            f"{adapter_dir}: an unmerged MoSA state; merge it first "
            "(tools/merge_adapter.py CHECKPOINT --out DIR), then use DIR"
        )
    if not isinstance(manifest.get("config"), dict):
        raise AdapterFileError(f"{Path(adapter_dir) / MANIFEST}: has no run 'config'; not a mosa_scale adapter")
    return state, manifest, run_config_from_plain(manifest["config"])


def dense_view(cfg: RunConfig) -> AdapterConfig:
    """The adapter config as the merged adapter holds it: a plain dense adapter (``num_experts=1``)."""
    return dataclasses.replace(cfg.adapter, num_experts=1, experts_per_block={}, mosa_blocks=None)


def expected_shapes(
    cfg: RunConfig, num_classes: int, hf_config: Mapping[str, Any] | None = None
) -> dict[str, tuple[int, ...]] | None:
    """The merged (dense) adapter tensors and head weight ``cfg`` builds, from a meta-device
    skeleton (nothing allocated); None when the backbone's architecture is not known here."""
    sk = skeleton_config(cfg, hf_config)
    if sk is None:
        return None
    sk = dataclasses.replace(
        sk, adapter=dense_view(sk), head=HeadConfig()
    )  # a zero-shot head has the same weight shape
    with torch.device("meta"):  # the adapters' and head's init draws too: shapes only, whatever the sizes
        model, _, _ = build_model(sk, None, num_classes=num_classes, meta=True)
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if is_adapter_name(k) and (not k.startswith(HEAD_PREFIX) or k == f"{HEAD_PREFIX}weight")
    }


def check_fits(
    adapter_dir: str | Path,
    state: Mapping[str, torch.Tensor],
    manifest: Mapping[str, Any],
    cfg: RunConfig,
    hf_config: Mapping[str, Any] | None = None,
) -> int:
    """Checks a merged adapter's tensors against the model its manifest's config builds, on the meta
    device, before any module is allocated; returns the number of classes.

    Raises:
        AdapterFileError: naming the tensors that are missing, unexpected or of another shape.
    """
    num_classes = manifest.get("num_classes")
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise AdapterFileError(f"{Path(adapter_dir) / MANIFEST}: num_classes {num_classes!r} is not a positive int")
    expected = expected_shapes(cfg, num_classes, hf_config)
    if expected is None:
        return num_classes
    have = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(HEAD_PREFIX) or k == f"{HEAD_PREFIX}weight"}
    diffs = [f"{k}: missing" for k in sorted(set(expected) - set(have))]
    diffs += [f"{k}: not built by its config" for k in sorted(set(have) - set(expected))]
    diffs += [
        f"{k}: {have[k]} in the file, {expected[k]} from its config"
        for k in sorted(set(have) & set(expected))
        if have[k] != expected[k]
    ]
    if diffs:
        raise AdapterFileError(
            f"{adapter_dir}: the tensors do not fit the model its adapter_config.json builds "
            f"({len(diffs)} difference(s)): " + "; ".join(diffs[:6])
        )
    return num_classes


def feature_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The feature model's attribute holding the library tower (``vit``, ``vision_model``, ``visual``)."""
    prefixes = {k.split(".")[1] for k in state if k.startswith(TOWER_PREFIX) and is_adapter_name(k)}
    if len(prefixes) != 1:
        raise ValueError(f"the adapter's tensors are not under one tower prefix: {sorted(prefixes)}")
    return prefixes.pop()


def _path_mapper(model: nn.Module, prefix: str, probes: list[str]) -> Callable[[str], str]:
    """Maps a path inside the library tower to a path inside ``model``, which is either the
    library tower itself or a module holding it under ``prefix`` (feature model, OpenCLIP CLIP).

    Raises:
        ValueError: when neither fits, naming a module it looked for.
    """
    for mapper in (lambda p: p, lambda p: f"{prefix}.{p}"):
        try:
            for p in probes:
                model.get_submodule(mapper(p))
            return mapper
        except AttributeError:
            continue
    raise ValueError(
        f"{type(model).__name__} has no module {probes[0]!r} (nor {prefix}.{probes[0]!r}): pass the "
        "unmodified backbone the adapter was trained on (HF ViTModel / CLIPVisionModel, OpenCLIP visual "
        "tower or CLIP model, or mosa_scale's feature model)"
    )


def _atomic_files(
    out_dir: str | Path, tensors: Mapping[str, Mapping[str, torch.Tensor]], texts: Mapping[str, str]
) -> Path:
    """Writes safetensors and JSON files into ``out_dir`` through temp files and ``os.replace``;
    on error no file of this call is left."""
    with staging_folder(out_dir) as (out, tmp):
        for name, t in tensors.items():
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in t.items()}, str(tmp / name), metadata={"format": "pt"}
            )
        for name, text in texts.items():
            (tmp / name).write_text(text)
        for name in [*tensors, *texts]:
            os.replace(tmp / name, out / name)
    return out


# ---------------------------------------------------------------------------- LoRA
@dataclass(frozen=True)
class LoRAFactors:
    """One merged LoRA term ``scale * B @ A`` on a projection of the library tower.

    Attributes:
        path: Module path inside the library tower (an ``nn.Linear``, or the fused attention).
        slot: None for an ``nn.Linear``; ``q`` / ``v`` for a slice of a fused in-projection.
        a: ``(r, in)``.
        b: ``(out, r)``.
        scale: The LoRA scale s.
    """

    path: str
    slot: str | None
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def lora_factors(state: Mapping[str, torch.Tensor], cfg: RunConfig) -> list[LoRAFactors]:
    """The merged LoRA terms of a ``lora`` adapter.

    Raises:
        ValueError: for another adapter method or an incomplete LoRA term.
    """
    if cfg.adapter.method != "lora":
        raise ValueError(
            f"adapter.method is {cfg.adapter.method!r}, not 'lora': there is no LoRA term to export or "
            "fold; put the adapter into the backbone with attach_merged_adapter(backbone, adapter_dir)"
        )
    scale = 1.0 if cfg.adapter.scale is None else float(cfg.adapter.scale)
    out = []
    for key in sorted(state):
        m = _LORA_A.match(key)
        if m is None:
            continue
        b_key = key[: -len(".a.weight")] + ".b.weight"
        if b_key not in state:
            raise ValueError(f"LoRA term {key} has no {b_key}")
        out.append(
            LoRAFactors(path=m["path"], slot=m["slot"], a=state[key].float(), b=state[b_key].float(), scale=scale)
        )
    if not out:
        raise ValueError("the adapter holds no LoRA factors (keys ending in mosa_lora.a.weight)")
    return out


def peft_lora_config(factors: list[LoRAFactors], *, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for these factors: ``scaling = lora_alpha / r = s``."""
    ranks = {f.a.shape[0] for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks differ between projections ({sorted(ranks)}); PEFT export needs one rank")
    r = ranks.pop()
    alpha = factors[0].scale * r
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
        "target_modules": sorted(f.path for f in factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }


def export_peft(adapter_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Writes a merged LoRA / MoSA-LoRA in PEFT's LoRA format.

    ``out_dir`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (for
    ``PeftModel.from_pretrained(ViTModel or CLIPVisionModel, out_dir)``) and ``head.safetensors``
    (the trained classification head, ``weight``/``bias``: PEFT's model has no head).

    Args:
        adapter_dir: A merged adapter directory.
        out_dir: Output folder.
        base_model_name_or_path: Recorded in the PEFT config (default: the backbone source).

    Raises:
        ValueError: for a non-LoRA adapter, a non-HF backbone (OpenCLIP's fused attention is not a
            PEFT target: use :func:`fold_lora` or :func:`attach_merged_adapter`) or an unmerged state.
    """
    state, manifest, cfg = load_merged(adapter_dir)
    factors = lora_factors(state, cfg)
    if any(f.slot is not None for f in factors) or cfg.model.family not in ("hf-vit", "hf-clip"):
        raise ValueError(
            f"backbone family {cfg.model.family!r}: PEFT export targets the separate q/v projections of "
            "HF towers; fold the LoRA into the weights (fold_lora) or use attach_merged_adapter"
        )
    source = manifest.get("backbone", {}).get("source")
    config = peft_lora_config(
        factors, base_model_name_or_path=base_model_name_or_path or (None if source in (None, "random") else source)
    )
    tensors = {}
    for f in factors:
        tensors[f"base_model.model.{f.path}.lora_A.weight"] = f.a
        tensors[f"base_model.model.{f.path}.lora_B.weight"] = f.b
    files: dict[str, Mapping[str, torch.Tensor]] = {PEFT_WEIGHTS: tensors}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if head:
        files[HEAD_WEIGHTS] = head
    out = _atomic_files(out_dir, files, {PEFT_CONFIG: json.dumps(config, indent=2, sort_keys=True)})
    log.info("PEFT LoRA (%d modules, r=%d) written to %s", len(factors), config["r"], out)
    return out


@torch.no_grad()
def fold_lora(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Adds a merged LoRA / MoSA-LoRA into an unmodified backbone's weights, in place.

    Each target gets ``W += s * B @ A`` (computed in fp32): an ``nn.Linear``'s ``weight`` (HF),
    or the q / v rows of a fused ``in_proj_weight`` (OpenCLIP). The result is a plain model:
    save it with ``save_pretrained`` (HF) or its ``state_dict`` (OpenCLIP).

    Args:
        model: The library tower (HF ``ViTModel`` / ``CLIPVisionModel``, OpenCLIP visual tower),
            a model holding it under the feature prefix (OpenCLIP CLIP), or the feature model.
        adapter_dir: A merged LoRA adapter directory.

    Returns:
        The qualified names of the weights changed.

    Raises:
        ValueError: for a non-LoRA adapter or a backbone without the adapter's projections.
    """
    state, _, cfg = load_merged(adapter_dir)
    factors = lora_factors(state, cfg)
    mapper = _path_mapper(model, feature_prefix(state), [f.path for f in factors])
    changed = []
    for f in factors:
        target = model.get_submodule(mapper(f.path))
        delta = (f.b @ f.a) * f.scale  # (out, r) @ (r, in) -> (out, in)
        if f.slot is None:
            w, name = target.weight, f"{mapper(f.path)}.weight"
        else:  # fused (3D, D) in-projection: q rows [0, D), v rows [2D, 3D)
            d = target.embed_dim
            start = 0 if f.slot == "q" else 2 * d
            w, name = target.in_proj_weight[start : start + d], f"{mapper(f.path)}.in_proj_weight[{f.slot}]"
        if tuple(w.shape) != tuple(delta.shape):
            raise ValueError(f"{name}: shape {tuple(w.shape)}, LoRA term {tuple(delta.shape)}")
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        changed.append(name)
    log.info("folded %d LoRA terms into %s", len(changed), type(model).__name__)
    return changed


# ---------------------------------------------------------------------------- any method
def _library_config(model: nn.Module) -> dict[str, Any] | None:
    """An HF model's architecture (``config.to_dict()``), from the model or the tower it wraps."""
    for m in (model, getattr(model, "tower", None)):
        conf = getattr(m, "config", None)
        if conf is not None and hasattr(conf, "to_dict"):
            return conf.to_dict()
    return None


def attach_merged_adapter(backbone_or_model: Any, adapter_dir: str | Path) -> nn.Module | None:
    """Puts a merged adapter into an unmodified backbone, in place; returns the trained head.

    The adapter's modules are built as plain dense adapters (``num_experts=1``, no MoSA code)
    from the adapter config in the manifest, injected into the backbone's blocks exactly as in
    training, and loaded with the merged tensors. Then ``head(model(pixels))`` are the logits when
    ``model`` is mosa_scale's feature model; for a library tower, pool its output as the run's
    ``model.pooling`` says first. Call ``model.eval()`` for inference (adapters have dropout).

    Args:
        backbone_or_model: A :class:`~mosa_scale.backbones.Backbone` (its ``model`` is used), a
            feature model, an HF ``ViTModel`` / ``CLIPVisionModel``, an OpenCLIP visual tower, or an
            OpenCLIP ``CLIP`` model; built with the weights the adapter was trained on.
        adapter_dir: A merged adapter directory (``adapter.safetensors`` + ``adapter_config.json``).

    Returns:
        The classification head (``nn.Linear``, or ``ZeroShotHead`` for a zero-shot run) with the
        trained weights, on the backbone's device; None when the adapter has no head.

    Raises:
        ValueError: for an unmerged state, a backbone without the adapter's blocks, or tensors
            that do not fit the built adapter (naming them).
    """
    model = getattr(backbone_or_model, "model", backbone_or_model)
    state, manifest, cfg = load_merged(adapter_dir)
    check_fits(adapter_dir, state, manifest, cfg, _library_config(model))
    prefix = feature_prefix(state)
    sk = skeleton_config(cfg, _library_config(model))
    if sk is None:
        raise ValueError(f"cannot tell the block layout of {cfg.model.pretrained!r}: pass the HF model itself")
    sites = build_backbone(sk.model, meta=True).sites  # relative to the feature model: "<prefix>.<path>"
    strip = len(prefix) + 1
    mapper = _path_mapper(model, prefix, [s.block[strip:] for s in sites])
    sites = [
        dataclasses.replace(
            s,
            **{
                f.name: mapper(getattr(s, f.name)[strip:])
                for f in dataclasses.fields(s)
                if getattr(s, f.name) is not None
            },
        )
        for s in sites
    ]
    width = stream_width(model, sites[0])
    report: InjectionReport = inject_adapters(
        model, sites, dense_view(cfg), seed=cfg.train.seed, router=None, width=width
    )
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    for row in report.rows:
        model.get_submodule(row["module"]).to(device)
    tensors = {mapper(k[len(TOWER_PREFIX) + strip :]): v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if is_adapter_name(k)]
    if missing or unexpected:
        raise ValueError(
            f"{adapter_dir} does not fit the adapter its config builds: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; the backbone differs from the one it was trained on"
        )
    head_state = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if "weight" not in head_state:
        return None
    w = head_state["weight"]
    head_cls = ZeroShotHead if cfg.head.kind == "zeroshot" else nn.Linear
    head = head_cls(w.shape[1], w.shape[0], bias="bias" in head_state)
    head.load_state_dict(head_state)
    log.info(
        "attached %s adapter (%d modules) from %s; manifest step %s",
        cfg.adapter.method,
        len(report.rows),
        adapter_dir,
        manifest.get("step"),
    )
    return head.to(device)
