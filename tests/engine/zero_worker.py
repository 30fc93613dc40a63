"""Launched by tests with ``deepspeed --num_gpus W``: trains a tiny MoSA model under ZeRO 0-3 and
checks, after every step, that the slices no rank used are bit-identical (value, fp32 master,
Adam moments, step count). Writes trained values and per-rank optimizer-state sizes to --out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import Classifier, batches, make_tower  # noqa: E402

from mosa_scale.adapters import AdapterConfig, inject_adapters  # noqa: E402
from mosa_scale.engine.deepspeed_engine import full_fp32_params, init_distributed, initialize  # noqa: E402
from mosa_scale.optim import MoSAAdamW  # noqa: E402
from mosa_scale.sparse import Router  # noqa: E402

STEPS, MICRO, LR, WD = 6, 4, 1e-2, 0.05


def masters(engine, stage: int, opt: torch.optim.Optimizer) -> dict[int, list[torch.Tensor]]:
    """fp32 master tensors of this rank, by param-group index."""
    if stage == 0:
        return {i: list(g["params"]) for i, g in enumerate(opt.param_groups)}
    zo = engine.optimizer
    if stage in (1, 2):
        return {i: [t] for i, t in enumerate(zo.single_partition_of_fp32_groups)}
    out: dict[int, list[torch.Tensor]] = {}
    for sub, gid in zo.sub_group_to_group_id.items():
        out.setdefault(gid, []).append(zo.fp32_partitioned_groups_flat[sub])
    return out


def snapshot(engine, stage, opt, groups) -> dict:
    inner = opt if stage == 0 else engine.optimizer.optimizer
    m = masters(engine, stage, opt)
    snap = {}
    for i in groups:
        for j, t in enumerate(m[i]):
            st = inner.state.get(t, {})
            snap[(i, j)] = [t.detach().clone()] + [st[k].clone() for k in sorted(st)]
    return snap


def run(stage: int, experts: int, scope: str, rank: int, world: int, out: Path, steps: int) -> dict:
    router = Router(seed=3, scope=scope, rank=rank, world_size=world)
    tower = make_tower()
    model = Classifier(tower, 32)
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=experts, share="none", split_bias=True,
                        dropout=0.0, seed=3)
    inject_adapters(tower, tower.sites(), cfg, router=router, width=32)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=WD, lr=LR)
    ds = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
          "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine = initialize(model, opt, None, ds)
    data = batches(steps * world, batch=MICRO, seed=1)
    checks = violations = 0
    for step in range(steps):
        window = router.begin_step(step)
        idle = [i for i, g in enumerate(opt.param_groups) if g.get("mosa_key") is not None
                and tuple(g["mosa_key"]) not in window.active]
        before = snapshot(engine, stage, opt, idle)
        decay_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".decay")}
        x, y = data[step * world + rank]
        with router.forward_pass():
            loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        after = snapshot(engine, stage, opt, idle)
        for key, tensors in before.items():
            checks += 1
            if len(tensors) != len(after[key]) or not all(torch.equal(a, b) for a, b in zip(tensors, after[key])):
                violations += 1
        for name, layer_decay in decay_before.items():  # s_k of idle slices is untouched too
            now = dict(model.named_buffers())[name]
            checks += 1
            violations += int(not torch.equal(now[layer_decay == now], layer_decay[layer_decay == now]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = full_fp32_params(engine, names)
    m = masters(engine, stage, opt)
    master_elems = sum(t.numel() for ts in m.values() for t in ts)
    inner = opt if stage == 0 else engine.optimizer.optimizer
    state_ok = all(st["exp_avg"].numel() == t.numel() and st["exp_avg_sq"].numel() == t.numel()
                   for ts in m.values() for t in ts for st in [inner.state.get(t)] if st)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # ZeRO-3 partitions the frozen tower too (each rank holds about 1/world of it); below it is replicated
    frozen_local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen)
    frozen_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in frozen)
    if rank == 0:
        buffers = {n: b.detach().cpu() for n, b in model.named_buffers() if n.endswith((".decay",))}
        save_file({**values, **buffers}, str(out / f"values_s{stage}_n{experts}_{scope}_w{world}.safetensors"))
    return {"stage": stage, "experts": experts, "scope": scope, "world": world, "rank": rank,
            "checks": checks, "violations": violations, "adam_state_bytes": 2 * 4 * master_elems,
            "state_matches_masters": state_ok, "frozen_local": frozen_local, "frozen_total": frozen_total, "groups": len(opt.param_groups),
            "trainable": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and stage != 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--experts", default="4")
    ap.add_argument("--scopes", default="rank")
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for stage in map(int, args.stages.split(",")):
        for experts in map(int, args.experts.split(",")):
            for scope in args.scopes.split(","):
                results.append(run(stage, experts, scope, rank, world, args.out, args.steps))
    (args.out / f"result_w{world}_r{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
