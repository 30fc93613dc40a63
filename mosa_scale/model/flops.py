"""FLOPs of one training step on a frozen tower with adapters, and model FLOPs utilisation (MFU).

Counted from the module structure, never by running the model (works on the meta device and
under ZeRO-3, where parameters are partitioned but ``in_features`` / ``embed_dim`` are not):

* forward, per sample: every linear layer ``2 * in * out`` per token (blocks) or per sample
  (pooler, projection, head); ``nn.MultiheadAttention``'s fused in-projection ``2 * 3E * E`` per
  token; the patch convolution ``2 * C * k * k * D`` per patch; the attention matmuls
  ``2 * 2 * T^2 * D`` per block (Q K^T and P V). Norms, activations, softmax: not counted.
* backward of the FROZEN tower: activation gradients only (no weight gradients), i.e. 1x the
  forward of each frozen linear and 2x for the attention matmuls (both operands are
  activations), and only where the gradient flows: modules that run after the first trainable
  parameter. Blocks below the first adapter and the patch embedding get no backward.
* adapters and head (any module holding a trainable parameter): the full 3x forward
  (forward + activation gradient + weight gradient).
* consistency regularisation: the second pass is a full forward AND backward (both passes'
  logits are in the loss), so it doubles everything.

"Runs after" is module-registration order inside each block, with a block's attention matmuls
placed after the attention module's children. That is exact for the bottleneck adapters
(``parallel``, ``sequential``: they sit at the block's end, so their own block needs no frozen
backward) and approximate in the first adapted block for LoRA (k/v projections counted, fused
out-projection not) and Houlsby (that block's MLP not counted): well under one block's worth.

Wiring into the trainer (done once, after ``build_model``)::

    flops = step_flops(model, backbone, image_size=cfg.data.image_size or backbone.image.size,
                       global_batch=cfg.train.global_batch, consistency=cfg.consistency.enabled)
    peak = peak_flops(device, cfg.train.precision)
    ...
    metrics.update(throughput_metrics(flops, step_time_s=step_time, world_size=world, peak=peak))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mosa_scale.adapters import unwrap
from mosa_scale.backbones.base import Backbone
from mosa_scale.sparse.linear import SparseExpertLinear

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' data sheets. "fp32" is plain FP32
# (PyTorch's default matmul precision); bf16 and fp16 are tensor-core peaks. Looked up by the
# CUDA device name: more specific names first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}),  # SXM5
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),  # SXM4 and PCIe
)


@dataclass
class _Unit:
    """One counted computation: forward FLOPs per sample, whether it owns trainable parameters."""

    name: str
    forward: float
    trainable: bool
    backward_factor: float = 1.0  # activation-gradient FLOPs per forward FLOP when frozen


def _prefix_of(model: nn.Module, sub: nn.Module) -> str:
    if model is sub:
        return ""
    for name, m in model.named_modules():
        if m is sub:
            return name + "."
    raise ValueError("backbone.model is not a submodule of model: pass the model built around that backbone")


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _conv_positions(conv: nn.Conv2d, size: int) -> int:
    (k0, k1), (s0, s1), (p0, p1), (d0, d1) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if isinstance(conv.padding, str):
        raise ValueError(f"{conv}: string padding is not supported by the FLOP count")
    h = (size + 2 * p0 - d0 * (k0 - 1) - 1) // s0 + 1
    w = (size + 2 * p1 - d1 * (k1 - 1) - 1) // s1 + 1
    return h * w


def count_tokens(tower: nn.Module, image_size: int) -> int:
    """Sequence length of a ViT tower: patches of its first ``Conv2d`` plus one class token
    when the tower has a ``cls_token`` / ``class_embedding`` parameter.

    Raises:
        ValueError: when the tower has no patch convolution (pass ``tokens=`` instead).
    """
    conv = next((m for m in tower.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("no Conv2d patch embedding found; pass tokens= explicitly")
    names = {n.rsplit(".", 1)[-1] for n, _ in tower.named_parameters()}
    return _conv_positions(conv, image_size) + int(bool(names & {"cls_token", "class_embedding"}))


def _attention_width(model: nn.Module, prefix: str, site) -> int | None:
    if site.qkv_fused is not None:
        return int(model.get_submodule(prefix + site.qkv_fused).embed_dim)
    if site.qkv_linear is not None:
        return int(model.get_submodule(prefix + site.qkv_linear).out_features) // 3
    if site.q is not None:
        return int(model.get_submodule(prefix + site.q).out_features)
    return None


def _units(model: nn.Module, backbone: Backbone, image_size: int, tokens: int) -> list[_Unit]:
    """Computations in execution order (registration order; attention matmuls after the
    attention module's children)."""
    prefix = _prefix_of(model, backbone.model)
    blocks = prefix + backbone.blocks_path + "."
    attn_sites = {prefix + s.attn: s for s in backbone.sites}
    units: list[_Unit] = []

    def per(name: str) -> int:
        return tokens if name.startswith(blocks) else 1

    def visit(name: str, m: nn.Module) -> None:
        own = _owns_trainable(m)
        n = per(name)
        core = unwrap(m)  # a module an adapter wraps counts as itself (its children are visited below)
        if isinstance(core, (nn.Linear, SparseExpertLinear)):
            units.append(_Unit(name, 2.0 * core.in_features * core.out_features * n, own))
        elif isinstance(core, nn.MultiheadAttention):
            e = core.embed_dim
            width = 3 * e * e if core.in_proj_weight is not None else e * (e + core.kdim + core.vdim)
            frozen_in = core.in_proj_weight is None or not core.in_proj_weight.requires_grad
            units.append(_Unit(name + ".in_proj", 2.0 * width * n, not frozen_in))
        elif isinstance(core, nn.Conv2d):
            c = core.in_channels // core.groups * core.kernel_size[0] * core.kernel_size[1] * core.out_channels
            units.append(_Unit(name, 2.0 * c * _conv_positions(core, image_size), own))
        proj = m._parameters.get("proj")
        if isinstance(proj, torch.Tensor) and proj.ndim == 2:  # OpenCLIP's image projection
            units.append(_Unit(name + ".proj", 2.0 * proj.shape[0] * proj.shape[1] * n, proj.requires_grad))
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        if name in attn_sites:  # after the attention's own projections (and any LoRA in them)
            d = _attention_width(model, prefix, attn_sites[name]) or backbone.width
            units.append(_Unit(name + ".matmuls", 2.0 * 2.0 * tokens * tokens * d, False, backward_factor=2.0))

    visit("", model)
    return units


def step_flops(
    model: nn.Module,
    backbone: Backbone,
    *,
    image_size: int,
    global_batch: int,
    consistency: bool,
    tokens: int | None = None,
) -> dict[str, float]:
    """FLOPs of one optimizer step of ``model`` (frozen tower + adapters + head).

    Args:
        model: The classifier built around ``backbone.model`` (``build_model``'s first result),
            adapters injected; ``requires_grad`` marks what is trained. Meta or ZeRO-3 modules
            are fine: only shapes are read.
        backbone: The :class:`Backbone` record (``blocks_path`` and ``sites``).
        image_size: Input side in pixels (``cfg.data.image_size or backbone.image.size``).
        global_batch: Samples per optimizer step over all ranks and micro-batches.
        consistency: The consistency pass is on (two forwards and backwards per sample).
        tokens: Sequence length override; default: patches + class token.

    Returns:
        Per-sample FLOPs ``forward_frozen``, ``forward_trainable``, ``backward_frozen``
        (activation gradients only), ``backward_trainable`` (2x its forward), ``per_sample``
        (their sum times ``passes``), and ``per_step`` (= ``per_sample * global_batch``),
        ``passes``, ``tokens``, ``trainable_params``.

    Raises:
        ValueError: ``image_size`` / ``global_batch`` not positive, or ``backbone.model`` not
            inside ``model``.
    """
    if image_size <= 0 or global_batch <= 0:
        raise ValueError(f"image_size={image_size}, global_batch={global_batch}: both must be positive")
    t = tokens if tokens is not None else count_tokens(backbone.model, image_size)
    units = _units(model, backbone, image_size, t)
    first = next((i for i, u in enumerate(units) if u.trainable), len(units))
    fwd_frozen = sum(u.forward for u in units if not u.trainable)
    fwd_train = sum(u.forward for u in units if u.trainable)
    bwd_frozen = sum(u.forward * u.backward_factor for i, u in enumerate(units) if not u.trainable and i > first)
    passes = 2 if consistency else 1
    per_sample = passes * (fwd_frozen + fwd_train + bwd_frozen + 2.0 * fwd_train)
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    return {
        "tokens": float(t),
        "passes": float(passes),
        "forward_frozen": fwd_frozen,
        "forward_trainable": fwd_train,
        "backward_frozen": bwd_frozen,
        "backward_trainable": 2.0 * fwd_train,
        "per_sample": per_sample,
        "per_step": per_sample * global_batch,
        "trainable_params": float(trainable),
    }


def peak_flops(device: str | torch.device | None, precision: str) -> float | None:
    """Dense peak FLOP/s of one accelerator for ``precision`` (``fp32``, ``bf16``, ``fp16``).

    Args:
        device: A CUDA device, a CUDA device name (``"NVIDIA H100 80GB HBM3"``), or None / a CPU
            device.

    Returns:
        The data-sheet peak, or None for CPUs and GPUs not in :data:`PEAK_FLOPS` (MFU is then
        not reported).
    """
    if device is None:
        return None
    if isinstance(device, torch.device) or device in ("cpu", "cuda") or str(device).startswith(("cpu", "cuda")):
        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(dev)
    else:
        name = str(device)
    for key, table in PEAK_FLOPS:
        if key in name:
            return table.get(precision)
    return None


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s of one device over its peak; None without a peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_s / peak


def throughput_metrics(
    flops: dict[str, float], *, step_time_s: float, world_size: int, peak: float | None
) -> dict[str, float]:
    """TensorBoard scalars of one step: ``perf/tflops_per_s_per_gpu`` and, when the device's
    peak is known, ``perf/mfu``."""
    per_gpu = flops["per_step"] / max(step_time_s, 1e-12) / world_size
    out = {"perf/tflops_per_s_per_gpu": per_gpu / 1e12}
    u = mfu(per_gpu, peak)
    if u is not None:
        out["perf/mfu"] = u
    return out
