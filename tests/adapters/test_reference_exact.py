"""mosa_scale trains to the same numbers as the N-copies reference written from MOSA_SPEC.

The reference keeps N full copies of every split weight, all starting at W0; the active copy's
gradient is multiplied by its mask after backward; stock torch AdamW steps every parameter that
has a gradient (copies not used this step have grad None).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mosa_scale.adapters import AdapterConfig
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict
from mosa_scale.optim import MoSAAdamW, sparse_layers
from mosa_reference import build_pair, max_gap, ref_optimizer
from tiny_models import batches

log = logging.getLogger(__name__)
LR, WD, STEPS = 1e-2, 0.05, 20


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


def test_skip_all_changes_nothing():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, _, _, router, opt = train_both(cfg, steps=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    decay = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".decay")}
    x, y = batches(1, seed=7)[0]
    router.begin_step(3)
    with router.forward_pass():
        F.cross_entropy(model(x), y).backward()
    opt.skip_all = True
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, state[id(p)][k]) for p, st in opt.state.items() for k, v in st.items())
    assert all(torch.equal(b, decay[n]) for n, b in model.named_buffers() if n.endswith(".decay"))
    opt.skip_all = False
    opt.step()  # the same gradients now do move the weights
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
