"""Launched by tests with ``deepspeed --num_gpus 2``: towers built partitioned (ZeRO-3,
``zero.Init``) against the same towers built replicated, on every rank.

``--phase init``: random init of every tower kind, fp32 and bf16, compared tensor by tensor.
``--phase load``: rank 0 writes checkpoints (an OpenCLIP checkpoint with its text tower, sharded
safetensors with an index, HF ``save_pretrained`` directories); both builds load them.
``--phase train``: the same MoSA / MoSA-LoRA run under ZeRO-3 on a sharded and on a replicated
build: outputs, trained adapter and merged adapter compared.
Writes ``<phase>_rank<r>.json`` to ``--out`` for each of ``--phases``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_towers import TOWERS  # noqa: E402

from mosa_scale.adapters import AdapterConfig  # noqa: E402
from mosa_scale.backbones import build_backbone  # noqa: E402
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict  # noqa: E402
from mosa_scale.config.run import RunConfig, TrainConfig  # noqa: E402
from mosa_scale.engine.collectives import CollectiveCounter  # noqa: E402
from mosa_scale.engine.deepspeed_engine import ZeroShard, full_fp32_params, init_distributed, initialize  # noqa: E402
from mosa_scale.model.assembly import build_model  # noqa: E402
from mosa_scale.optim import MoSAAdamW  # noqa: E402
from mosa_scale.sparse import Router  # noqa: E402

MICRO, STEPS, CLASSES = 4, 3, 5


def ds_config(precision: str = "fp32", **zero) -> dict:
    return {
        "train_batch_size": MICRO * dist.get_world_size(),
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero},
    }


def compare(ref: torch.nn.Module, sharded: torch.nn.Module, shard: ZeroShard) -> dict:
    """Every parameter and buffer of the two builds, gathered; partition sizes of this rank."""
    params = dict(sharded.named_parameters())
    diff, equal, local, total, whole, dtypes = 0.0, True, 0, 0, 0, True
    for name, p in ref.named_parameters():
        q = params[name]
        local += q.ds_tensor.numel()
        total += q.ds_numel
        whole += int(q.numel() > 0)  # outside a gather a partitioned parameter holds nothing
        with shard.gathered([q]):
            dtypes &= q.dtype == p.dtype
            same = q.shape == p.shape and torch.equal(q.data, p.data)
            equal &= same
            if q.shape == p.shape and not same:
                diff = max(diff, float((q.data.float() - p.data.float()).abs().max()))
    bufs = dict(sharded.named_buffers())
    for name, b in ref.named_buffers():
        equal &= torch.equal(b, bufs[name])
    return {
        "equal": bool(equal),
        "max_diff": diff,
        "dtypes_equal": bool(dtypes),
        "local_elems": local,
        "total_elems": total,
        "whole_params_outside_gather": whole,
    }


def phase_init(shard: ZeroShard) -> list[dict]:
    rows = []
    for kind, cfg in TOWERS.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            ref = build_backbone(cfg, dtype=dtype)
            torch.manual_seed(0)
            got = build_backbone(cfg, dtype=dtype, shard=shard)
            rows.append({"kind": kind, "dtype": str(dtype), **compare(ref.model, got.model, shard)})
    return rows


def _full_openclip(cfg) -> torch.nn.Module:
    """The full OpenCLIP model (image and text towers) of a tiny config, random."""
    import open_clip

    from mosa_scale.backbones.openclip import openclip_model_cfg
    from mosa_scale.backbones.timm_towers import TIMM_KWARGS, timm_create_kwargs

    mc = openclip_model_cfg(cfg)
    custom = bool(mc.pop("custom_text", False))
    vision = mc["vision_cfg"]
    with timm_create_kwargs(vision):
        mc["vision_cfg"] = {k: v for k, v in vision.items() if k != TIMM_KWARGS}
        return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**mc)


def write_sharded_safetensors(sd: dict, d: Path, stem: str, parts: int) -> Path:
    """``sd`` split over ``parts`` files plus ``<stem>.safetensors.index.json`` (the HF layout)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(parts):
        name = f"{stem}-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: sd[k].contiguous() for k in keys[i::parts]}
        save_file(chunk, str(d / name))
        weight_map.update(dict.fromkeys(chunk, name))
    index = d / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def write_checkpoints(root: Path) -> dict[str, tuple[str, str]]:
    """Checkpoints of every layout; returns {case: (tower kind, pretrained path)}."""
    from tiny_towers import TINY_HF
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    cases = {}
    torch.manual_seed(11)
    clip = _full_openclip(TOWERS["openclip"]).state_dict()
    torch.save(clip, root / "openclip_full.pt")  # an OpenCLIP checkpoint with its text tower
    cases["openclip_pt_with_text"] = ("openclip", str(root / "openclip_full.pt"))
    write_sharded_safetensors(clip, root / "openclip_sharded", "open_clip_model", 3)
    cases["openclip_sharded_safetensors"] = ("openclip", str(root / "openclip_sharded"))
    for kind in ("siglip", "eva02", "eva02-e"):
        torch.manual_seed(12)
        sd = _full_openclip(TOWERS[kind]).state_dict()
        write_sharded_safetensors(sd, root / kind, "open_clip_model", 2)
        cases[f"{kind}_sharded_safetensors"] = (kind, str(root / kind))
    for kind, (config_cls, model_cls) in {
        "hf-vit": (ViTConfig, ViTModel),
        "hf-clip": (CLIPVisionConfig, CLIPVisionModel),
    }.items():
        torch.manual_seed(13)
        model = model_cls(config_cls(**TINY_HF))
        model.save_pretrained(root / kind)
        cases[f"{kind}_save_pretrained"] = (kind, str(root / kind))
        model.save_pretrained(root / f"{kind}_sharded", max_shard_size="40KB")  # several files + an index
        cases[f"{kind}_save_pretrained_sharded"] = (kind, str(root / f"{kind}_sharded"))
    return cases


