"""DeepSpeed setup: process group, the DeepSpeed config from the run config, the engine."""

from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

# imported before any process group exists: its functions take ``group=group.WORLD`` defaults,
# bound when the module is first imported (open_clip imports it); bound to a live group, they
# keep that group and its gloo threads alive after ``destroy_process_group``, into the
# interpreter's shutdown (see end_process_group)
import torch.distributed.nn  # noqa: F401

from mosa_scale.config.run import REPO_ROOT, RunConfig
from mosa_scale.engine.launch import free_port
from mosa_scale.host_memory import SHARDED_THRESHOLD, return_freed_memory
from mosa_scale.optim import MoSAAdamW
from mosa_scale.optim.adamw import Fragment
from mosa_scale.sparse import SparseExpertLinear

log = logging.getLogger(__name__)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by deepspeed / torchrun; (0, 1, 0) for plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> None:
    """Starts the process group (gloo on CPU, nccl on GPU); plain ``python`` gets a 1-rank group.

    Also makes freed host memory go back to the system (:mod:`mosa_scale.host_memory`), before
    the tower is built, so each rank's resident size follows what it holds.
    """
    if dist.is_initialized():
        return
    return_freed_memory()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    deepspeed.init_distributed()
    atexit.register(end_process_group)
    _unlink_shm_allreduce_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def end_process_group() -> None:
    """Ends the process group while the interpreter still runs (registered at exit by
    :func:`init_distributed`): its gloo threads are joined here, not left running into the
    interpreter's shutdown, where a thread still releasing a finished collective's tensors takes
    the interpreter lock and aborts the rank ("terminate called without an active exception",
    status -6). The group is freed only if nothing else holds it: see ``torch.distributed.nn``
    above."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _unlink_shm_allreduce_buffer() -> None:
    """Removes the name of this rank's shared-memory all-reduce buffer once every rank has mapped it.

    With all ranks on one machine, DeepSpeed's CPU backend shares a 69 MB buffer per rank through
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` and never unlinks it: every
    launch left them behind (memory no process frees), and a later launch on the same port opened
    the stale buffers. The mappings stay valid after the unlink; nothing is left once the ranks end,
    however they end.
    """
    if not dist.is_initialized():
        return
    dist.barrier()  # every rank has opened every other rank's buffer: the names are no longer needed
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    try:
        os.unlink(Path("/dev/shm") / name)
    except FileNotFoundError:  # ranks on several machines, or not the CPU backend: no buffer
        pass


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO settings from ``train.zero_config``, the rest from the run config
    (``load_run_config`` checked that the ZeRO file sets none of the settings the run config owns)."""
    path = Path(cfg.train.zero_config)
    path = path if path.is_file() else REPO_ROOT / path
    ds = json.loads(path.read_text())
    t = cfg.train
    ds.update(
        train_batch_size=t.global_batch,
        train_micro_batch_size_per_gpu=t.micro_batch,
        gradient_accumulation_steps=cfg.accumulation(world_size),
        gradient_clipping=cfg.optim.clip_grad,  # DeepSpeed's default is 1.0, never rely on it
        bf16={"enabled": t.precision == "bf16"},
        fp16={"enabled": t.precision == "fp16", "auto_cast": False},
    )
    return ds


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


class ZeroShard:
    """Tower construction partitioned across ranks for ZeRO-3 (the backbones' ``ShardHooks``).

    Modules are built inside ``deepspeed.zero.Init``: each module's parameters are partitioned
    right after its ``__init__``, so no rank ever holds the whole tower. ``zero.Init`` is told to
    place tensors only: the tower's dtype is set when modules register their parameters
    (``construct_in_dtype``), exactly as in a replicated build. Checkpoint tensors are written
    straight into each rank's partition, using ZeRO-3's layout (rank r holds flat elements
    ``[r * p, (r + 1) * p)`` of the parameter, ``p = ceil(numel / world)``).

    Args:
        ds_config: The run's DeepSpeed config (ZeRO stage 3).
    """

    def __init__(self, ds_config: dict[str, Any]) -> None:
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if stage != 3:
            raise ValueError(
                f"ZeroShard: the DeepSpeed config has ZeRO stage {stage}; towers are partitioned "
                "at stage 3 only (stages 0-2 keep a replicated tower)"
            )
        self.ds_config = ds_config
        from deepspeed.accelerator import get_accelerator

        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    def construct(self) -> Any:
        from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

        return deepspeed.zero.Init(
            config_dict_or_path=self.ds_config, tensor_overrides=[DeepSpeedTensorOverride.device]
        )

    def modify(self, params: Any) -> Any:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)

    def gathered(self, params: Any) -> Any:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def is_sharded(self, param: torch.Tensor) -> bool:
        return hasattr(param, "ds_id")

    def local_range(self, param: torch.nn.Parameter) -> tuple[int, int]:
        secondary = getattr(param, "ds_zero_param_process_group", None) is not None
        if secondary or param.ds_tensor.final_location is not None:
            raise NotImplementedError(
                f"parameter {param.ds_id}: loading into hpZ secondary partitions or NVMe "
                "offload is not supported; use CPU offload or none"
            )
        size = int(param.ds_tensor.ds_numel)
        start = size * dist.get_rank(group=param.ds_process_group)
        return start, max(0, min(size, int(param.ds_numel) - start))

    def write_local(self, param: torch.nn.Parameter, values: torch.Tensor) -> None:
        with torch.no_grad():
            param.ds_tensor.narrow(0, 0, values.numel()).copy_(values.reshape(-1))


def tower_shard(ds_config: dict[str, Any]) -> ZeroShard | None:
    """The construction hooks for the tower: partitioned under ZeRO-3, None (replicated) below.

    A run that shards its tower is short of host memory: under ZeRO-3 this also lowers glibc's
    mapping threshold to :data:`~mosa_scale.host_memory.SHARDED_THRESHOLD` (the module says what
    it saves and costs)."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage != 3:
        return None
    return_freed_memory(SHARDED_THRESHOLD)
    return ZeroShard(ds_config)


def _match_zero_init_dtype(model: torch.nn.Module, ds_config: dict[str, Any]) -> None:
    """DeepSpeed casts every parameter of a replicated model to bf16/fp16, but leaves a model
    built under ``zero.Init`` as built: cast here what it would have cast (a sharded tower built
    in another dtype, the adapters), so both builds train the same numbers."""
    half = (
        torch.bfloat16
        if ds_config.get("bf16", {}).get("enabled")
        else (torch.float16 if ds_config.get("fp16", {}).get("enabled") else None)
    )
    params = list(model.parameters())
    if half is None or not any(hasattr(p, "ds_id") for p in params):
        return
    for p in params:
        if not p.is_floating_point() or p.dtype == half:
            continue
        if hasattr(p, "ds_id"):
            p.ds_tensor.data = p.ds_tensor.data.to(half)
            p.data = torch.empty(0, dtype=half, device=p.device)
        else:
            p.data = p.data.to(half)


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """Wraps model and client optimizer in a DeepSpeed engine.

    DeepSpeed casts the whole module (buffers included) to bf16/fp16; the MoSA buffers (W0, the
    partition, the decay factors s_k) are put back in full precision afterwards, so merges and the
    off-mask weight decay stay exact. A :class:`~mosa_scale.optim.MoSAAdamW` is then bound to the
    fp32 partitions ZeRO hands it (:func:`bind_optimizer`).
    """
    keep = {
        (id(m), name): buf.detach().clone()
        for m in model.modules()
        if isinstance(m, SparseExpertLinear)
        for name, buf in m.named_buffers(recurse=False)
        if buf.is_floating_point()
    }
    _match_zero_init_dtype(model, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    for m in engine.module.modules():
        if isinstance(m, SparseExpertLinear):
            for name, buf in list(m.named_buffers(recurse=False)):
                if (id(m), name) in keep:
                    setattr(m, name, keep[(id(m), name)].to(buf.device))
    if isinstance(optimizer, MoSAAdamW):
        bind_optimizer(engine, optimizer)
    return engine


def optimizer_fragments(engine: Any) -> list[tuple[torch.Tensor, list[Any]]] | None:
    """Every tensor DeepSpeed's ZeRO wrapper hands the client optimizer, with the pieces of model
    parameters it holds; None when the client optimizer steps the parameters themselves.

    ZeRO-1/2 and the bf16 optimizer link each parameter to its fragment of the rank's flat fp32
    partition (``param._hp_mapping``); ZeRO-3 concatenates every parameter's own partition
    (``ds_tensor``: elements ``[rank * size, (rank + 1) * size)``) per sub-group; the fp16
    optimizer keeps one unpartitioned flat copy per group.

    Raises:
        RuntimeError: for a wrapper whose layout is not known (e.g. NVMe optimizer offload).
    """
    zo = engine.optimizer
    if isinstance(zo, torch.optim.Optimizer) and not hasattr(zo, "optimizer"):
        return None  # ZeRO-0 fp32: the client optimizer steps the module's parameters
    targets: list[tuple[torch.Tensor, list[Any]]] = []
    if hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for i, flat in enumerate(zo.fp32_partitioned_groups_flat):
            frags, offset = [], 0
            for p in zo.fp16_groups[i]:
                size = int(p.partition_numel())
                start = size * dist.get_rank(group=p.ds_process_group)
                n = max(0, min(size, int(p.ds_numel) - start))
                if n:
                    frags.append(Fragment(p, start, offset, n))
                offset += size
            if flat.numel() != offset:
                raise RuntimeError(
                    f"ZeRO-3 sub-group {i}: {flat.numel()} fp32 values for {offset} partitioned ones "
                    "(NVMe optimizer offload is not supported with MoSA adapters)"
                )
            targets.append((flat, frags))
        return targets
    flats = getattr(zo, "single_partition_of_fp32_groups", None) or getattr(zo, "fp32_groups_flat_partition", None)
    groups = getattr(zo, "bit16_groups", None) or getattr(zo, "bf16_groups", None)
    if flats is not None and groups is not None:  # ZeRO-1/2, bf16 optimizer
        for flat, params in zip(flats, groups):
            frags = []
            for p in params:
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    frags.append(
                        Fragment(
                            p,
                            int(m.lp_fragment_address.start),
                            int(m.hp_fragment_address.start),
                            int(m.hp_fragment_address.numel),
                        )
                    )
            targets.append((flat, frags))
        return targets
    if hasattr(zo, "fp32_groups_flat") and hasattr(zo, "fp16_groups"):  # fp16 optimizer, ZeRO-0
        for flat, params in zip(zo.fp32_groups_flat, zo.fp16_groups):
            frags, offset = [], 0
            for p in params:
                frags.append(Fragment(p, 0, offset, p.numel()))
                offset += p.numel()
            targets.append((flat, frags))
        return targets
    raise RuntimeError(
        f"{type(zo).__name__}: unknown DeepSpeed optimizer wrapper; MoSA adapters cannot locate "
        "their expert slices in its fp32 partitions"
    )


def bind_optimizer(engine: Any, optimizer: Any) -> None:
    """Tells the client :class:`~mosa_scale.optim.MoSAAdamW` where every parameter's values sit in
    the tensors DeepSpeed will have it step, after checking each fragment holds that parameter's
    values (a wrong map would step the wrong experts silently)."""
    targets = optimizer_fragments(engine)
    if targets is None:
        return
    for flat, frags in targets:
        for f in frags:
            mine = flat.detach().narrow(0, f.target_start, f.numel)
            local = f.param.ds_tensor.detach().reshape(-1) if hasattr(f.param, "ds_tensor") else None
            if local is not None:  # ZeRO-3: the piece is this rank's partition of the parameter
                theirs = local.narrow(0, 0, f.numel)
            else:
                theirs = f.param.detach().reshape(-1).narrow(0, f.param_start, f.numel)
            if not torch.equal(mine.to(theirs.dtype), theirs):
                raise RuntimeError(
                    f"optimizer binding: a fragment of {f.numel} values at {f.target_start} does not "
                    "hold its parameter's values; this DeepSpeed version lays out partitions "
                    "differently than mosa_scale expects"
                )
    optimizer.bind(targets)


def full_fp32_params(engine: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """Full fp32 values of trainable parameters on every rank (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    out = {}
    for name in names:
        p = params[name]
        if zero_stage(engine) == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
            out[name] = p.detach().float().cpu().clone()
        else:
            out[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
