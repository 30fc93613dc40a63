"""Per-rank model-state bytes of MoSA and the dense adapter under ZeRO 0-3, 2 ranks (prints JSON).

Launches itself with ``deepspeed --num_gpus 2`` (CPU ranks on gloo when there is no GPU). Each
rank builds the same small frozen HF ViT with a parallel adapter (r 64, share down; N = 1 and
N = 4), wraps it in a DeepSpeed engine per ZeRO stage, runs one step per expert so every slice
has optimizer state, and counts the bytes each rank holds:

* ``trainable_param_bytes`` / ``frozen_param_bytes``: module parameters (ZeRO-3: the rank's
  partition ``ds_tensor``);
* ``fp32_master_bytes``: ZeRO's fp32 partitions (stage 0 trains the module's own fp32 values);
* ``optimizer_state_bytes``: Adam moments and step counts of the inner optimizer;
* ``gradient_bytes``: gradients held after backward, before the step (stage 0: full ``.grad``;
  stage 1/2: ``.grad`` left on the module plus the rank's reduced partitions; stage 3: the flat
  partition buffer). ZeRO's reduce buckets (``reduce_bucket_size``) are not counted.

    python bench/zero_memory.py [--experts 4] [--micro 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mosa_scale.engine.launch import LaunchFailed, bench_zero_config, launch_ranks, read_rank_rows, write_rank_rows

REPO = Path(__file__).resolve().parents[1]
TOWER = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    image_size=32,
    patch_size=8,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
CLASSES = 100


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def measure(stage: int, experts: int, micro: int, rank: int, world: int) -> dict:
    from mosa_scale.adapters import AdapterConfig, inject_adapters
    from mosa_scale.backbones import BackboneConfig, build_backbone, build_head
    from mosa_scale.engine.deepspeed_engine import initialize
    from mosa_scale.model.assembly import AdaptedClassifier
    from mosa_scale.optim import MoSAAdamW
    from mosa_scale.sparse import Router
    from mosa_scale.sparse.routing import Window

    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(family="hf-vit", pooling="mean", hf_config=TOWER))
    router = Router(0, "global", rank, world)
    inject_adapters(
        bb.model,
        bb.sites,
        AdapterConfig(method="parallel", bottleneck=64, num_experts=experts, share="down"),
        seed=0,
        router=router,
        width=TOWER["hidden_size"],
    )
    head = build_head("linear", bb.width, CLASSES, generator=torch.Generator().manual_seed(0))
    model = AdaptedClassifier(bb.model, head)
    trainable_elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=1e-3, eps=1e-6)
    ds = bench_zero_config(stage, micro=micro, world=world, stage3_param_persistence_threshold=0)
    engine = initialize(model, opt, None, ds)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(micro, 3, 32, 32, generator=g), torch.randint(CLASSES, (micro,), generator=g)
    routes = len(router.num_experts)
    grads = 0
    for k in range(max(experts, 1)):  # expert k everywhere: every slice gets its optimizer state
        counts = torch.zeros((routes, max(router.num_experts, default=1)), dtype=torch.int64)
        counts[:, k] = world
        router.window = Window(
            step=k,
            choices=torch.full((1, 1, world, routes), k, dtype=torch.int64),
            counts=counts,
            active=frozenset((r, k) for r in range(routes)),
        )
        with router.forward_pass():
            loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        inner = engine.optimizer
        grads = sum(p.grad.nbytes for p in engine.module.parameters() if p.grad is not None)
        if stage in (1, 2):
            grads += _tensor_bytes(inner.averaged_gradients)
        if stage == 3:
            grads = inner.grad_partitions_flat_buffer.nbytes
        engine.step()
    params = list(engine.module.parameters())

    def held(p):
        return p.ds_tensor.nbytes if hasattr(p, "ds_tensor") else p.nbytes

    if stage == 0:
        master, state = 0, _tensor_bytes(list(opt.state.values()))
    else:
        inner = engine.optimizer
        flat = inner.fp32_partitioned_groups_flat if stage == 3 else inner.single_partition_of_fp32_groups
        master = _tensor_bytes(flat)
        state = _tensor_bytes(list(inner.optimizer.state.values()))
    out = {
        "stage": stage,
        "variant": "dense" if experts == 1 else f"mosa_n{experts}",
        "rank": rank,
        "trainable_elements": trainable_elements,
        "trainable_param_bytes": sum(held(p) for p in params if p.requires_grad),
        "frozen_param_bytes": sum(held(p) for p in params if not p.requires_grad),
        "fp32_master_bytes": master,
        "optimizer_state_bytes": state,
        "gradient_bytes": grads,
        "param_groups": len(opt.param_groups),
    }
    out["model_state_bytes"] = out["trainable_param_bytes"] + master + state + grads
    del engine
    return out


def worker(args: argparse.Namespace) -> None:
    from mosa_scale.engine.deepspeed_engine import init_distributed

    init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [measure(s, n, args.micro, rank, world) for s in (0, 1, 2, 3) for n in (1, args.experts)]
    write_rank_rows(args.out, rank, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = ["--worker", "--out", tmp, "--experts", str(args.experts), "--micro", str(args.micro)]
        try:
            launch_ranks(__file__, worker_args, repo=REPO)
        except LaunchFailed as e:
            sys.exit(str(e))
        rows = read_rank_rows(tmp)
    mosa = f"mosa_n{args.experts}"
    summary = {}
    for stage in (0, 1, 2, 3):
        per = {v: [r for r in rows if r["stage"] == stage and r["variant"] == v] for v in ("dense", mosa)}
        summary[f"zero{stage}"] = {
            v: {
                k: [r[k] for r in sorted(rs, key=lambda r: r["rank"])]
                for k in (
                    "model_state_bytes",
                    "trainable_param_bytes",
                    "fp32_master_bytes",
                    "optimizer_state_bytes",
                    "gradient_bytes",
                    "frozen_param_bytes",
                )
            }
            for v, rs in per.items()
        }
        summary[f"zero{stage}"]["model_state_ratio_mosa_vs_dense"] = max(
            r["model_state_bytes"] for r in per[mosa]
        ) / max(r["model_state_bytes"] for r in per["dense"])
        summary[f"zero{stage}"]["optimizer_state_ratio_mosa_vs_dense"] = sum(
            r["optimizer_state_bytes"] for r in per[mosa]
        ) / sum(r["optimizer_state_bytes"] for r in per["dense"])
    print(
        json.dumps(
            {
                "bench": "zero_memory",
                "ranks": 2,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "tower": "hf-vit " + json.dumps(TOWER),
                "adapter": "parallel r64 share=down",
                "trainable_elements": {r["variant"]: r["trainable_elements"] for r in rows if r["rank"] == 0},
                "per_rank_bytes": summary,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