def phase_load(shard: ZeroShard, out: Path) -> list[dict]:
    root = out / "ckpts"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        cases = write_checkpoints(root)
        (root / "cases.json").write_text(json.dumps(cases))
    dist.barrier()
    cases = json.loads((root / "cases.json").read_text())
    rows = []
    for case, (kind, path) in sorted(cases.items()):
        for dtype in (torch.float32, torch.bfloat16):
            cfg = dataclasses.replace(TOWERS[kind], pretrained=path)
            torch.manual_seed(1)  # a different random init each build: loading must overwrite all of it
            ref = build_backbone(cfg, dtype=dtype)
            torch.manual_seed(2)
            got = build_backbone(cfg, dtype=dtype, shard=shard)
            tower_bytes = sum(p.numel() * p.element_size() for p in ref.model.parameters())
            rows.append(
                {
                    "case": case,
                    "kind": kind,
                    "dtype": str(dtype),
                    **compare(ref.model, got.model, shard),
                    "bytes_read": got.loaded["bytes_read"],
                    "tower_bytes": tower_bytes,
                    "replicated_bytes_read": ref.loaded["bytes_read"] if ref.loaded else None,
                }
            )
    return rows


TRAIN_CASES = [  # (tower kind, adapter method, training precision)
    ("openclip", "parallel", "fp32"),
    ("openclip", "lora", "fp32"),
    ("hf-vit", "parallel", "fp32"),
    ("hf-clip", "lora", "fp32"),
    ("siglip", "lora", "fp32"),
    ("eva02-e", "parallel", "fp32"),
    ("eva02-e", "lora", "fp32"),
    ("hf-vit", "sequential", "bf16"),
]
# also trained with the low-memory fetch of ds_configs/zero3_lowmem.json: a module's parameters
# all-reduced into one buffer they are views of, instead of all-gathered and copied out
ALL_REDUCE_FETCH = {("openclip", "parallel"), ("eva02-e", "parallel"), ("hf-vit", "sequential")}


