"""The compact MoSA linear layer: N sparse experts stored in one dense weight's worth of values.

Expert k's effective weight is ``W_k = s_k * W0`` off its mask and the trained values on it
(MOSA_SPEC section 3). Each expert's slice is its own 1-D parameter ``slice{k}`` (the values of
the entries it owns, in increasing flat-index order) so that an optimizer param group per slice
can skip it when unused; biases are ``bias{k}`` (a full vector per expert, or its share of a
split bias). All are direct parameters of this module, which ZeRO-3 needs to gather them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.sparse.partition import partition
from mosa_scale.sparse.routing import Router


class _ComposeExpert(torch.autograd.Function):
    """Builds expert k's dense tensor from its slice; every slice gets a gradient.

    The chosen slice gets the gathered gradient times ``scale``; all other slices get zeros, so
    every rank runs the same autograd graph whatever it chose (ZeRO's hooks and collectives
    must match across ranks).
    """

    @staticmethod
    def forward(ctx: Any, k: int, scale: float, base: torch.Tensor, index: torch.Tensor | None,
                *slices: torch.Tensor) -> torch.Tensor:
        ctx.k, ctx.scale, ctx.shapes = k, scale, [s.shape for s in slices]
        ctx.meta = [(s.dtype, s.device) for s in slices]
        if index is None:  # the slice is the whole tensor (an expert's own bias vector)
            ctx.save_for_backward()
            ctx.has_index = False
            return slices[k].clone()
        ctx.has_index = True
        ctx.save_for_backward(index)
        out = base.to(slices[k].dtype).clone()  # (D,)
        out[index] = slices[k]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = [torch.zeros(shape, dtype=dt, device=dev) for shape, (dt, dev) in zip(ctx.shapes, ctx.meta)]
        chosen = grad[ctx.saved_tensors[0]] if ctx.has_index else grad
        grads[ctx.k] = (chosen * ctx.scale).to(grads[ctx.k].dtype) if ctx.scale != 1.0 else chosen.to(grads[ctx.k].dtype)
        return (None, None, None, None, *grads)


def merged_weight_and_bias(
    slices: list[torch.Tensor],
    biases: list[torch.Tensor] | None,
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
        slices: N 1-D tensors, slice k holding the values of ``assign == k`` in flat order.
        biases: N bias tensors, or None for a layer without bias.
        base: Flat W0 (empty when W0 is zero).
        assign: Flat int8 expert index per entry.
        decay: (N,) per-expert weight-decay factors s_k.
        dims: ``(out, in)``.
        bias_assign: int8 expert index per bias entry when the bias is split.
    """
    n = len(slices)
    flat = torch.zeros(assign.numel(), dtype=torch.float32, device=assign.device)
    for k, s in enumerate(slices):
        flat[assign == k] = s.float()
    if base.numel():
        decay = decay.float()
        flat = flat + base.float() * (decay.sum() - decay[assign.long()])
    weight = (flat / n).reshape(dims)
    if biases is None:
        return weight, None
    if bias_assign is None:
        return weight, torch.stack([b.float() for b in biases]).mean(0)
    bias = torch.zeros(bias_assign.numel(), dtype=torch.float32, device=bias_assign.device)
    for k, b in enumerate(biases):
        bias[bias_assign == k] = b.float()
    return weight, bias / n


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

    def __init__(self, weight: torch.Tensor, *, bias: bool, num_experts: int, name: str, seed: int,
                 mode: str, split_bias: bool, router: Router) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"num_experts: got {num_experts}; a SparseExpertLinear needs N >= 2")
        out_f, in_f = weight.shape
        self.in_features, self.out_features, self.num_experts = in_f, out_f, num_experts
        self.name, self.split_bias = name, split_bias
        assign = partition((out_f, in_f), num_experts, seed=seed, name=f"{name}.weight", mode=mode).reshape(-1)
        w0 = weight.detach().float().reshape(-1)
        zero_base = not bool(w0.any())
        self.register_buffer("base", w0.new_empty(0) if zero_base else w0.clone())  # W0; empty = zeros
        self.register_buffer("assign", assign)
        self.register_buffer("decay", torch.ones(num_experts))  # s_k
        self.register_buffer("dims", torch.tensor([out_f, in_f], dtype=torch.int64))
        for k in range(num_experts):
            idx = torch.nonzero(assign == k).reshape(-1)
            self.register_buffer(f"index{k}", idx, persistent=False)
            self.register_parameter(f"slice{k}", nn.Parameter(w0[idx].clone()))
        self.has_bias = bias
        if bias:
            if split_bias:
                b_assign = partition((out_f,), num_experts, seed=seed, name=f"{name}.bias", mode="all")
                self.register_buffer("bias_assign", b_assign)
                for k in range(num_experts):
                    idx = torch.nonzero(b_assign == k).reshape(-1)
                    self.register_buffer(f"bias_index{k}", idx, persistent=False)
                    self.register_parameter(f"bias{k}", nn.Parameter(torch.zeros(idx.numel())))
            else:
                for k in range(num_experts):
                    self.register_parameter(f"bias{k}", nn.Parameter(torch.zeros(out_f)))
        self._router = [router]  # a list keeps the router out of the module tree
        self.route_id = router.register(name, num_experts)

    def slices(self) -> list[nn.Parameter]:
        return [getattr(self, f"slice{k}") for k in range(self.num_experts)]

    def biases(self) -> list[nn.Parameter] | None:
        return [getattr(self, f"bias{k}") for k in range(self.num_experts)] if self.has_bias else None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_indices()

    def _rebuild_indices(self) -> None:
        """Derives the non-persistent index buffers from the saved partition."""
        for k in range(self.num_experts):
            setattr(self, f"index{k}", torch.nonzero(self.assign == k).reshape(-1))
            if self.has_bias and self.split_bias:
                setattr(self, f"bias_index{k}", torch.nonzero(self.bias_assign == k).reshape(-1))

    def expert_weight(self, k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert k's dense weight ``(out, in)`` and bias ``(out,)``, differentiable in all slices."""
        slices = self.slices()
        base = self.base * self.decay[k] if self.base.numel() else slices[k].new_zeros(self.assign.numel())
        weight = _ComposeExpert.apply(k, scale, base, getattr(self, f"index{k}"), *slices)
        bias = None
        if self.has_bias:
            biases = self.biases()
            if self.split_bias:
                zero = biases[k].new_zeros(self.out_features)
                bias = _ComposeExpert.apply(k, scale, zero, getattr(self, f"bias_index{k}"), *biases)
            else:
                bias = _ComposeExpert.apply(k, scale, None, None, *biases)
        return weight.reshape(self.out_features, self.in_features), bias

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged dense weight and bias (used for evaluation)."""
        return merged_weight_and_bias(
            [s.detach() for s in self.slices()],
            None if not self.has_bias else [b.detach() for b in self.biases()],
            base=self.base, assign=self.assign, decay=self.decay, dims=(self.out_features, self.in_features),
            bias_assign=getattr(self, "bias_assign", None) if self.split_bias else None,
        )

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training: the routed expert's weight (gradients scaled for the data-parallel mean over
        the units that used it). Eval: the merged weight."""
        if not self.training:
            return self.merged()
        router = self._router[0]
        k = router.choice(self.route_id)
        return self.expert_weight(k, router.grad_scale(self.route_id, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        weight, bias = self.weight_and_bias()
        dtype = self.slice0.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, route={self.route_id}"
