"""The N-copies MoSA reference, written from MOSA_SPEC: N full copies of every split weight, all
starting at W0; the active copy's gradient is multiplied by its mask after backward; stock torch
AdamW steps every parameter that has a gradient (unused copies have grad None)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tiny_models import Classifier, make_tower
from torch import nn

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.optim import sparse_layers
from mosa_scale.sparse import Router, SparseExpertLinear

LR, WD = 1e-2, 0.05


class RefSplitLinear(nn.Module):
    """N full copies of W (and of the bias), each with its mask."""

    def __init__(self, layer: SparseExpertLinear) -> None:
        super().__init__()
        n, (out_f, in_f) = layer.num_experts, (layer.out_features, layer.in_features)
        w0 = layer.base.reshape(out_f, in_f) if layer.base.numel() else torch.zeros(out_f, in_f)
        assign = layer.assign.reshape(out_f, in_f).long()
        self.register_buffer("masks", torch.stack([(assign == k).float() for k in range(n)]))
        self.weights = nn.ParameterList(nn.Parameter(w0.clone()) for _ in range(n))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(out_f)) for _ in range(n)) if layer.has_bias else None
        self.bias_masks = None
        if layer.has_bias and layer.split_bias:
            self.bias_masks = torch.stack([(layer.bias_assign.long() == k).float() for k in range(n)])
        self.k = None

    @property
    def weight(self) -> torch.Tensor:  # read by LoRA on a fused in-projection
        return self.weights[self.k]

    def forward(self, x):
        return F.linear(x, self.weights[self.k], None if self.biases is None else self.biases[self.k])

    def mask_grads(self):  # the authors' `p.grad *= p.mask` after backward
        for k, w in enumerate(self.weights):
            if w.grad is not None:
                w.grad.mul_(self.masks[k])
        if self.bias_masks is not None:
            for k, b in enumerate(self.biases):
                if b.grad is not None:
                    b.grad.mul_(self.bias_masks[k])


def build_pair(cfg: AdapterConfig, *, seed: int = 3407, fused: bool = False):
    """The mosa_scale model and its reference twin (same frozen tower, W0, head); ``seed`` is the run seed."""
    router = Router(seed=seed)
    tower = make_tower(fused=fused)
    frozen = copy.deepcopy(tower)
    model = Classifier(tower, 32)
    inject_adapters(tower, tower.sites(), cfg, seed=seed, router=router, width=32)
    ref = copy.deepcopy(model)
    refs = {}
    for name, layer in sparse_layers(ref).items():  # swap every MoSA layer for N full copies
        parent, attr = name.rsplit(".", 1)
        refs[name] = RefSplitLinear(layer)
        setattr(ref.get_submodule(parent), attr, refs[name])
    return model, ref, refs, router, frozen


def ref_optimizer(ref: nn.Module, refs: dict, lr: float = LR, wd: float = WD, eps: float = 1e-8) -> torch.optim.AdamW:
    copies = {id(p) for r in refs.values() for p in r.parameters()}
    decay = [p for n, p in ref.named_parameters() if p.requires_grad and id(p) not in copies and p.ndim >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.requires_grad and id(p) not in copies and p.ndim < 2]
    w = [p for r in refs.values() for p in r.weights]
    b = [p for r in refs.values() if r.biases is not None for p in r.biases]
    groups = [{"params": decay + w, "weight_decay": wd}, {"params": no_decay + b, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, eps=eps)


def max_gap(model, ref, refs) -> float:
    gap = 0.0
    for name, layer in sparse_layers(model).items():
        r = refs[name]
        for k in range(layer.num_experts):
            w, b = layer.expert_weight(k)
            gap = max(gap, (w.detach() - r.weights[k].detach()).abs().max().item())
            if b is not None:
                gap = max(gap, (b.detach() - r.biases[k].detach()).abs().max().item())
    ref_dense = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad and n in ref_dense:
            gap = max(gap, (p.detach() - ref_dense[n].detach()).abs().max().item())
    return gap
