"""ViT-H-14 with MoSA against the dense adapter on one GPU: DeepSpeed ZeRO-2, bf16 (prints JSON).

Random-init OpenCLIP ViT-H-14 image tower (no weights or data needed), random pixels, parallel
adapters r 64 share down, N = 4 (MoSA) and N = 1 (dense), linear head of 1000 classes. Each variant
runs in its own process (clean peak memory, clean DeepSpeed state): warm-up steps, then timed
steps. Reports step time, samples/s, TFLOP/s and MFU (frozen-backbone-aware FLOPs from
``mosa_scale.model.flops``; MFU against the GPU's dense bf16 peak) and peak memory, plus ratios.
Takes about 2-3 minutes on one H100 / H200.

    python bench/gpu_vith14.py                          # GPU: ViT-H-14, batch 64
    python bench/gpu_vith14.py --device cpu --tiny      # CPU smoke test of the same code path
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mosa_scale.engine.launch import free_port, repo_env

REPO = Path(__file__).resolve().parents[1]
TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
}


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from mosa_scale.adapters import AdapterConfig, inject_adapters
    from mosa_scale.backbones import BackboneConfig, build_backbone, build_head
    from mosa_scale.config.run import RunConfig, TrainConfig
    from mosa_scale.engine.deepspeed_engine import deepspeed_config, init_distributed, initialize
    from mosa_scale.model.assembly import AdaptedClassifier
    from mosa_scale.model.flops import peak_flops, step_flops
    from mosa_scale.optim import MoSAAdamW
    from mosa_scale.sparse import Router

    init_distributed()  # one rank
    dev = torch.device(args.device)
    t_build = time.perf_counter()
    tower = (
        BackboneConfig(family="openclip", name="tiny", openclip_cfg=TINY_OPENCLIP, precision=args.precision)
        if args.tiny
        else BackboneConfig(family="openclip", name="ViT-H-14", precision=args.precision)
    )
    torch.manual_seed(0)
    bb = build_backbone(tower, device=dev)
    router = Router(0)
    width = int(bb.model.visual.transformer.width)
    experts = args.experts if args.variant == "mosa" else 1
    inject_adapters(
        bb.model,
        bb.sites,
        AdapterConfig(method="parallel", bottleneck=64, num_experts=experts, share="down"),
        seed=0,
        router=router,
        width=width,
    )
    model = AdaptedClassifier(
        bb.model, build_head("linear", bb.width, args.classes, generator=torch.Generator().manual_seed(0))
    ).to(dev)
    run_cfg = RunConfig(
        train=TrainConfig(
            global_batch=args.batch,
            micro_batch=args.batch,
            precision=args.precision,
            zero_config="ds_configs/zero2.json",
        )
    )
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=1e-3, eps=1e-6)
    flops = step_flops(model, bb, image_size=bb.image.size, global_batch=args.batch, consistency=args.consistency)
    engine = initialize(model, opt, None, deepspeed_config(run_cfg, 1))
    build_s = time.perf_counter() - t_build
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, bb.image.size, bb.image.size, generator=g).to(engine.device)
    y = torch.randint(args.classes, (args.batch,), generator=g).to(engine.device)
    cuda = engine.device.type == "cuda" if isinstance(engine.device, torch.device) else "cuda" in str(engine.device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        router.begin_step(step, passes=2 if args.consistency else 1)
        sync()
        t0 = time.perf_counter()
        with router.forward_pass(0, 0):
            logits = engine(x)
        loss = F.cross_entropy(logits.float(), y)
        if args.consistency:
            with router.forward_pass(0, 1):
                logits2 = engine(x)
            p1, p2 = logits.float().log_softmax(-1), logits2.float().log_softmax(-1)
            loss = loss + 0.5 * (
                F.kl_div(p1, p2.detach(), log_target=True, reduction="batchmean")
                + F.kl_div(p2, p1.detach(), log_target=True, reduction="batchmean")
            )
        engine.backward(loss)
        engine.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = peak_flops(engine.device if cuda else None, args.precision)
    per_s = flops["per_step"] / step_s
    return {
        "variant": args.variant,
        "experts": experts,
        "build_s": build_s,
        "step_s_median": step_s,
        "step_s_all": times,
        "samples_per_s": args.batch / step_s,
        "tflops_per_s": per_s / 1e12,
        "mfu": None if peak is None else per_s / peak,
        "peak_flops": peak,
        "flops_per_sample": flops["per_sample"],
        "trainable_params": flops["trainable_params"],
        "param_groups": len(opt.param_groups),
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "peak_memory_source": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss (process)",
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "final_loss": float(loss.detach()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-block OpenCLIP tower (CPU smoke test)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--batch", type=int, default=None, help="default 64 (GPU), 4 (--tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps; default 20 (GPU), 3 (--tiny)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--consistency", action="store_true", help="second pass with fresh experts (doubles compute)")
    ap.add_argument("--timeout", type=int, default=210, help="seconds per variant process")
    ap.add_argument("--variant", choices=("dense", "mosa"), help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.tiny else 64)
    args.steps = args.steps or (3 if args.tiny else 20)
    if args.variant:  # child process: one variant
        Path(args.json_out).write_text(json.dumps(run_variant(args)))
        return
    env = repo_env(REPO, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    results, t0 = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("dense", "mosa"):
            out = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--json-out", str(out)]
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env={**env, "MASTER_PORT": str(free_port())},
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            if proc.returncode != 0:
                sys.exit(f"{variant} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(out.read_text())
    d, m = results["dense"], results["mosa"]
    print(
        json.dumps(
            {
                "bench": "gpu_vith14",
                "model": "OpenCLIP tiny" if args.tiny else "OpenCLIP ViT-H-14 (random init)",
                "device": d["device_name"],
                "precision": args.precision,
                "zero_stage": 2,
                "batch": args.batch,
                "image_size": 32 if args.tiny else 224,
                "adapter": "parallel r64 share=down",
                "experts": args.experts,
                "consistency": args.consistency,
                "timed_steps": args.steps,
                "wall_s": time.time() - t0,
                "step_time_ratio_mosa_vs_dense": m["step_s_median"] / d["step_s_median"],
                "samples_per_s_ratio_mosa_vs_dense": m["samples_per_s"] / d["samples_per_s"],
                "peak_memory_ratio_mosa_vs_dense": m["peak_memory_mb"] / d["peak_memory_mb"],
                "variants": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
