"""Launched by tests with ``deepspeed --num_gpus W``: trains a tiny MoSA model under ZeRO 0-3 in both
update semantics and checks, after every step, that the expert slices the semantics freeze are
bit-identical (fp32 master values, both Adam moments, step count, s_k), wherever ZeRO cut them.
Writes trained values, per-rank optimizer-state sizes and the slices cut by partition boundaries
to --out; with --resume also trains half the steps, saves, rebuilds everything and loads."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import Classifier, batches, make_tower  # noqa: E402

from mosa_scale.adapters import AdapterConfig, inject_adapters  # noqa: E402
from mosa_scale.engine import checkpoint as ckpt  # noqa: E402
from mosa_scale.engine.deepspeed_engine import full_fp32_params, init_distributed, initialize, optimizer_fragments  # noqa: E402
from mosa_scale.optim import MoSAAdamW, sparse_layers  # noqa: E402
from mosa_scale.sparse import Router  # noqa: E402

STEPS, MICRO, LR, WD, EPS = 20, 4, 1e-2, 0.05, 1e-6


def build(stage: int, experts: int, share: str, inactive: str, scope: str, rank: int, world: int):
    router = Router(seed=3, scope=scope, rank=rank, world_size=world)
    tower = make_tower()
    model = Classifier(tower, 32)
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=experts, share=share, split_bias=True, dropout=0.0)
    inject_adapters(tower, tower.sites(), cfg, seed=3, router=router, width=32)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=WD, lr=LR, eps=EPS, inactive=inactive)
    ds = {
        "train_batch_size": MICRO * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    engine = initialize(model, opt, None, ds)  # binds the optimizer to ZeRO's partitions
    return model, opt, engine, router


def stepped_tensors(engine, opt) -> list[torch.Tensor]:
    """The tensors the optimizer steps on this rank: ZeRO's flat fp32 partitions, or the params."""
    targets = optimizer_fragments(engine)
    return [t for t, _ in targets] if targets is not None else [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt, tensors, layers, frozen) -> list[torch.Tensor]:
    out = []
    for t in tensors:
        st = opt.state.get(t, {})
        for key, start, n in opt.expert_runs(t):
            if key in frozen:  # a moment not created yet is zero
                out += [t.detach()[start : start + n].clone()] + [
                    st[x][start : start + n].clone() if x in st else t.new_zeros(n) for x in ("exp_avg", "exp_avg_sq")
                ]
    for r, k in sorted(frozen):
        out += [layers[r].steps[k].clone(), layers[r].decay[k].clone()]
    return out


def cut_slices(engine, layers) -> int:
    """Expert slices of this rank's partitions that a partition boundary cuts (a piece, not all)."""
    targets = optimizer_fragments(engine) or []
    ranges = {}
    for layer in layers.values():
        ranges[id(layer.slices)] = layer.ranges
        ranges[id(layer.biases)] = layer.bias_ranges
    cut = 0
    for _, frags in targets:
        for f in frags:
            for off, n in ranges.get(id(f.param), []):
                inside = min(off + n, f.param_start + f.numel) - max(off, f.param_start)
                cut += int(0 < inside < n)
    return cut


def train(model, opt, engine, router, *, rank, world, start, stop, check):
    layers = {m.route_id: m for m in sparse_layers(model).values()}
    tensors = stepped_tensors(engine, opt)
    data = batches(STEPS * world, batch=MICRO, seed=1)
    checks = violations = 0
    for step in range(start, stop):
        window = router.begin_step(step)
        # skip: every slice no unit used; coast: only those never used yet
        frozen = {
            (r, k)
            for r, m in layers.items()
            for k in range(m.num_experts)
            if (r, k) not in window.active and (opt.inactive == "skip" or int(m.steps[k]) == 0)
        }
        before = snapshot(opt, tensors, layers, frozen) if check else []
        x, y = data[step * world + rank]
        with router.forward_pass():
            loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        if check:
            after = snapshot(opt, tensors, layers, frozen)
            checks += len(frozen)
            violations += int(len(before) != len(after) or not all(torch.equal(a, b) for a, b in zip(before, after)))
    return checks, violations


