"""One MoSA step on a huge frozen tower under ZeRO-3 on 2 ranks, built partitioned (prints JSON).

Peak host RSS per rank, build / load / step times, and the planner's prediction beside each, for
(1) a random-init tower built under ``zero.Init`` and (2) the same tower loaded from a sharded
safetensors checkpoint (with a text-tower tensor that is never read) that this script writes.
Each part runs in its own processes, so each peak is its own:

    python bench/huge_tower.py                          # EVA02-E-14, bf16 tower, 56 px, micro-batch 1
    python bench/huge_tower.py --model ViT-bigG-14 --image-size 56

Adapter: parallel, r 64, N 4 (share down); fp32 adapters on the bf16 tower; ZeRO-3 settings from
``--zero-config`` (default ``ds_configs/zero3.json``). Time predictions use this machine's
measured bf16 matmul rate and all-gather bandwidth; memory predictions add each rank's resident
size after start-up (libraries) to the planner's bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mosa_scale.engine.launch import LaunchFailed, launch_ranks, repo_env

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def rss() -> dict[str, int]:
    """Current and peak resident bytes of this process."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def new_peak() -> int:
    """Returns cached free memory to the system and restarts the peak; returns the resident bytes now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return rss()["VmRSS"]


def run_config(args: argparse.Namespace, pretrained: str | None):
    from mosa_scale.adapters import AdapterConfig
    from mosa_scale.backbones import BackboneConfig
    from mosa_scale.config.run import DataConfig, RunConfig, TrainConfig

    return RunConfig(
        model=BackboneConfig(
            family="openclip", name=args.model, precision="bf16", image_size=args.image_size, pretrained=pretrained
        ),
        adapter=AdapterConfig(method="parallel", bottleneck=64, num_experts=4, share="down"),
        data=DataConfig(image_size=args.image_size),
        train=TrainConfig(
            micro_batch=args.micro, global_batch=2 * args.micro, precision="fp32", zero_config=args.zero_config
        ),
    )


def worker(args: argparse.Namespace) -> None:
    """One rank: build (partitioned), load, initialize, one training step; peaks per stage."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from mosa_scale.engine.deepspeed_engine import deepspeed_config, init_distributed, initialize, tower_shard
    from mosa_scale.model.assembly import build_model
    from mosa_scale.optim import MoSAAdamW
    from mosa_scale.sparse import Router

    init_distributed()
    import open_clip  # noqa: F401  (libraries the build imports: part of the start-up size, not the model's)
    import timm  # noqa: F401

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"rank": rank}
    # measured before the bandwidth test: gloo's thread frees a finished collective's buffers
    # only once it takes the interpreter lock, which can be after the test
    out["baseline_rss"] = new_peak()  # libraries and process group: not the model's
    # this machine's all-gather bandwidth (bf16, 256 MB gathered), for the time prediction
    part = torch.ones(64 * 2**20 // world, dtype=torch.bfloat16)
    full = torch.empty(part.numel() * world, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(full, part)
    t0 = time.perf_counter()
    for _ in range(3):
        dist.all_gather_into_tensor(full, part)
    out["allgather_gbs"] = 3 * full.numel() * 2 / (time.perf_counter() - t0) / GB
    del part, full
    dist.barrier()
    new_peak()
    cfg = run_config(args, args.ckpt if args.part == "pretrained" else None)
    ds = deepspeed_config(cfg, world)
    router = Router(cfg.train.seed, cfg.routing.scope, rank, world)
    t0 = time.perf_counter()
    model, backbone, _ = build_model(cfg, router, num_classes=args.classes, shard=tower_shard(ds))
    out["build_s"] = time.perf_counter() - t0
    out["load_s"] = backbone.loaded["seconds"] if backbone.loaded else None
    out["bytes_read"] = backbone.loaded["bytes_read"] if backbone.loaded else None
    out["build_peak_rss"], out["after_build_rss"] = rss()["VmHWM"], new_peak()
    out["tower_partition_bytes"] = sum(
        p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters() if hasattr(p, "ds_tensor")
    )
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=1e-3, eps=1e-6)
    t0 = time.perf_counter()
    engine = initialize(model, opt, None, ds)
    out["initialize_s"] = time.perf_counter() - t0
    out["initialize_peak_rss"], out["after_initialize_rss"] = rss()["VmHWM"], new_peak()
    g = torch.Generator().manual_seed(rank)
    for step in range(2):  # the first step records DeepSpeed's trace; prefetch and reuse start in the second
        x = torch.randn(args.micro, 3, args.image_size, args.image_size, generator=g)
        y = torch.randint(args.classes, (args.micro,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        router.begin_step(step)
        with router.forward_pass():
            loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        dist.barrier()
        key = "step" if step == 0 else "second_step"
        out[f"{key}_s"] = time.perf_counter() - t0
        out[f"{key}_peak_rss"] = rss()["VmHWM"]
        out[f"{key}_loss"] = float(loss)
        new_peak()
    out["loss"] = out.pop("step_loss")
    Path(args.out, f"{args.part}_rank{rank}.json").write_text(json.dumps(out))


def write_checkpoint(args: argparse.Namespace) -> None:
    """A sharded safetensors checkpoint of the image tower (seeded random bf16 values, shards of at
    most ``--shard-gb``) plus a text-tower tensor, written one shard at a time."""
    from safetensors.torch import save_file

    from mosa_scale.backbones import build_backbone
    from mosa_scale.backbones.weights import state_tensors

    cfg = run_config(args, None).model
    skeleton = build_backbone(cfg, meta=True)
    entries = [(name, tuple(t.shape)) for name, t in state_tensors(skeleton.model)]
    entries.append(("text.token_embedding.weight", (49408, 1024)))  # a CLIP text tower's: never read
    d = Path(args.ckpt)
    d.mkdir(parents=True, exist_ok=True)
    t0, shard, size, files, weight_map = time.perf_counter(), {}, 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, files
        if shard:
            files += 1
            name = f"open_clip_model-{files:05d}.safetensors"
            save_file(shard, str(d / name))
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for i, (name, shape) in enumerate(entries):
        g = torch.Generator().manual_seed(i)
        t = torch.randn(shape, generator=g).mul_(0.02) if len(shape) > 1 else torch.ones(shape)
        t = t.to(torch.bfloat16)
        if size + t.numel() * 2 > args.shard_gb * GB:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    (d / "open_clip_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    print(
        json.dumps(
            {
                "write_s": time.perf_counter() - t0,
                "files": files,
                "bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
            }
        )
    )


def matmul_gflops(width: int, tokens: int) -> float:
    """bf16 matmul rate of one core at the tower's shapes (the ranks get one core each)."""
    torch.set_num_threads(1)
    a = torch.randn(tokens, width, dtype=torch.bfloat16)
    w = torch.randn(4 * width, width, dtype=torch.bfloat16)
    a @ w.T
    t0, n = time.perf_counter(), 5
    for _ in range(n):
        a @ w.T
    return n * 2 * tokens * width * 4 * width / (time.perf_counter() - t0) / 1e9


def predictions(args: argparse.Namespace, gflops: float, allgather_gbs: float) -> dict:
    """The planner's per-rank numbers (bytes above the start-up resident size, seconds)."""
    from mosa_scale.backbones import build_backbone
    from mosa_scale.plan import Hardware, plan_run

    cfg = run_config(args, None)
    hw = Hardware(
        name="cpu",
        memory_gib=1e6,
        peak_tflops=gflops / 1e3,
        mfu=1.0,
        intra_node_gbs=allgather_gbs,
        gpus_per_node=2,
        overhead_gib=0.0,
    )
    p = plan_run(cfg, world_size=2, hardware=hw, num_classes=args.classes, stages=(2, 3))
    s3, s2 = p["stages"]["3"], p["stages"]["2"]
    skeleton = build_backbone(cfg.model, meta=True)
    largest = max(t.numel() for t in skeleton.model.parameters())
    tower = s3["memory_bytes"]["tower"]
    return {
        "tower_params": p["tower_params"],
        "trainable_params": p["trainable_params"],
        # construction: the partition, plus the largest parameter whole (created in fp32, cast to bf16)
        "build_bytes": tower + largest * (4 + 2),
        # loading: the partition, plus this rank's rows of the largest tensor as read
        "load_bytes": tower + math.ceil(largest / 2) * 2,
        "step_bytes": s3["memory_bytes"]["total"],
        "step_s": s3["time_s"]["step"],
        "step_compute_s": s3["time_s"]["compute"],
        "step_communication_s": s3["time_s"]["communication"],
        "tower_gather_bytes_per_step": s3["communication"]["tower_gather_bytes"],
        "replicated_tower_bytes_per_rank": s2["memory_bytes"]["tower"],
        "replicated_step_bytes": s2["memory_bytes"]["total"],
    }


def launch(args: argparse.Namespace, part: str, out: str) -> None:
    worker_args = [
        "--worker",
        part,
        "--out",
        out,
        "--ckpt",
        args.ckpt,
        "--model",
        args.model,
        "--image-size",
        str(args.image_size),
        "--micro",
        str(args.micro),
        "--zero-config",
        args.zero_config,
    ]
    env = repo_env(REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    try:
        launch_ranks(__file__, worker_args, repo=REPO, env=env, what=f"{part}: deepspeed launch")
    except LaunchFailed as e:
        sys.exit(str(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="EVA02-E-14")
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--zero-config", default="ds_configs/zero3.json", help="the ZeRO-3 settings (a DeepSpeed JSON)")
    ap.add_argument("--ckpt", default=None, help="where to write the checkpoint (default: a temporary directory)")
    ap.add_argument("--keep-ckpt", action="store_true")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--parts", default="random,pretrained")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "write":
        write_checkpoint(args)
        return
    if args.worker is not None:
        args.part = args.worker
        worker(args)
        return
    tmp = tempfile.mkdtemp(prefix="huge_tower_")
    args.ckpt = args.ckpt or str(Path(tmp) / "ckpt")
    try:
        from mosa_scale.backbones import BackboneConfig, build_backbone
        from mosa_scale.backbones.base import stream_width

        sk = build_backbone(BackboneConfig(family="openclip", name=args.model), meta=True)
        width = stream_width(sk.model, sk.sites[0])
        gflops = matmul_gflops(width, args.micro * ((args.image_size // 14) ** 2 + 1))
        result: dict = {
            "bench": "huge_tower",
            "model": args.model,
            "tower_dtype": "bf16",
            "ranks": 2,
            "image_size": args.image_size,
            "micro_batch": args.micro,
            "adapter": "parallel r64 N4",
            "zero_config": args.zero_config,
            "matmul_gflops_per_rank": gflops,
        }
        parts = args.parts.split(",")
        if "pretrained" in parts:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "write",
                    "--ckpt",
                    args.ckpt,
                    "--model",
                    args.model,
                    "--image-size",
                    str(args.image_size),
                    "--shard-gb",
                    str(args.shard_gb),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                env=repo_env(REPO),
            )
            if proc.returncode != 0:
                sys.exit(f"checkpoint writer failed:\n{proc.stderr[-3000:]}")
            result["checkpoint"] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = {}
        for part in parts:
            launch(args, part, tmp)
            rows[part] = [json.loads(Path(tmp, f"{part}_rank{r}.json").read_text()) for r in (0, 1)]
        bw = min(r["allgather_gbs"] for rs in rows.values() for r in rs)
        pred = predictions(args, gflops, bw)
        result["planner"] = pred
        for part, rs in rows.items():
            per_rank = []
            for r in rs:
                base = r["baseline_rss"]
                per_rank.append(
                    {
                        "rank": r["rank"],
                        "startup_rss_gb": base / GB,
                        "build_peak_rss_gb": r["build_peak_rss"] / GB,
                        # construction (random init) then, for the pretrained part, loading
                        "build_peak_rss_gb_predicted": (base + max(pred["build_bytes"], pred["load_bytes"])) / GB,
                        "initialize_peak_rss_gb": r["initialize_peak_rss"] / GB,
                        "step_peak_rss_gb": r["step_peak_rss"] / GB,
                        "second_step_peak_rss_gb": r["second_step_peak_rss"] / GB,
                        "step_peak_rss_gb_predicted": (base + pred["step_bytes"]) / GB,
                        "tower_partition_gb": r["tower_partition_bytes"] / GB,
                        "build_s": r["build_s"],
                        "load_s": r["load_s"],
                        "bytes_read_gb": (r["bytes_read"] or 0) / GB,
                        "initialize_s": r["initialize_s"],
                        "step_s": r["step_s"],
                        "second_step_s": r["second_step_s"],
                        "step_s_predicted": pred["step_s"],
                        "loss": r["loss"],
                        "allgather_gbs": r["allgather_gbs"],
                    }
                )
            result[part] = per_rank
        budget = pred["tower_params"] * 2 / 2 / GB + 1.5
        result["budget_gb_per_rank"] = budget
        result["within_budget"] = all(
            max(r["build_peak_rss_gb"], r["step_peak_rss_gb"], r["second_step_peak_rss_gb"]) <= budget
            for p in parts
            for r in result[p]
        )
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep_ckpt:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
