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
from mosa_scale.config.run import REPO_ROOT, RunConfig

log = logging.getLogger(__name__)

# settings whose one home is the run config; a ds_configs file must not carry them
RUN_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


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
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


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
            raise ValueError(f"ZeroShard: the DeepSpeed config has ZeRO stage {stage}; towers are partitioned "
                             "at stage 3 only (stages 0-2 keep a replicated tower)")
        self.ds_config = ds_config
        from deepspeed.accelerator import get_accelerator

        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    def construct(self) -> Any:
        from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

        return deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                   tensor_overrides=[DeepSpeedTensorOverride.device])

    def modify(self, params: Any) -> Any:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)

    def gathered(self, params: Any) -> Any:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def is_sharded(self, param: torch.Tensor) -> bool:
        return hasattr(param, "ds_id")

    def local_range(self, param: torch.nn.Parameter) -> tuple[int, int]:
        if getattr(param, "ds_zero_param_process_group", None) is not None or param.ds_tensor.final_location is not None:
            raise NotImplementedError(f"parameter {param.ds_id}: loading into hpZ secondary partitions or NVMe "
                                      "offload is not supported; use CPU offload or none")
        size = int(param.ds_tensor.ds_numel)
        start = size * dist.get_rank(group=param.ds_process_group)
        return start, max(0, min(size, int(param.ds_numel) - start))

    def write_local(self, param: torch.nn.Parameter, values: torch.Tensor) -> None:
        with torch.no_grad():
            param.ds_tensor.narrow(0, 0, values.numel()).copy_(values.reshape(-1))


def tower_shard(ds_config: dict[str, Any]) -> ZeroShard | None:
    """The construction hooks for the tower: partitioned under ZeRO-3, None (replicated) below."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    return ZeroShard(ds_config) if stage == 3 else None


def _match_zero_init_dtype(model: torch.nn.Module, ds_config: dict[str, Any]) -> None:
    """DeepSpeed casts every parameter of a replicated model to bf16/fp16, but leaves a model
    built under ``zero.Init`` as built: cast here what it would have cast (a sharded tower built
    in another dtype, the adapters), so both builds train the same numbers."""
    half = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else None)
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


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               ds_config: dict[str, Any]) -> Any:
    """Wraps model and client optimizer in a DeepSpeed engine.

    DeepSpeed casts the whole module (buffers included) to bf16/fp16; the MoSA buffers (W0, the
    partition, the decay factors s_k) are put back in full precision afterwards, so merges and the
    off-mask weight decay stay exact.
    """
    from mosa_scale.sparse import SparseExpertLinear

    keep = {(id(m), name): buf.detach().clone() for m in model.modules() if isinstance(m, SparseExpertLinear)
            for name, buf in m.named_buffers(recurse=False) if buf.is_floating_point()}
    _match_zero_init_dtype(model, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    for m in engine.module.modules():
        if isinstance(m, SparseExpertLinear):
            for name, buf in list(m.named_buffers(recurse=False)):
                if (id(m), name) in keep:
                    setattr(m, name, keep[(id(m), name)].to(buf.device))
    return engine


# DeepSpeed's collectives (deepspeed.comm), and which argument holds the full (unsharded) tensor
COLLECTIVES = {"all_gather_into_tensor": (0, "output_tensor"), "all_gather": (0, "tensor_list"),
               "reduce_scatter_tensor": (1, "tensor"), "reduce_scatter": (1, "input_list"), "all_reduce": (0, "tensor"),
               "all_reduce_coalesced": (0, "tensors"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
               "all_to_all_single": (1, "tensor")}


class CollectiveCounter:
    """Counts DeepSpeed's collectives while active: calls and bytes of the full tensor of each
    (an all-gather's output, a reduce-scatter's input, an all-reduce's or broadcast's tensor).

    Wraps the functions of ``deepspeed.comm`` (in the package and in ``deepspeed.comm.comm``,
    where its helpers such as ``allgather_fn`` look them up), through which all of DeepSpeed's
    ZeRO traffic passes. ``calls`` / ``bytes`` map op names to totals; ``reset()`` starts again.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def _wrap(self, name: str, fn: Any) -> Any:
        index, key = COLLECTIVES[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            t = args[index] if len(args) > index else kwargs[key]
            tensors = t if isinstance(t, (list, tuple)) else [t]
            self.calls[name] = self.calls.get(name, 0) + 1
            self.bytes[name] = self.bytes.get(name, 0) + sum(x.numel() * x.element_size() for x in tensors)
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveCounter:
        import deepspeed.comm
        import deepspeed.comm.comm

        for name in COLLECTIVES:
            fn = getattr(deepspeed.comm.comm, name, None)
            if fn is None:
                continue
            counted = self._wrap(name, fn)
            for namespace in (deepspeed.comm, deepspeed.comm.comm):
                self._saved.append((namespace, name, getattr(namespace, name)))
                setattr(namespace, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for namespace, name, fn in reversed(self._saved):
            setattr(namespace, name, fn)
        self._saved.clear()


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
