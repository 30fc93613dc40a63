"""One training step of the real model, executed on the meta device: no memory, no compute.

The trace records what a step of ``model`` does, exactly as DeepSpeed ZeRO-3 sees it:

* ``events``: every module's forward (``("fwd", name)`` ... ``("end", name)``, including the
  recompute of checkpointed blocks during the backward), every module whose output receives a
  gradient (``("bwd", name)``)
  and every read of another module's parameter inside a forward (``("get", name, param id)``:
  a parent reading a child's weight, LoRA factors read by the layer they adapt), in execution
  order. ZeRO-3 gathers a module's parameters at its events and a parameter read elsewhere
  when it is not whole yet; from then on it belongs to the reading module too.
* ``params``: each module's own parameters (numel, bytes per element, trainable).
* ``saved_bytes``: the tensors autograd saves for the backward (activations; parameters
  excluded), per micro-batch, all passes; with activation checkpointing also the peak reached
  while one block is recomputed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mosa_scale.backbones import Backbone, enable_gradient_checkpointing
from mosa_scale.sparse import Router


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: its element count, bytes per element, and whether it is trained."""

    ident: int
    numel: int
    elem_bytes: int
    trainable: bool


@dataclass
class StepTrace:
    """What one micro-batch's training forward and backward do (see the module docstring)."""

    events: list[tuple] = field(default_factory=list)
    params: dict[str, list[ParamInfo]] = field(default_factory=dict)
    saved_bytes: int = 0  # activations held when the backward starts
    peak_bytes: int = 0  # most tensor bytes allocated at once during forward and backward (gradients included)
    recompute_peak_bytes: int = 0  # extra activations of the largest recomputed block (checkpointing)
    largest_saved_tensor: int = 0


class _ParamReads(dict):
    """A module's ``_parameters`` that reports each read (``module.weight``) to ``on_read``."""

    def __init__(self, items: dict, on_read: object) -> None:
        super().__init__(items)
        self.on_read = on_read

    def __getitem__(self, key: str) -> object:
        value = super().__getitem__(key)
        if value is not None:
            self.on_read(value)  # type: ignore[operator]
        return value


class LiveBytes(TorchDispatchMode):
    """Bytes of tensors allocated while active and still alive, and their peak: what a GPU's
    ``max_memory_allocated`` measures, on any device (meta included).

    An op's output is a new allocation unless it shares storage with one of its inputs (a view,
    an in-place op); a storage is freed when its last tensor goes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    @staticmethod
    def _key(st: Any) -> int:
        return st.data_ptr() or id(st)

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            self._key(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = self._key(st)
            if key in inputs or key in self._alive:
                continue
            nbytes = st.nbytes()
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return out


class _SavingLinear(torch.autograd.Function):
    """``F.linear`` that keeps its input for the backward even when the weight is frozen, as
    DeepSpeed's ZeRO-3 memory-efficient linear (on by default) does; ``F.linear`` keeps only the
    weight then."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        out = x.matmul(weight.t())  # (..., in) -> (..., out)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        gx = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        gw = (
            grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        )
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _saving_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _SavingLinear.apply(x, weight, bias)


def _param_infos(module: nn.Module) -> list[ParamInfo]:
    return [ParamInfo(id(p), p.numel(), p.element_size(), p.requires_grad) for p in module.parameters(recurse=False)]


