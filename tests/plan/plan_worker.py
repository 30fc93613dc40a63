"""Launched by tests with ``deepspeed --num_gpus 2``: measures what the planner predicts, on real
training steps of small towers under ZeRO 0-3 (CPU ranks).

Per case and rank, on the third step: DeepSpeed's collectives (calls and bytes), the most tensor
bytes the step allocated at once (its peak above the model states: what a GPU's
``max_memory_allocated`` reports), activation bytes autograd saved, the model-state bytes held
(tower, adapter parameters, gradients, fp32 master, Adam state) and the peak resident memory
the step added. Writes ``case_<name>_rank<r>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plan_cases import CASES, case_config, ds_config  # noqa: E402

from mosa_scale.backbones import enable_gradient_checkpointing  # noqa: E402
from mosa_scale.engine.collectives import CollectiveCounter  # noqa: E402
from mosa_scale.engine.deepspeed_engine import init_distributed, initialize, tower_shard  # noqa: E402
from mosa_scale.model.assembly import build_model  # noqa: E402
from mosa_scale.optim import MoSAAdamW  # noqa: E402
from mosa_scale.plan.trace import LiveBytes  # noqa: E402
from mosa_scale.sparse import Router  # noqa: E402

STEPS, CLASSES = 3, 10


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak() -> None:
    """Free memory the allocator keeps cached goes back to the system, then the peak resident size
    restarts from now (Linux), so the step's peak minus the resident size now is what it added."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Saved:
    """Bytes autograd saves (storages once; parameters excluded)."""

    def __init__(self, params) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params if p.numel()}
        self.seen, self.total = set(), 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.seen and key not in self.params and t.untyped_storage().nbytes():
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t


def run(name: str, rank: int, world: int) -> dict:
    spec = CASES[name]
    cfg = case_config(name)
    ds = ds_config(name, world)
    router = Router(cfg.train.seed, cfg.routing.scope, rank, world)
    model, backbone, _ = build_model(cfg, router, num_classes=CLASSES, shard=tower_shard(ds))
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(backbone, router.checkpoint)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=1e-3)
    engine = initialize(model, opt, None, ds)
    stage = spec["stage"]
    passes = 2 if cfg.consistency.enabled else 1
    g = torch.Generator().manual_seed(rank)
    size = cfg.data.image_size or backbone.image.size
    out: dict = {"case": name, "rank": rank, "stage": stage}
    for step in range(STEPS):
        x = torch.randn(cfg.train.micro_batch, 3, size, size, generator=g)
        y = torch.randint(CLASSES, (cfg.train.micro_batch,), generator=g)
        last = step == STEPS - 1
        saved = Saved(engine.module.parameters())
        router.begin_step(step, micro_batches=1, passes=passes)
        dist.barrier()
        reset_peak()
        base, _ = rss()
        with CollectiveCounter() as comm, LiveBytes() as tracked:
            loss = 0
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                for p in range(passes):
                    with router.forward_pass(0, p):
                        loss = loss + F.cross_entropy(engine(x), y)
            engine.backward(loss)
            if last:
                grads = sum(
                    p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None
                )
                inner = engine.optimizer
                if stage in (1, 2):
                    grads += tensor_bytes(inner.averaged_gradients)
                if stage == 3:
                    flat = inner.grad_partitions_flat_buffer
                    grads += flat.numel() * flat.element_size()
            engine.step()
        _, peak = rss()
        if last:
            out.update(
                calls=dict(comm.calls),
                bytes=dict(comm.bytes),
                saved_bytes=saved.total,
                step_peak_rss_bytes=peak - base,
                step_peak_bytes=tracked.peak,
                gradient_bytes=grads,
            )
    params = list(engine.module.parameters())

    def held(p):
        return (
            p.ds_tensor.numel() * p.ds_tensor.element_size()
            if hasattr(p, "ds_tensor")
            else p.numel() * p.element_size()
        )

    if stage == 0:
        master, state = 0, tensor_bytes(list(opt.state.values()))
        if hasattr(engine.optimizer, "fp32_groups_flat_partition"):  # bf16 stage 0
            master = tensor_bytes(engine.optimizer.fp32_groups_flat_partition)
    else:
        inner = engine.optimizer
        flat = inner.fp32_partitioned_groups_flat if stage == 3 else inner.single_partition_of_fp32_groups
        master = tensor_bytes(flat)
        state = tensor_bytes(list(inner.optimizer.state.values()))
    # ZeRO-3 allocates its gradient bucket when the engine starts (stages 1-2: in the step)
    buckets = engine.optimizer.ipg_buckets.values() if stage == 3 else ()
    out.update(
        grad_bucket_bytes=sum(tensor_bytes(b.buffer) for b in buckets),
        tower_bytes=sum(held(p) for p in params if not p.requires_grad),
        adapter_param_bytes=sum(held(p) for p in params if p.requires_grad),
        fp32_master_bytes=master,
        optimizer_state_bytes=state,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in args.cases.split(","):
        result = run(name, rank, world)
        (args.out / f"case_{name}_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
