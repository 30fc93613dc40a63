"""Communication per optimizer step: MoSA against the dense adapter under ZeRO 1-3, on 2 CPU ranks.

For every ZeRO stage and tower depth, builds the dense adapter (N = 1) and MoSA (N = 4, 8) on the same
frozen tower (the built-in default's: hf-vit width 64, 16 tokens, micro-batch 32 per rank; at the
given numbers of blocks; parallel adapter r 64, share down, as in the default run), and counts the
``torch.distributed`` calls and bytes of whole optimizer steps
(forward, backward, ``engine.step``) in steady state, on each rank. Steps of the variants are
interleaved round-robin, so their step-time ratios are measured side by side. Prints JSON (rank 0's
view plus per-rank counts); ``--out`` also writes it.

    python bench/collectives.py                     # ZeRO 1-3 x 12, 48 blocks x dense, N 4, N 8
    python bench/collectives.py --blocks 4 --rounds 2 --stages 2

Keys: ``calls_ratio_mosa_vs_dense`` and ``bytes_ratio_mosa_vs_dense`` (per stage, worst over the
grid), ``step_time_ratio_mosa_vs_dense_zero2_48_blocks_n8``, ``optimizer_state_bytes_ratio_mosa_vs_dense``
(per stage, worst) beside what the memory contract allows (dense + N bias vectors per split layer),
and ``rows`` (one per stage x blocks x variant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mosa_scale.engine.launch import (
    LaunchFailed,
    bench_zero_config,
    launch_ranks,
    read_rank_rows,
    repo_env,
    write_rank_rows,
)

REPO = Path(__file__).resolve().parents[1]
WIDTH, CLASSES, MICRO, R = 64, 10, 32, 64


def tower_config(blocks: int) -> dict:
    """The built-in default's tower (launchers/configs/digits_default.yaml) at another depth."""
    return dict(
        hidden_size=WIDTH,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        intermediate_size=2 * WIDTH,
        image_size=16,
        patch_size=4,
        initializer_range=0.3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build(stage: int, blocks: int, experts: int, rank: int, world: int):
    import torch

    from mosa_scale.adapters import AdapterConfig, inject_adapters
    from mosa_scale.backbones import BackboneConfig, build_backbone, build_head
    from mosa_scale.engine.deepspeed_engine import initialize
    from mosa_scale.model.assembly import AdaptedClassifier
    from mosa_scale.optim import MoSAAdamW
    from mosa_scale.sparse import Router

    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(family="hf-vit", pooling="mean", hf_config=tower_config(blocks)))
    router = Router(0, "rank", rank, world)
    inject_adapters(
        bb.model,
        bb.sites,
        AdapterConfig(method="parallel", bottleneck=R, num_experts=experts, share="down"),
        seed=0,
        router=router,
        width=WIDTH,
    )
    model = AdaptedClassifier(
        bb.model, build_head("linear", bb.width, CLASSES, generator=torch.Generator().manual_seed(0))
    )
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=1e-3, eps=1e-6)
    engine = initialize(model, opt, None, bench_zero_config(stage, micro=MICRO, world=world))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if stage != 3 else None
    return {
        "engine": engine,
        "router": router,
        "opt": opt,
        "experts": experts,
        "trainable": trainable,
        "image": bb.image.size,
    }


def one_step(v: dict, step: int, rank: int) -> None:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(MICRO, 3, v["image"], v["image"], generator=g)
    y = torch.randint(CLASSES, (MICRO,), generator=g)
    v["router"].begin_step(step)
    with v["router"].forward_pass():
        loss = F.cross_entropy(v["engine"](x), y)
    v["engine"].backward(loss)
    v["engine"].step()


