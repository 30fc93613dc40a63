"""mosa_scale trains to the same numbers as the N-copies reference written from MOSA_SPEC.

The reference keeps N full copies of every split weight, all starting at W0; the active copy's
gradient is multiplied by its mask after backward; stock torch AdamW steps every parameter that
has a gradient (copies not used this step have grad None).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict
from mosa_scale.optim import MoSAAdamW, sparse_layers
from mosa_scale.sparse import Router, SparseExpertLinear
from tiny_models import Classifier, batches, make_tower

log = logging.getLogger(__name__)
LR, WD, STEPS = 1e-2, 0.05, 20


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


def build_pair(cfg: AdapterConfig, *, fused: bool = False):
    """The mosa_scale model and its reference twin (same frozen tower, W0, head)."""
    router = Router(seed=cfg.seed)
    tower = make_tower(fused=fused)
    frozen = copy.deepcopy(tower)
    model = Classifier(tower, 32)
    inject_adapters(tower, tower.sites(), cfg, router=router, width=32)
    ref = copy.deepcopy(model)
    refs = {}
    for name, layer in sparse_layers(ref).items():  # swap every MoSA layer for N full copies
        parent, attr = name.rsplit(".", 1)
        refs[name] = RefSplitLinear(layer)
        setattr(ref.get_submodule(parent), attr, refs[name])
    return model, ref, refs, router, frozen


def ref_optimizer(ref: nn.Module, refs: dict) -> torch.optim.AdamW:
    copies = {id(p) for r in refs.values() for p in r.parameters()}
    decay = [p for n, p in ref.named_parameters() if p.requires_grad and id(p) not in copies and p.ndim >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.requires_grad and id(p) not in copies and p.ndim < 2]
    w = [p for r in refs.values() for p in r.weights]
    b = [p for r in refs.values() if r.biases is not None for p in r.biases]
    groups = [{"params": decay + w, "weight_decay": WD}, {"params": no_decay + b, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, weight_decay=WD)


def train_both(cfg: AdapterConfig, steps: int = STEPS, fused: bool = False):
    model, ref, refs, router, _ = build_pair(cfg, fused=fused)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=WD, lr=LR)
    ref_opt = ref_optimizer(ref, refs)
    route = {name: layer.route_id for name, layer in sparse_layers(model).items()}
    for step, (x, y) in enumerate(batches(steps)):
        window = router.begin_step(step)
        with router.forward_pass():
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for name, r in refs.items():  # the same routing draws
            r.k = int(window.choices[0, 0, 0, route[name]])
        F.cross_entropy(ref(x), y).backward()
        for r in refs.values():
            r.mask_grads()
        ref_opt.step()
        ref_opt.zero_grad()
    return model, ref, refs, router, opt


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


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["all", "row", "column"])
@pytest.mark.parametrize("share", ["none", "down", "up"])
def test_parallel_matches_reference(share, mode, n):
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=n, share=share, mode=mode, dropout=0.0)
    model, ref, refs, router, _ = train_both(cfg)
    assert refs, "the config must split at least one weight"
    gap = max_gap(model, ref, refs)
    assert gap <= 1e-6, gap
    # trained values moved away from init, so the comparison is not vacuous
    assert any(layer.slice0.detach().abs().sum() > 0 for layer in sparse_layers(model).values())
    merged = merge_state_dict(adapter_state_dict(model))
    for name, r in refs.items():
        mean_w = torch.stack([w.detach() for w in r.weights]).mean(0)
        assert (merged[f"{name}.weight"] - mean_w).abs().max().item() <= 1e-6
        mean_b = torch.stack([b.detach() for b in r.biases]).mean(0)
        assert (merged[f"{name}.bias"] - mean_b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("method,fused", [("lora", False), ("lora", True), ("sequential", False), ("houlsby", False)])
def test_other_methods_match_reference(method, fused):
    cfg = AdapterConfig(method=method, bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, ref, refs, router, _ = train_both(cfg, fused=fused)
    assert max_gap(model, ref, refs) <= 1e-6


def test_split_bias_matches_reference():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", split_bias=True, dropout=0.0)
    model, ref, refs, router, _ = train_both(cfg)
    assert max_gap(model, ref, refs) <= 1e-6
    merged = merge_state_dict(adapter_state_dict(model))
    for name, r in refs.items():
        mean_b = torch.stack([b.detach() for b in r.biases]).mean(0)
        assert (merged[f"{name}.bias"] - mean_b).abs().max().item() <= 1e-6


def test_inactive_slices_bit_identical_across_a_step():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, _, _, router, opt = train_both(cfg, steps=6)
    layers = {m.route_id: m for m in sparse_layers(model).values()}
    x, y = batches(1, seed=99)[0]
    window = router.begin_step(6)
    inactive = [(r, k) for r, m in layers.items() for k in range(m.num_experts) if (r, k) not in window.active]
    assert inactive
    def snap(r, k):
        p = getattr(layers[r], f"slice{k}")
        st = opt.state.get(p, {})
        return (p.detach().clone(), {k2: v.clone() for k2, v in st.items()}, layers[r].decay[k].clone())
    before = {key: snap(*key) for key in inactive}
    with router.forward_pass():
        F.cross_entropy(model(x), y).backward()
    opt.step()
    checked = 0
    for key, (value, state, decay) in before.items():
        v2, s2, d2 = snap(*key)
        assert torch.equal(value, v2) and torch.equal(decay, d2)
        assert state.keys() == s2.keys() and all(torch.equal(state[n], s2[n]) for n in state)
        checked += 1
    assert checked == len(inactive)
    # the active slices did move and count their own steps
    for r, k in window.active:
        p = getattr(layers[r], f"slice{k}")
        assert int(opt.state[p]["step"]) >= 1


def test_counting_one_adapter_worth_of_state():
    n = 4
    dense = AdapterConfig(method="parallel", bottleneck=8, num_experts=1, dropout=0.0)
    mosa = AdapterConfig(method="parallel", bottleneck=8, num_experts=n, share="none", dropout=0.0)

    def trainable(cfg):
        model, ref, refs, router, _ = build_pair(cfg)
        return model, ref, sum(p.numel() for p in model.parameters() if p.requires_grad), \
            sum(p.numel() for p in ref.parameters() if p.requires_grad)

    d_model, _, d_train, _ = trainable(dense)
    m_model, m_ref, m_train, r_train = trainable(mosa)
    layers = sparse_layers(m_model)
    extra_bias = sum((l.num_experts - 1) * l.out_features for l in layers.values())
    assert m_train == d_train + extra_bias  # one dense adapter + the N bias vectors
    split_elems = sum(l.out_features * l.in_features for l in layers.values())
    assert r_train == d_train + extra_bias + (n - 1) * split_elems  # N copies of each split weight
    model, _, _, router, opt = train_both(mosa, steps=STEPS)
    state = sum(t.numel() for st in opt.state.values() for name, t in st.items() if name in ("exp_avg", "exp_avg_sq"))
    assert all(p in opt.state for g in opt.param_groups for p in g["params"])  # every slice was active once
    assert state == 2 * m_train
    ref_state = 2 * r_train
    log.warning("counting (hidden 32, r 8, N %d, share none): dense trainable %d, MoSA trainable %d, "
                "MoSA Adam state %d, reference trainable %d, reference Adam state %d",
                n, d_train, m_train, state, r_train, ref_state)
