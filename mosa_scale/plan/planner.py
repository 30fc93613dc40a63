"""Memory, communication and time of a run per GPU, for each ZeRO stage, and which stage to use.

Everything is derived from the real model of the run config, built on the meta device and
stepped once there (:mod:`mosa_scale.plan.trace`): parameter sizes and dtypes, the activations
autograd saves, and the order in which modules run forward and backward. Per GPU and stage:

* tower: the whole frozen tower (stages 0-2) or this rank's partition of every parameter
  (stage 3: ``ceil(numel / world)`` elements each);
* adapter (and head) parameters, gradients, fp32 master copy and Adam moments, partitioned as
  the stage partitions them (1: optimizer state; 2: + gradients; 3: + parameters);
* activations: the most tensor bytes one micro-batch's forward and backward hold at once
  (saved activations, temporaries, activation gradients; all passes; with activation
  checkpointing the block inputs plus one recomputed block), tracked allocation by allocation;
  under ZeRO-3, with DeepSpeed's memory-efficient linear, which keeps every linear's input;
* the gradient bucket (``reduce_bucket_size`` elements, allocated whole: ZeRO 1-2 in the step,
  ZeRO-3 once per gradient dtype when the engine starts, both with ``contiguous_gradients``);
* ZeRO-3 working set: parameters gathered at the same time, replaying DeepSpeed's rule (a
  module's own parameters are gathered at its forward, at its backward when its output gets a
  gradient, and at its recompute; they are freed after use unless used again within
  ``stage3_max_reuse_distance`` elements; parameters up to ``stage3_param_persistence_threshold``
  elements stay whole), a fetch of several parameters held twice while they are copied out of
  the flat buffer they were gathered into (not with ``stage3_use_all_reduce_for_fetch_params``),
  plus up to ``stage3_prefetch_bucket_size`` elements of the tower gathered ahead (an upper
  bound: DeepSpeed prefetches from the second step on);
* module buffers (MoSA's partitions and index tables), whole on every rank;
* a constant runtime overhead (CUDA context, allocator slack, communication buffers).

Communication per step: ZeRO-3 tower and adapter gathers (bytes of the gathered tensors,
``ceil(numel / world) * world`` elements each) and gradient reductions; traffic per GPU is
``(world - 1) / world`` of an all-gather's or reduce-scatter's bytes and twice that for an
all-reduce. Time: FLOPs per GPU at ``mfu`` of the GPU's peak, plus traffic at the collective
bandwidth (intra-node up to ``gpus_per_node`` GPUs, inter-node beyond), without overlap (an upper
bound). The verdict: the stages whose total fits the GPU memory, and the fastest of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mosa_scale.config.run import REPO_ROOT, HeadConfig, RunConfig
from mosa_scale.model.assembly import build_model
from mosa_scale.model.flops import PEAK_FLOPS, step_flops
from mosa_scale.plan.trace import StepTrace, trace_step
from mosa_scale.sparse import Router

log = logging.getLogger(__name__)

GIB = 2**30
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSpeed's own defaults for the ZeRO-3 knobs the plan reads (deepspeed/runtime/zero/config.py)
ZERO_DEFAULTS = {
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "contiguous_gradients": True,
    "memory_efficient_linear": True,
    "stage3_use_all_reduce_for_fetch_params": False,
}


@dataclass(frozen=True)
class Hardware:
    """One GPU type and its interconnect.

    Attributes:
        name: A label; with ``peak_tflops`` unset, looked up in the FLOPs table by this name.
        memory_gib: Memory per GPU.
        peak_tflops: Dense peak at the training precision; None: from the table.
        mfu: Fraction of the peak a step achieves.
        intra_node_gbs: Collective bus bandwidth per GPU inside a node, GB/s.
        inter_node_gbs: Collective bus bandwidth per GPU across nodes, GB/s.
        gpus_per_node: GPUs per node.
        overhead_gib: Runtime memory outside the model (CUDA context, allocator slack, buffers).
    """

    name: str = "H100"
    memory_gib: float = 80.0
    peak_tflops: float | None = None
    mfu: float = 0.4
    intra_node_gbs: float = 150.0
    inter_node_gbs: float = 25.0
    gpus_per_node: int = 8
    overhead_gib: float = 3.0

    def peak(self, precision: str) -> float:
        """Peak FLOP/s at ``precision``.

        Raises:
            ValueError: Unknown GPU name and no ``peak_tflops``.
        """
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        for key, table in PEAK_FLOPS:
            if key in self.name:
                return table[precision]
        raise ValueError(f"gpu {self.name!r}: not in the FLOPs table ({[k for k, _ in PEAK_FLOPS]}); give peak_tflops")


@dataclass
class _Model:
    trace: StepTrace
    trace_zero3: StepTrace | None  # with ZeRO-3's memory-efficient linear
    flops: dict[str, float]
    recompute_flops: float  # forward FLOPs per sample run again by activation checkpointing
    tower: list[tuple[int, int]]  # (numel, bytes per element) of frozen parameters
    trainable: list[tuple[int, int]]
    name: str
    buffer_bytes: int = 0  # module buffers (every rank holds them whole, at every stage)


def zero_settings(cfg: RunConfig, stage: int) -> dict[str, Any]:
    """The ZeRO settings for planning ``stage``: the run's DeepSpeed file when it is of that
    stage, else ``ds_configs/zero<stage>.json`` (what a run switched to that stage would use)."""
    path = Path(cfg.train.zero_config)
    path = path if path.is_file() else REPO_ROOT / path
    zero = dict(json.loads(path.read_text()).get("zero_optimization", {})) if path.is_file() else {}
    if int(zero.get("stage", 0)) != stage:
        repo = REPO_ROOT / "ds_configs" / f"zero{stage}.json"
        zero = dict(json.loads(repo.read_text())["zero_optimization"]) if repo.is_file() else {"stage": stage}
    return zero


def _meta_model(cfg: RunConfig, num_classes: int, zero3_linear: bool = False) -> _Model:
    if cfg.head.kind == "zeroshot":  # a zero-shot head is a linear head of the same shape for planning
        cfg = dataclasses.replace(cfg, head=HeadConfig())
    router = Router(cfg.train.seed, cfg.routing.scope)
    model, backbone, _ = build_model(cfg, router, num_classes=num_classes, meta=True)
    model.to("meta")
    half = HALF.get(cfg.train.precision)
    if half is not None:  # DeepSpeed runs every parameter in the training precision (fp32 master copies)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(half)
    size = cfg.data.image_size or backbone.image.size
    passes = 2 if cfg.consistency.enabled else 1
    traces = [
        trace_step(
            model,
            backbone,
            router,
            micro_batch=cfg.train.micro_batch,
            image_size=size,
            passes=passes,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            input_dtype=half or torch.float32,
            saving_linear=saving,
        )
        for saving in [False] + ([True] if zero3_linear else [])
    ]
    flops = step_flops(model, backbone, image_size=size, global_batch=1, consistency=cfg.consistency.enabled)
    # checkpointed blocks run their forward again in the backward (blocks hold nearly all FLOPs)
    recompute = (
        passes * (flops["forward_frozen"] + flops["forward_trainable"]) if (cfg.train.gradient_checkpointing) else 0.0
    )
    tower = [(p.numel(), p.element_size()) for p in model.parameters() if not p.requires_grad]
    trainable = [(p.numel(), p.element_size()) for p in model.parameters() if p.requires_grad]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return _Model(
        traces[0], traces[1] if zero3_linear else None, flops, recompute, tower, trainable, backbone.name, buffers
    )


def _pad(n: int, world: int) -> int:
    return -(-n // world)


def owned_params(trace: StepTrace) -> dict[str, list]:
    """Parameters fetched with each module: its own, plus those of descendants that never run
    their own forward (read by the module itself, e.g. an attention reading its fused qkv weight)."""
    ran = {e[1] for e in trace.events if e[0] in ("fwd", "bwd")}
    owner: dict[str, list] = {name: list(ps) for name, ps in trace.params.items()}
    for name, ps in trace.params.items():
        if name in ran or not ps:
            continue
        parent = name
        while parent and parent not in ran:
            parent = parent.rpartition(".")[0]
        owner[parent].extend(ps)
        owner[name] = []
    return owner


def simulate_zero3(
    trace: StepTrace,
    world: int,
    *,
    reuse_distance: int,
    persistence_threshold: int,
    all_reduce_fetch: bool = False,
) -> dict[str, int]:
    """ZeRO-3's gathers over one traced micro-batch in the steady state (prefetching off).

    A module's fetch gathers its parameters that are not whole (own, and the ones it read while
    they were not whole in an earlier step: DeepSpeed's external parameters); a read of a
    parameter that is not whole gathers it. At the end of a module's forward and right after its
    backward fetch, its parameters are freed unless used again within ``reuse_distance``
    elements of the coming fetches. The traced micro-batch is replayed twice; the second replay
    is reported.

    A fetch of several parameters of one dtype is gathered into one flat buffer and each
    parameter then copied out of it (DeepSpeed's coalesced all-gather): for a moment the fetch
    is held twice. With ``all_reduce_fetch`` (``stage3_use_all_reduce_for_fetch_params``) such a
    fetch is an all-reduce into a buffer the parameters are views of: held once, but twice the
    traffic of an all-gather. A fetch of one parameter is an all-gather into the parameter.

    Returns:
        ``gather_calls``, ``gather_bytes`` (all parameters; ``tower_gather_bytes`` of the frozen
        ones; ``all_reduce_fetch_bytes`` of those fetched by all-reduce), ``peak_gathered_bytes``
        (the most parameter bytes whole at once), ``fetch_copy_bytes`` (the largest fetch held
        twice while copied out) and ``persistent_bytes`` (small parameters kept whole on every
        rank).
    """
    owner = owned_params(trace)
    info = {p.ident: p for ps in owner.values() for p in ps}
    persistent = {i for i, p in info.items() if p.numel <= persistence_threshold}
    size = {i: _pad(p.numel, world) * world * p.elem_bytes for i, p in info.items()}
    fetches = [e for e in trace.events if e[0] in ("fwd", "bwd")]
    external: dict[str, set[int]] = {}
    result: dict[str, int] = {}
    for _replay in range(2):
        avail: set[int] = set()
        live = peak = calls = total = tower = reduced = copy = 0
        position = 0

        def gather(ids: list[int]) -> None:
            nonlocal live, calls, total, tower, reduced, copy
            if ids:
                calls += 1
            by_dtype: dict[int, list[int]] = {}
            for i in ids:
                avail.add(i)  # noqa: B023 (called only inside this replay)
                live += size[i]
                total += size[i]
                tower += 0 if info[i].trainable else size[i]
                by_dtype.setdefault(info[i].elem_bytes, []).append(i)
            for group in by_dtype.values():
                if len(group) > 1:
                    flat = sum(size[i] for i in group)
                    if all_reduce_fetch:
                        reduced += flat
                    else:  # the flat buffer and the copies out of it, for a moment at once
                        copy = max(copy, flat)

        for event in trace.events:
            if event[0] == "get":
                _, reader, ident = event
                if ident in info and ident not in avail and ident not in persistent:
                    gather([ident])
                    external.setdefault(reader, set()).add(ident)
                peak = max(peak, live)
                continue
            name = event[1]
            mine = [p.ident for p in owner[name]] + sorted(external.get(name, ()))
            if event[0] in ("fwd", "bwd"):
                gather([i for i in mine if i not in avail and i not in persistent])
                peak = max(peak, live)
                position += 1
                if event[0] == "fwd":  # freed when its forward ends
                    continue
            window, traversed = set(), 0
            for _, later in fetches[position:]:
                if traversed >= reuse_distance:
                    break
                for i in [p.ident for p in owner[later]] + sorted(external.get(later, ())):
                    window.add(i)
                    traversed += info[i].numel
            for i in mine:
                if i in avail and i not in window:
                    avail.discard(i)
                    live -= size[i]
        result = {
            "gather_calls": calls,
            "gather_bytes": total,
            "tower_gather_bytes": tower,
            "all_reduce_fetch_bytes": reduced,
            "peak_gathered_bytes": peak,
            "fetch_copy_bytes": copy,
        }
    result["persistent_bytes"] = sum(info[i].numel * info[i].elem_bytes for i in persistent)
    return result


def _stage(m: _Model, cfg: RunConfig, stage: int, world: int, hw: Hardware, zero: dict[str, Any]) -> dict[str, Any]:
    gas = cfg.accumulation(world) if cfg.train.global_batch % (cfg.train.micro_batch * world) == 0 else 1
    gas = max(gas, 1)
    t_numel = sum(n for n, _ in m.trainable)
    pb = m.trainable[0][1] if m.trainable else 4
    half = cfg.train.precision in HALF
    if stage == 3:
        tower = sum(_pad(n, world) * b for n, b in m.tower)
        params = sum(_pad(n, world) * b for n, b in m.trainable)
    else:
        tower = sum(n * b for n, b in m.tower)
        params = t_numel * pb
    part = _pad(t_numel, world)
    if stage == 0:
        grads = t_numel * pb + (t_numel * 4 if half else 0)  # bf16/fp16: fp32 accumulation buffer too
        master = t_numel * 4 if half else 0
        adam = 2 * 4 * t_numel
    else:
        grads = part * pb  # the rank's reduced partition (stage 3: its flat gradient buffer)
        if stage == 1:
            grads += t_numel * pb  # stage 1 keeps whole gradients until the step
        if stage in (1, 2) and half:
            grads += part * 4  # its fp32 copy for the step
        master = part * 4
        adam = 2 * 4 * part
    knob = {**ZERO_DEFAULTS, **zero}
    linear_saves = stage == 3 and bool(knob["memory_efficient_linear"]) and m.trace_zero3 is not None
    act = (m.trace_zero3 if linear_saves else m.trace).peak_bytes  # type: ignore[union-attr]
    gathered = persistent = buffers = prefetch = copy = 0
    if stage > 0 and knob["contiguous_gradients"]:  # DeepSpeed's gradient bucket, allocated whole
        buffers = int(knob["reduce_bucket_size"]) * pb
    comm: dict[str, float] = {}
    if stage == 3:
        z = simulate_zero3(
            m.trace,
            world,
            reuse_distance=int(knob["stage3_max_reuse_distance"]),
            persistence_threshold=int(knob["stage3_param_persistence_threshold"]),
            all_reduce_fetch=bool(knob["stage3_use_all_reduce_for_fetch_params"]),
        )
        gathered, persistent, copy = z["peak_gathered_bytes"], z["persistent_bytes"], z["fetch_copy_bytes"]
        tower_elem = max((b for _, b in m.tower), default=0)
        prefetch = min(int(knob["stage3_prefetch_bucket_size"]), sum(n for n, _ in m.tower)) * tower_elem
        comm.update(
            gather_calls_per_micro_batch=z["gather_calls"],
            gather_bytes=z["gather_bytes"] * gas,
            tower_gather_bytes=z["tower_gather_bytes"] * gas,
            tower_gathers_per_step=z["tower_gather_bytes"]
            * gas
            / max(1, sum(_pad(n, world) * world * b for n, b in m.tower)),
            all_reduce_fetch_bytes=z["all_reduce_fetch_bytes"] * gas,
            grad_reduce_scatter_bytes=part * world * pb * gas,
        )
        # an all-reduce moves twice an all-gather's bytes
        fetched = comm["gather_bytes"] + comm["all_reduce_fetch_bytes"]
        traffic = (world - 1) / world * (fetched + comm["grad_reduce_scatter_bytes"])
    elif stage in (1, 2):
        comm.update(grad_reduce_bytes=t_numel * pb * (gas if stage == 2 else 1), param_gather_bytes=t_numel * pb)
        traffic = (world - 1) / world * (2 * comm["grad_reduce_bytes"] + comm["param_gather_bytes"])
    else:
        comm.update(grad_all_reduce_bytes=t_numel * pb)
        traffic = 2 * (world - 1) / world * comm["grad_all_reduce_bytes"]
    comm["traffic_bytes_per_gpu"] = traffic
    memory = {
        "tower": tower,
        "adapter_params": params,
        "gradients": grads,
        "fp32_master": master,
        "optimizer_state": adam,
        "activations": act,
        "buffers": m.buffer_bytes,
        "zero_buffers": buffers,
        "zero3_gathered": gathered,
        "zero3_fetch_copy": copy,  # an upper bound: it lasts one fetch, maybe not at the step's peak
        "zero3_prefetch": prefetch,
        "zero3_persistent": persistent,
        "overhead": hw.overhead_gib * GIB,
    }
    memory["total"] = sum(memory.values())
    samples = cfg.train.micro_batch * gas
    flops = samples * (m.flops["per_sample"] + m.recompute_flops)
    bw = (hw.intra_node_gbs if world <= hw.gpus_per_node else hw.inter_node_gbs) * 1e9
    compute_s = flops / (hw.peak(cfg.train.precision if half else cfg.model.precision) * hw.mfu)
    comm_s = traffic / bw if world > 1 else 0.0
    return {
        "fits": memory["total"] <= hw.memory_gib * GIB,
        "memory_gib": {k: round(v / GIB, 3) for k, v in memory.items()},
        "memory_bytes": memory,
        "communication": comm,
        "flops_per_gpu": flops,
        "time_s": {"compute": compute_s, "communication": comm_s, "step": compute_s + comm_s},
    }


def plan_run(
    cfg: RunConfig,
    *,
    world_size: int,
    hardware: Hardware,
    num_classes: int = 1000,
    stages: tuple[int, ...] = (0, 1, 2, 3),
    zero: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-GPU memory, communication, FLOPs and time of ``cfg`` at each ZeRO stage, and a verdict.

    Args:
        cfg: The run config (model, adapter, micro-batch, precision, checkpointing, consistency).
        world_size: GPUs.
        hardware: The GPU and interconnect.
        num_classes: Head size.
        stages: Stages to evaluate.
        zero: ZeRO settings for every stage (``reduce_bucket_size``, ``stage3_max_reuse_distance``,
            ``stage3_param_persistence_threshold``, ...); default: per stage, the run's
            ``train.zero_config`` file if it is of that stage, else ``ds_configs/zero<stage>.json``,
            then DeepSpeed's defaults.

    Returns:
        A JSON-ready dict: the inputs, parameter counts, ``stages`` (per stage: ``fits``,
        ``memory_gib`` by item and ``total``, ``communication``, ``flops_per_gpu``, ``time_s``) and
        ``verdict`` (``fits``: the stages that fit; ``fastest``: the fastest of them or None).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    zeros = {s: dict(zero) if zero is not None else zero_settings(cfg, s) for s in stages}
    m = _meta_model(
        cfg,
        num_classes,
        zero3_linear=3 in stages and bool({**ZERO_DEFAULTS, **zeros.get(3, {})}["memory_efficient_linear"]),
    )
    rows = {str(s): _stage(m, cfg, s, world_size, hardware, zeros[s]) for s in stages}
    fits = [int(s) for s, r in rows.items() if r["fits"]]
    fastest = min(
        fits, key=lambda s: (rows[str(s)]["time_s"]["step"], rows[str(s)]["memory_bytes"]["total"]), default=None
    )
    return {
        "backbone": m.name,
        "tower_params": sum(n for n, _ in m.tower),
        "trainable_params": sum(n for n, _ in m.trainable),
        "world_size": world_size,
        "micro_batch": cfg.train.micro_batch,
        "precision": cfg.train.precision,
        "tower_precision": cfg.model.precision,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "consistency": cfg.consistency.enabled,
        "image_size": cfg.data.image_size,
        "hardware": dataclasses.asdict(hardware),
        "stages": rows,
        "verdict": {"fits": fits, "fastest": fastest, "summary": _summary(rows, fits, fastest, hardware)},
    }


def _summary(rows: dict[str, Any], fits: list[int], fastest: int | None, hw: Hardware) -> str:
    if fastest is None:
        least = min(rows, key=lambda s: rows[s]["memory_bytes"]["total"])
        return (
            f"does not fit on {hw.memory_gib:g} GiB at any stage (least: ZeRO-{least} at "
            f"{rows[least]['memory_gib']['total']:.1f} GiB): more GPUs, a smaller micro-batch, "
            "activation checkpointing, or a bf16 tower"
        )
    r = rows[str(fastest)]
    return (
        f"ZeRO-{fastest}: {r['memory_gib']['total']:.1f} GiB of {hw.memory_gib:g} per GPU, about "
        f"{r['time_s']['step']:.2f} s per step; fits at stages {fits}"
    )


def format_plan(p: dict[str, Any]) -> str:
    """A readable table of :func:`plan_run`'s result."""
    lines = [
        f"{p['backbone']}: tower {p['tower_params'] / 1e6:.1f} M ({p['tower_precision']}), adapter + head "
        f"{p['trainable_params'] / 1e6:.2f} M, {p['world_size']} x {p['hardware']['name']} "
        f"({p['hardware']['memory_gib']:g} GiB), micro-batch {p['micro_batch']}, {p['precision']}, "
        f"checkpointing {'on' if p['gradient_checkpointing'] else 'off'}"
    ]
    items = list(next(iter(p["stages"].values()))["memory_gib"])
    lines.append(f"{'GiB per GPU':<18}" + "".join(f"{'ZeRO-' + s:>11}" for s in p["stages"]))
    for item in items:
        lines.append(f"{item:<18}" + "".join(f"{r['memory_gib'][item]:>11.2f}" for r in p["stages"].values()))
    lines.append(f"{'fits':<18}" + "".join(f"{str(r['fits']):>11}" for r in p["stages"].values()))
    lines.append(
        f"{'traffic GB/step':<18}"
        + "".join(f"{r['communication']['traffic_bytes_per_gpu'] / 1e9:>11.2f}" for r in p["stages"].values())
    )
    lines.append(
        f"{'TFLOP/step/GPU':<18}" + "".join(f"{r['flops_per_gpu'] / 1e12:>11.2f}" for r in p["stages"].values())
    )
    lines.append(f"{'step s (upper)':<18}" + "".join(f"{r['time_s']['step']:>11.3f}" for r in p["stages"].values()))
    lines.append("verdict: " + p["verdict"]["summary"])
    return "\n".join(lines)