def run(stage, experts, share, inactive, scope, rank, world, out: Path, resume: bool) -> dict:
    model, opt, engine, router = build(stage, experts, share, inactive, scope, rank, world)
    checks, violations = train(model, opt, engine, router, rank=rank, world=world, start=0, stop=STEPS, check=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = full_fp32_params(engine, names)
    buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers() if n.endswith((".decay", ".steps"))}
    tag = f"s{stage}_n{experts}_{share}_{inactive}_{scope}_w{world}"
    resumed_gap = None
    if resume:  # half the steps, a checkpoint, everything rebuilt and loaded, the other half
        ckpt_dir = out / f"ckpt_{tag}"
        m2, o2, e2, r2 = build(stage, experts, share, inactive, scope, rank, world)
        train(m2, o2, e2, r2, rank=rank, world=world, start=0, stop=STEPS // 2, check=False)
        ckpt.save(e2, ckpt_dir, STEPS // 2, client_state={}, rank_state={})
        m3, o3, e3, r3 = build(stage, experts, share, inactive, scope, rank, world)
        tag_name = ckpt.resume_tag(ckpt_dir)
        assert tag_name == f"step{STEPS // 2:08d}"
        ckpt.verify(ckpt_dir, tag_name)  # the manifest every resume checks first
        ckpt.load(e3, ckpt_dir, tag_name)
        train(m3, o3, e3, r3, rank=rank, world=world, start=STEPS // 2, stop=STEPS, check=False)
        again = full_fp32_params(e3, names)
        again_buf = {n: b.detach().cpu() for n, b in m3.named_buffers() if n.endswith((".decay", ".steps"))}
        resumed_gap = max(
            [float((values[n] - again[n]).abs().max()) for n in names]
            + [float((buffers[n].double() - again_buf[n].double()).abs().max()) for n in buffers]
        )
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    tensors = stepped_tensors(engine, opt)
    master_elems = sum(t.numel() for t in tensors)
    inner = opt if stage == 0 else engine.optimizer.optimizer
    state_ok = all(
        st["exp_avg"].numel() == t.numel() and st["exp_avg_sq"].numel() == t.numel()
        for t in tensors
        for st in [inner.state.get(t)]
        if st
    )
    frozen_params = [p for p in model.parameters() if not p.requires_grad]
    # ZeRO-3 partitions the frozen tower too (each rank holds about 1/world of it); below it is replicated
    frozen_local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen_params)
    frozen_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in frozen_params)
    if rank == 0:
        save_file({**values, **buffers}, str(out / f"values_{tag}.safetensors"))
    return {
        "stage": stage,
        "experts": experts,
        "share": share,
        "inactive": inactive,
        "scope": scope,
        "world": world,
        "rank": rank,
        "checks": checks,
        "violations": violations,
        "adam_state_bytes": 2 * 4 * master_elems,
        "state_matches_masters": state_ok,
        "frozen_local": frozen_local,
        "frozen_total": frozen_total,
        "groups": len(opt.param_groups),
        "cut_slices": cut_slices(engine, {m.route_id: m for m in sparse_layers(model).values()}),
        "resumed_gap": resumed_gap,
        "trainable": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and stage != 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--runs",
        required=True,
        help="comma-separated stage/N/share/inactive/scope, '/resume' appended to also resume mid-run",
    )
    ap.add_argument("--name", default="runs")
    args = ap.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for spec in args.runs.split(","):
        stage, experts, share, inactive, scope, *rest = spec.split("/")
        results.append(run(int(stage), int(experts), share, inactive, scope, rank, world, args.out, rest == ["resume"]))
    (args.out / f"result_{args.name}_w{world}_r{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
