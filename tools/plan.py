"""Per-GPU memory, communication, FLOPs and step time of a run at each ZeRO stage, and the stage to use.

    python tools/plan.py --config launchers/configs/recipes/vit_h14/cub.yaml --world 8
    python tools/plan.py model.family=openclip model.name=EVA02-E-14 model.precision=bf16 \\
        train.precision=bf16 train.micro_batch=16 train.global_batch=1024 --world 64 --json
"""

from __future__ import annotations

import argparse
import json

from mosa_scale.config.run import load_run_config
from mosa_scale.plan import Hardware, format_plan, plan_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="run config YAML (default: the built-in defaults)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    ap.add_argument("--world", type=int, default=8, help="number of GPUs")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="H100", help="GPU name for the FLOPs table (H100, H200, A100)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GiB")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense peak")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak a step achieves")
    ap.add_argument("--intra-gbs", type=float, default=150.0, help="collective GB/s per GPU inside a node")
    ap.add_argument("--inter-gbs", type=float, default=25.0, help="collective GB/s per GPU across nodes")
    ap.add_argument("--overhead-gib", type=float, default=3.0, help="runtime memory outside the model, GiB")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    cfg = load_run_config(args.config, args.overrides, world_size=args.world)
    hw = Hardware(
        name=args.gpu,
        memory_gib=args.gpu_mem,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        intra_node_gbs=args.intra_gbs,
        inter_node_gbs=args.inter_gbs,
        gpus_per_node=args.gpus_per_node,
        overhead_gib=args.overhead_gib,
    )
    result = plan_run(
        cfg,
        world_size=args.world,
        hardware=hw,
        num_classes=args.num_classes,
        stages=tuple(int(s) for s in args.stages.split(",")),
    )
    print(json.dumps(result, indent=1) if args.json else format_plan(result))


if __name__ == "__main__":
    main()
