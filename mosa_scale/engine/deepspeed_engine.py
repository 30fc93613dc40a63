"""DeepSpeed setup: process group, the DeepSpeed config from the run config, the engine."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from mosa_scale.config.errors import ConfigError
from mosa_scale.config.run import REPO_ROOT, RUN_OWNED, RunConfig
from mosa_scale.optim import MoSAAdamW
from mosa_scale.optim.adamw import Fragment

log = logging.getLogger(__name__)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by deepspeed / torchrun; (0, 1, 0) for plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> None:
    """Starts the process group (gloo on CPU, nccl on GPU); plain ``python`` gets a 1-rank group."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    _unlink_shm_allreduce_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


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
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(Path("/dev/shm") / name)
    except FileNotFoundError:  # ranks on several machines, or not the CPU backend: no buffer
        pass


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO settings from ``train.zero_config``, the rest from the run config.

    Raises:
        ConfigError: if the ZeRO file sets something the run config owns.
    """
    path = Path(cfg.train.zero_config)
    path = path if path.is_file() else REPO_ROOT / path
    ds = json.loads(path.read_text())
    clash = [k for k in RUN_OWNED if k in ds]
    if clash:
        raise ConfigError([f"train.zero_config: {path.name} sets {', '.join(clash)}; these come from the run "
                           "config (train.*, optim.clip_grad), remove them from the DeepSpeed file"])
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


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               ds_config: dict[str, Any]) -> Any:
    """Wraps model and client optimizer in a DeepSpeed engine.

    DeepSpeed casts the whole module (buffers included) to bf16/fp16; the MoSA buffers (W0, the
    partition, the decay factors s_k) are put back in full precision afterwards, so merges and the
    off-mask weight decay stay exact. A :class:`~mosa_scale.optim.MoSAAdamW` is then bound to the
    fp32 partitions ZeRO hands it (:func:`bind_optimizer`).
    """
    from mosa_scale.sparse import SparseExpertLinear

    keep = {(id(m), name): buf.detach().clone() for m in model.modules() if isinstance(m, SparseExpertLinear)
            for name, buf in m.named_buffers(recurse=False) if buf.is_floating_point()}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
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
                raise RuntimeError(f"ZeRO-3 sub-group {i}: {flat.numel()} fp32 values for {offset} partitioned ones "
                                   "(NVMe optimizer offload is not supported with MoSA adapters)")
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
                    frags.append(Fragment(p, int(m.lp_fragment_address.start), int(m.hp_fragment_address.start),
                                          int(m.hp_fragment_address.numel)))
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
    raise RuntimeError(f"{type(zo).__name__}: unknown DeepSpeed optimizer wrapper; MoSA adapters cannot locate "
                       "their expert slices in its fp32 partitions")


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
                raise RuntimeError(f"optimizer binding: a fragment of {f.numel} values at {f.target_start} does not "
                                   "hold its parameter's values; this DeepSpeed version lays out partitions "
                                   "differently than mosa_scale expects")
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
