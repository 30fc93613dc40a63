"""The compact MoSA linear layer: N sparse experts stored in one dense weight's worth of values.

Expert k's effective weight is ``W_k = s_k * W0`` off its mask and the trained values on it
(MOSA_SPEC section 3). All experts' trained values live in ONE 1-D parameter ``slices``,
expert-major (expert k's entries are a contiguous range), and all expert biases in one
parameter ``biases``; :mod:`mosa_scale.sparse.layout` documents the saved form. One tensor per
split weight keeps the optimizer's param groups, and so DeepSpeed's per-step collectives, those
of a dense adapter; :class:`~mosa_scale.optim.adamw.MoSAAdamW` steps each expert's range on its
own. Both are direct parameters of this module, which ZeRO-3 needs to gather them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.sparse.layout import (
    bias_partition,
    bias_ranges,
    expert_order,
    expert_ranges,
    scatter_expert_major,
    weight_partition,
)
from mosa_scale.sparse.routing import Router


class _ComposeExpert(torch.autograd.Function):
    """Builds expert k's dense weight from its range ``slices[offset:offset+length]`` (and its bias
    from its range of ``biases``), in one autograd node per layer.

    The backward returns a gradient for the whole ``slices`` (and ``biases``) tensor: the chosen
    range gets the gathered gradient times ``scale``, every other range zeros, so every rank runs
    the same autograd graph whatever it chose (ZeRO's hooks and collectives must match across
    ranks). A bias range with ``b_index`` None is the bias itself (an expert's own bias vector).
    """

    @staticmethod
    def forward(
        ctx: Any,
        scale: float,
        base: torch.Tensor,
        decay: torch.Tensor,
        index: torch.Tensor,
        slices: torch.Tensor,
        offset: int,
        length: int,
        biases: torch.Tensor | None,
        b_index: torch.Tensor | None,
        b_offset: int,
        b_length: int,
    ) -> Any:
        ctx.scale, ctx.ranges = scale, (offset, length, b_offset, b_length)
        ctx.numels = (slices.numel(), 0 if biases is None else biases.numel())
        # (D,) s_k * W0, or zeros when W0 is zero (an empty base)
        weight = (base * decay).to(slices.dtype) if base.numel() else slices.new_zeros(slices.numel())
        weight[index] = slices.narrow(0, offset, length)
        ctx.save_for_backward(index, b_index)
        if biases is None:
            return weight
        chosen = biases.narrow(0, b_offset, b_length)
        if b_index is None:
            return weight, chosen.clone()
        bias = biases.new_zeros(biases.numel())  # a split bias: (out,) with expert k's entries
        bias[b_index] = chosen
        return weight, bias

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        index, b_index = ctx.saved_tensors  # read once: activation checkpointing allows one unpack
        offset, length, b_offset, b_length = ctx.ranges
        scale = ctx.scale

        def full(numel: int, off: int, n: int, chosen: torch.Tensor) -> torch.Tensor:
            out = chosen.new_zeros(numel)
            out.narrow(0, off, n).copy_(chosen * scale if scale != 1.0 else chosen)
            return out

        g_slices = full(ctx.numels[0], offset, length, grads[0][index])
        g_biases = None
        if len(grads) > 1 and grads[1] is not None:
            g_biases = full(ctx.numels[1], b_offset, b_length, grads[1] if b_index is None else grads[1][b_index])
        elif ctx.numels[1]:
            g_biases = grads[0].new_zeros(ctx.numels[1])
        return None, None, None, None, g_slices, None, None, g_biases, None, None, None


def merged_weight_and_bias(
    slices: torch.Tensor,
    biases: torch.Tensor | None,
    *,
    base: torch.Tensor,
    assign: torch.Tensor,
    decay: torch.Tensor,
    dims: tuple[int, int],
    bias_assign: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merged dense weight and bias (MOSA_SPEC section 5), in fp32.

    ``W = (T + W0 * (sum_j s_j - s_{E(e)})) / N``: the mean of the N reference copies, whose
    off-mask entries were shrunk by weight decay to ``s_j * W0`` (T holds the trained values).
    Biases: the mean of the N expert biases (a split bias: its scattered values / N).

    Args:
        slices: Every expert's values, expert-major (:mod:`mosa_scale.sparse.layout`).
        biases: The expert biases (``N * out`` values, or ``out`` when split), or None.
        base: Flat W0 (empty when W0 is zero).
        assign: Flat int8 expert index per entry.
        decay: (N,) per-expert weight-decay factors s_k.
        dims: ``(out, in)``.
        bias_assign: int8 expert index per bias entry when the bias is split.
    """
    n = int(decay.numel())
    flat = scatter_expert_major(slices.reshape(-1), assign.reshape(-1))
    if base.numel():
        decay = decay.float().to(flat.device)
        flat = flat + base.float().reshape(-1) * (decay.sum() - decay[assign.reshape(-1).long()])
    weight = (flat / n).reshape(dims)
    if biases is None:
        return weight, None
    if bias_assign is None:
        return weight, biases.float().reshape(n, dims[0]).mean(0)
    return weight, scatter_expert_major(biases.reshape(-1), bias_assign.reshape(-1)) / n


class SparseExpertLinear(nn.Module):
    """A linear layer trained as N sparse experts (MoSA) in one dense weight's storage.

    Args:
        weight: Initial weight W0, ``(out, in)``; every expert starts from it.
        bias: Whether the layer has a bias (initialised to zero).
        num_experts: N >= 2.
        name: Qualified parameter name, seeding the partition.
        seed: Run seed.
        mode: Partition mode (``all``, ``row``, ``column``).
        split_bias: Partition the bias too instead of one full bias vector per expert.
        router: Shared :class:`Router`; this layer registers itself and gets a route id.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        bias: bool,
        num_experts: int,
        name: str,
        seed: int,
        mode: str,
        split_bias: bool,
        router: Router,
    ) -> None:
        super().__init__()
        assert num_experts >= 2, num_experts  # a block with N = 1 gets a dense nn.Linear (adapters.factory)
        out_f, in_f = weight.shape
        self.in_features, self.out_features, self.num_experts = in_f, out_f, num_experts
        self.name, self.split_bias, self.has_bias = name, split_bias, bias
        assign = weight_partition((out_f, in_f), num_experts, seed=seed, name=name, mode=mode)
        w0 = weight.detach().float().reshape(-1)
        zero_base = not bool(w0.any())
        self.register_buffer("base", w0.new_empty(0) if zero_base else w0.clone())  # W0; empty = zeros
        self.register_buffer("assign", assign)
        self.register_buffer("decay", torch.ones(num_experts))  # s_k
        self.register_buffer("steps", torch.zeros(num_experts, dtype=torch.int64))  # optimizer steps per expert
        self.register_buffer("dims", torch.tensor([out_f, in_f], dtype=torch.int64))
        if bias and split_bias:
            self.register_buffer("bias_assign", bias_partition(out_f, num_experts, seed=seed, name=name))
        self._rebuild_indices()
        self.slices = nn.Parameter(w0[self.order].clone())  # (D,) expert-major
        if bias:
            self.biases = nn.Parameter(torch.zeros(out_f if split_bias else num_experts * out_f))
        self._router = [router]  # a list keeps the router out of the module tree
        self._merged_cache: tuple[Any, tuple[torch.Tensor, torch.Tensor | None]] | None = None  # eval mode
        self.route_id = router.register(name, num_experts)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_indices()

    def _rebuild_indices(self) -> None:
        """Derives the expert ranges and the non-persistent index buffers from the saved partition."""
        self.register_buffer("order", expert_order(self.assign).to(self.assign.device), persistent=False)
        self.ranges = expert_ranges(self.assign, self.num_experts)
        b_assign = getattr(self, "bias_assign", None) if self.has_bias and self.split_bias else None
        self.bias_ranges = bias_ranges(self.out_features, self.num_experts, b_assign) if self.has_bias else []
        if b_assign is not None:
            self.register_buffer("bias_order", expert_order(b_assign).to(b_assign.device), persistent=False)

    def expert_values(self, k: int) -> torch.Tensor:
        """Expert k's trained weight values (a view into ``slices``)."""
        offset, length = self.ranges[k]
        return self.slices.narrow(0, offset, length)

    def expert_weight(self, k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert k's dense weight ``(out, in)`` and bias ``(out,)``; the gradient reaches ``slices``
        and ``biases`` (zeros outside expert k's ranges), times ``scale``."""
        offset, length = self.ranges[k]
        index = self.order.narrow(0, offset, length).long()  # int32 table; index ops take int64
        if not self.has_bias:
            weight = _ComposeExpert.apply(
                scale, self.base, self.decay[k], index, self.slices, offset, length, None, None, 0, 0
            )
            return weight.reshape(self.out_features, self.in_features), None
        b_off, b_len = self.bias_ranges[k]
        b_index = self.bias_order.narrow(0, b_off, b_len).long() if self.split_bias else None
        weight, bias = _ComposeExpert.apply(
            scale, self.base, self.decay[k], index, self.slices, offset, length, self.biases, b_index, b_off, b_len
        )
        return weight.reshape(self.out_features, self.in_features), bias

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged dense weight and bias (used for evaluation)."""
        return merged_weight_and_bias(
            self.slices.detach(),
            self.biases.detach() if self.has_bias else None,
            base=self.base,
            assign=self.assign,
            decay=self.decay,
            dims=(self.out_features, self.in_features),
            bias_assign=getattr(self, "bias_assign", None) if self.split_bias else None,
        )

    def _merge_key(self) -> tuple[tuple[torch.Tensor, int], ...]:
        """The tensors the merged weight is computed from, each with its in-place version counter."""
        ts = [self.slices, self.base, self.assign, self.decay]
        if self.has_bias:
            ts.append(self.biases)
        if self.has_bias and self.split_bias:
            ts.append(self.bias_assign)
        return tuple((t, t._version) for t in ts)

    def train(self, mode: bool = True) -> SparseExpertLinear:
        self._merged_cache = None
        return super().train(mode)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training: the routed expert's weight (gradients scaled for the data-parallel mean over
        the units that used it). Eval: the merged weight, computed once and kept while in eval mode
        and while none of its inputs was replaced or changed in place (``train()`` drops it)."""
        if not self.training:
            key, cached = self._merge_key(), self._merged_cache
            if (
                cached is None
                or len(cached[0]) != len(key)
                or any(a is not b or va != vb for (a, va), (b, vb) in zip(cached[0], key))
            ):
                self._merged_cache = cached = (key, self.merged())
            return cached[1]
        router = self._router[0]
        k = router.choice(self.route_id)
        return self.expert_weight(k, router.grad_scale(self.route_id, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        weight, bias = self.weight_and_bias()
        dtype = self.slices.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, route={self.route_id}"