def train_once(kind: str, method: str, precision: str, sharded: bool, **zero) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = RunConfig(
        model=TOWERS[kind],
        adapter=AdapterConfig(method=method, bottleneck=8, num_experts=4, share="none", dropout=0.0),
        train=TrainConfig(seed=5, precision=precision),
    )
    ds = ds_config(precision, **zero)
    router = Router(seed=3, scope="rank", rank=rank, world_size=world)
    model, _, _ = build_model(cfg, router, num_classes=CLASSES, shard=ZeroShard(ds) if sharded else None)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.05, lr=1e-2)
    engine = initialize(model, opt, None, ds)
    g = torch.Generator().manual_seed(100 + rank)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    x_eval = torch.randn(MICRO, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(dt)
    engine.module.eval()
    with torch.no_grad():
        before = engine(x_eval).float()
    engine.module.train()
    with CollectiveCounter() as comm:
        for step in range(STEPS):
            x, y = torch.randn(MICRO, 3, 32, 32, generator=g).to(dt), torch.randint(CLASSES, (MICRO,), generator=g)
            router.begin_step(step)
            with router.forward_pass():
                loss = F.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
    engine.module.eval()
    with torch.no_grad():
        logits = engine(x_eval).float()
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    values = full_fp32_params(engine, names)
    buffers = {n: t.cpu() for n, t in adapter_state_dict(engine.module).items() if n not in values}
    merged = merge_state_dict({**buffers, **values})
    return {
        "all_reduce_calls": torch.tensor([comm.calls["all_reduce"]]),
        "logits": logits,
        "moved": (logits - before).abs().max().reshape(1),
        **{f"trained/{k}": v for k, v in values.items()},
        **{f"merged/{k}": v.float() for k, v in merged.items()},
    }


def phase_train() -> list[dict]:
    rows = []
    for kind, method, precision in TRAIN_CASES:
        ref = train_once(kind, method, precision, sharded=False)
        got = train_once(kind, method, precision, sharded=True)
        ref.pop("all_reduce_calls")
        gathered_calls = int(got.pop("all_reduce_calls"))
        diffs = {k: float((ref[k] - got[k]).abs().max()) if ref[k].numel() else 0.0 for k in ref}
        fetch = reduced_calls = None
        if (kind, method) in ALL_REDUCE_FETCH:
            other = train_once(kind, method, precision, sharded=True, stage3_use_all_reduce_for_fetch_params=True)
            reduced_calls = int(other.pop("all_reduce_calls")) - gathered_calls  # the fetches it all-reduced
            fetch = max(float((got[k] - other[k]).abs().max()) if got[k].numel() else 0.0 for k in got)
        rows.append(
            {
                "kind": kind,
                "method": method,
                "precision": precision,
                "same_keys": sorted(ref) == sorted(got),
                "logits_diff": diffs["logits"],
                "trained_diff": max(v for k, v in diffs.items() if k.startswith("trained/")),
                "merged_diff": max(v for k, v in diffs.items() if k.startswith("merged/")),
                "merged_tensors": sum(k.startswith("merged/") for k in ref),
                "logits_moved_by_training": float(ref["moved"]),
                "all_reduce_fetch_diff": fetch,  # against the sharded run's values, all of them
                "all_reduce_fetches": reduced_calls,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phases", default="init,load,train")
    args = ap.parse_args()
    init_distributed()
    for phase in args.phases.split(","):
        if phase == "train":
            rows = phase_train()
        else:
            shard = ZeroShard(ds_config())
            rows = phase_init(shard) if phase == "init" else phase_load(shard, args.out)
        (args.out / f"{phase}_rank{dist.get_rank()}.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