def state_bytes(v: dict) -> int:
    inner = v["engine"].optimizer
    inner = getattr(inner, "optimizer", inner)
    return sum(
        t.numel() * t.element_size()
        for st in inner.state.values()
        for k, t in st.items()
        if k in ("exp_avg", "exp_avg_sq")
    )


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from mosa_scale.engine.collectives import CollectiveCounter
    from mosa_scale.engine.deepspeed_engine import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    variants = [1, *args.experts]
    rows = []
    for stage in args.stages:
        for blocks in args.blocks:
            vs = {n: build(stage, blocks, n, rank, world) for n in variants}
            for v in vs.values():  # warm-up: optimizer state exists, DeepSpeed's first-step work is done
                for s in range(2):
                    one_step(v, s, rank)
            per_step = {n: [] for n in variants}
            times = {n: [] for n in variants}
            for i in range(args.steps + args.rounds):
                order = variants[i % len(variants) :] + variants[: i % len(variants)]  # rotate every round
                for n in order:
                    dist.barrier()
                    with CollectiveCounter() as comm:
                        t0 = time.perf_counter()
                        one_step(vs[n], 2 + i, rank)
                        dt = time.perf_counter() - t0
                    if i < args.steps:
                        per_step[n].append(comm.snapshot())
                    else:
                        times[n].append(dt)
            for n, v in vs.items():
                snaps = per_step[n]
                rows.append(
                    {
                        "stage": stage,
                        "blocks": blocks,
                        "experts": n,
                        "rank": rank,
                        "param_groups": len(v["opt"].param_groups),
                        "calls_per_step": snaps[-1]["total_calls"],
                        "bytes_per_step": snaps[-1]["total_bytes"],
                        "calls_steady": len({s["total_calls"] for s in snaps}) == 1,
                        "calls_by_kind": snaps[-1]["calls"],
                        "step_ms_median": 1e3 * statistics.median(times[n]) if times[n] else None,
                        "optimizer_state_bytes": state_bytes(v),
                        "trainable": v["trainable"],
                    }
                )
            del vs
    write_rank_rows(args.out_dir, rank, rows)


def summarise(rows: list[dict], args: argparse.Namespace) -> dict:
    out: dict = {
        "bench": "collectives",
        "world_size": 2,
        "backend": "gloo (CPU)",
        "width": WIDTH,
        "bottleneck": R,
        "share": "down",
        "micro_batch": MICRO,
        "counted_steps": args.steps,
        "timed_rounds": args.rounds,
        "calls_ratio_mosa_vs_dense": {},
        "bytes_ratio_mosa_vs_dense": {},
        "optimizer_state_bytes_ratio_mosa_vs_dense": {},
        "optimizer_state_bytes_ratio_contract": {},
    }
    key = {(r["stage"], r["blocks"], r["experts"], r["rank"]): r for r in rows}
    for stage in args.stages:
        calls, nbytes, state, contract = [], [], [], []
        for (s, blocks, n, rank), r in key.items():
            if s != stage or n == 1:
                continue
            d = key[(s, blocks, 1, rank)]
            calls.append(r["calls_per_step"] / d["calls_per_step"])
            nbytes.append(r["bytes_per_step"] / d["bytes_per_step"])
            state.append(r["optimizer_state_bytes"] / d["optimizer_state_bytes"])
            # the memory contract: one dense adapter plus N bias vectors per split layer (share down: Up)
            dense_values = blocks * (2 * R * WIDTH + R + 3 * WIDTH) + CLASSES * (WIDTH + 1)
            contract.append(1 + blocks * (n - 1) * WIDTH / dense_values)
        out["calls_ratio_mosa_vs_dense"][f"zero{stage}"] = max(calls)
        out["bytes_ratio_mosa_vs_dense"][f"zero{stage}"] = max(nbytes)
        out["optimizer_state_bytes_ratio_mosa_vs_dense"][f"zero{stage}"] = max(state)
        out["optimizer_state_bytes_ratio_contract"][f"zero{stage}"] = max(contract)
    if args.rounds and 2 in args.stages and 48 in args.blocks and 8 in args.experts:
        t = {n: max(key[(2, 48, n, rank)]["step_ms_median"] for rank in (0, 1)) for n in (1, 8)}
        out["step_time_ratio_mosa_vs_dense_zero2_48_blocks_n8"] = t[8] / t[1]
    out["all_counts_steady"] = all(r["calls_steady"] for r in rows)
    out["rows"] = sorted(rows, key=lambda r: (r["stage"], r["blocks"], r["experts"], r["rank"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--blocks", default="12,48")
    ap.add_argument("--experts", default="4,8")
    ap.add_argument("--steps", type=int, default=3, help="counted steps per variant (counts must not vary)")
    ap.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds after the counted ones")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.stages = [int(s) for s in str(args.stages).split(",")]
    args.blocks = [int(b) for b in str(args.blocks).split(",")]
    args.experts = [int(n) for n in str(args.experts).split(",")]
    if args.worker:
        worker(args)
        return
    env = repo_env(REPO, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = [
            "--worker",
            "--out-dir",
            tmp,
            "--stages",
            ",".join(map(str, args.stages)),
            "--blocks",
            ",".join(map(str, args.blocks)),
            "--experts",
            ",".join(map(str, args.experts)),
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
        ]
        t0 = time.perf_counter()
        try:
            launch_ranks(Path(__file__).resolve(), worker_args, repo=REPO, env=env, what="the 2-rank bench")
        except LaunchFailed as e:
            sys.exit(str(e))
        rows = read_rank_rows(tmp)
    out = summarise(rows, args)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