def trace_step(
    model: nn.Module,
    backbone: Backbone,
    router: Router,
    *,
    micro_batch: int,
    image_size: int,
    passes: int = 1,
    gradient_checkpointing: bool = False,
    input_dtype: torch.dtype = torch.float32,
    saving_linear: bool = False,
) -> StepTrace:
    """Runs one training micro-batch (``passes`` forwards, then the backward) of a meta-device
    ``model`` and records it.

    Args:
        model: The classifier on the meta device, in its training dtypes (adapters injected).
        backbone: Its backbone record (blocks to checkpoint).
        router: The model's router (MoSA layers draw their experts from it).
        micro_batch: Samples per micro-batch.
        image_size: Input side in pixels.
        passes: Forward passes per micro-batch (2 with consistency regularisation).
        gradient_checkpointing: Checkpoint every block (recomputed in the backward).
        input_dtype: dtype of the pixels.
        saving_linear: Linear layers keep their input for the backward (DeepSpeed ZeRO-3's
            memory-efficient linear, which replaces ``F.linear`` in a ZeRO-3 process).

    Returns:
        The trace.
    """
    trace = StepTrace()
    names = {id(m): n for n, m in model.named_modules()}
    for n, m in model.named_modules():
        trace.params[n] = _param_infos(m)
    param_ids = {id(p) for p in model.parameters()}
    prefix = next((n + "." if n else "") for n, m in model.named_modules() if m is backbone.model)
    blocks = {prefix + s.block for s in backbone.sites}
    seen: set[int] = set()
    live = {"bytes": 0, "peak": 0, "backward": False, "base": 0}
    owner = {id(p): n for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    stack: list[str] = []

    def on_read(param: torch.Tensor) -> None:
        if stack and owner.get(id(param), stack[-1]) != stack[-1]:
            trace.events.append(("get", stack[-1], id(param)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) in param_ids or id(base) in param_ids or id(base) in seen:
            return t
        seen.add(id(base))
        nbytes = base.numel() * base.element_size()
        trace.largest_saved_tensor = max(trace.largest_saved_tensor, nbytes)
        live["bytes"] += nbytes
        if live["backward"]:  # a recomputed block's activations, on top of what the forward saved
            live["peak"] = max(live["peak"], live["bytes"] - live["base"])
        return t

    def on_pre(module: nn.Module, args: object) -> None:
        if id(module) in names:
            name = names[id(module)]
            stack.append(name)
            trace.events.append(("fwd", name))
            if live["backward"] and name in blocks:  # recomputing the next block: the last one's are freed
                live["bytes"] = live["base"]

    def on_post(module: nn.Module, args: object, output: object) -> None:
        if id(module) not in names:
            return
        name = names[id(module)]
        if stack and stack[-1] == name:
            stack.pop()
        trace.events.append(("end", name))
        if isinstance(output, (tuple, list)):
            outs = list(output)
        elif isinstance(output, torch.Tensor) or output is None:
            outs = [output]
        else:  # a dict or a model-output object, as DeepSpeed's hooks read it
            outs = list((output if isinstance(output, dict) else vars(output)).values())
        for out in outs:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g, name=name: trace.events.append(("bwd", name)))
                break

    if gradient_checkpointing:
        enable_gradient_checkpointing(backbone, router.checkpoint)
    originals = {id(m): m._parameters for m in model.modules()}
    for m in model.modules():
        m._parameters = _ParamReads(m._parameters, on_read)
    pre = torch.nn.modules.module.register_module_forward_pre_hook(on_pre)
    post = torch.nn.modules.module.register_module_forward_hook(on_post)
    linear = torch.nn.functional.linear
    if saving_linear:
        torch.nn.functional.linear = _saving_linear
    try:
        model.train()
        router.begin_step(0, micro_batches=1, passes=passes)
        x = torch.zeros(micro_batch, 3, image_size, image_size, device="meta", dtype=input_dtype)
        loss = None
        tracker = LiveBytes()
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for p in range(passes):
                with router.forward_pass(0, p):
                    out = model(x).float().sum()
                loss = out if loss is None else loss + out
            trace.saved_bytes = live["bytes"]
            live["backward"], live["base"] = True, live["bytes"]
            assert loss is not None
            loss.backward()
        trace.recompute_peak_bytes = live["peak"]
        trace.peak_bytes = tracker.peak
    finally:
        torch.nn.functional.linear = linear
        pre.remove()
        post.remove()
        for m in model.modules():
            m._parameters = originals[id(m)]
    return trace
