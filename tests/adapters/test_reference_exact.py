"""mosa_scale trains to the same numbers as the N-copies reference written from MOSA_SPEC.

The reference keeps N full copies of every split weight, all starting at W0; the active copy's
gradient is multiplied by its mask after backward; stock torch AdamW steps every parameter that
has a gradient. Under ``skip`` the copies not used this step have grad None (torch >= 2
``zero_grad``); under ``coast`` ``zero_grad(set_to_none=False)`` leaves zero tensors, as PyTorch
1.11 did in the authors' runs, so a copy steps every step from its first use on.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from mosa_reference import build_pair, max_gap, ref_optimizer
from tiny_models import batches

from mosa_scale.adapters import AdapterConfig
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict
from mosa_scale.optim import MoSAAdamW, sparse_layers
from mosa_scale.plan.trace import LiveBytes

log = logging.getLogger(__name__)
LR, WD, STEPS = 1e-2, 0.05, 20


def train_both(
    cfg: AdapterConfig,
    steps: int = STEPS,
    fused: bool = False,
    inactive: str = "skip",
    dtype: torch.dtype = torch.float64,
    eps: float = 1e-8,
):
    """Trains mosa_scale and the reference side by side on the same batches and routing draws.

    float64 by default: the two hold W0's decayed off-mask entries differently (s_k * W0 vs
    repeated in-place decay), which in float32 differ by rounding, and Adam amplifies rounding
    where a gradient is about eps; in float64 the two agree to ~1e-14, which tests the semantics
    rather than the rounding."""
    model, ref, refs, router, _ = build_pair(cfg, fused=fused)
    model.to(dtype)
    ref.to(dtype)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=WD, lr=LR, eps=eps, inactive=inactive)
    ref_opt = ref_optimizer(ref, refs, eps=eps)
    route = {name: layer.route_id for name, layer in sparse_layers(model).items()}
    for step, (x, y) in enumerate(batches(steps)):
        x = x.to(dtype)
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
        ref_opt.zero_grad(set_to_none=inactive == "skip")
    return model, ref, refs, router, opt


@pytest.mark.parametrize("inactive", ["skip", "coast"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["all", "row", "column"])
@pytest.mark.parametrize("share", ["none", "down", "up"])
def test_parallel_matches_reference(share, mode, n, inactive):
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=n, share=share, mode=mode, dropout=0.0)
    model, ref, refs, router, _ = train_both(cfg, inactive=inactive)
    assert refs, "the config must split at least one weight"
    gap = max_gap(model, ref, refs)
    assert gap <= 1e-9, gap
    # trained values moved away from init, so the comparison is not vacuous
    assert any(layer.expert_values(0).detach().abs().sum() > 0 for layer in sparse_layers(model).values())
    merged = merge_state_dict(adapter_state_dict(model))
    for name, r in refs.items():
        mean_w = torch.stack([w.detach() for w in r.weights]).mean(0)
        assert (merged[f"{name}.weight"] - mean_w).abs().max().item() <= 1e-6
        mean_b = torch.stack([b.detach() for b in r.biases]).mean(0)
        assert (merged[f"{name}.bias"] - mean_b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("inactive", ["skip", "coast"])
@pytest.mark.parametrize("share", ["none", "down", "up"])
def test_float32_training_tracks_reference(share, inactive):
    """The training dtype: float32 at the project's eps (1e-6) stays within rounding of the reference."""
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share=share, dropout=0.0)
    model, ref, refs, _, _ = train_both(cfg, inactive=inactive, dtype=torch.float32, eps=1e-6)
    assert max_gap(model, ref, refs) <= 2e-6


@pytest.mark.parametrize("inactive", ["skip", "coast"])
@pytest.mark.parametrize("method,fused", [("lora", False), ("lora", True), ("sequential", False), ("houlsby", False)])
def test_other_methods_match_reference(method, fused, inactive):
    cfg = AdapterConfig(method=method, bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, ref, refs, router, _ = train_both(cfg, fused=fused, inactive=inactive)
    assert max_gap(model, ref, refs) <= 1e-9


@pytest.mark.parametrize("inactive", ["skip", "coast"])
def test_split_bias_matches_reference(inactive):
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", split_bias=True, dropout=0.0)
    model, ref, refs, router, _ = train_both(cfg, inactive=inactive)
    assert max_gap(model, ref, refs) <= 1e-9
    merged = merge_state_dict(adapter_state_dict(model))
    for name, r in refs.items():
        mean_b = torch.stack([b.detach() for b in r.biases]).mean(0)
        assert (merged[f"{name}.bias"] - mean_b).abs().max().item() <= 1e-6


def test_skip_and_coast_differ_and_coast_counts_every_step_after_first_use():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.0)
    skip, coast = (train_both(cfg, steps=12, inactive=i) for i in ("skip", "coast"))
    gap = max(
        float((a.slices - b.slices).detach().abs().max())
        for a, b in zip(sparse_layers(skip[0]).values(), sparse_layers(coast[0]).values())
    )
    assert gap > 1e-3  # the two semantics train different numbers
    router = skip[3]
    for name, layer in sparse_layers(coast[0]).items():
        used = torch.zeros(12, layer.num_experts, dtype=torch.bool)
        for step in range(12):
            used[step, router.plan(step)[0, layer.route_id]] = True
        first = [int(torch.nonzero(used[:, k])[0]) if used[:, k].any() else 12 for k in range(layer.num_experts)]
        assert layer.steps.tolist() == [12 - f for f in first]  # every step from the first use on
        assert sparse_layers(skip[0])[name].steps.tolist() == used.sum(0).tolist()  # only when used


def expert_snapshot(opt, layer, k):
    """Expert k's values, both moments (its ranges of slices and biases), step count and s_k."""
    out = [layer.steps[k].clone(), layer.decay[k].clone()]
    for p, (off, n) in ((layer.slices, layer.ranges[k]), (layer.biases, layer.bias_ranges[k])):
        st = opt.state.get(p, {})
        out += [p.detach().narrow(0, off, n).clone()] + [
            st[x].narrow(0, off, n).clone() for x in sorted(st) if st[x].dim() > 0
        ]
    return out


@pytest.mark.parametrize("inactive", ["skip", "coast"])
def test_inactive_slices_bit_identical_across_a_step(inactive):
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, _, _, router, opt = train_both(cfg, steps=6, inactive=inactive)
    layers = {m.route_id: m for m in sparse_layers(model).values()}
    x, y = batches(1, seed=99)[0]
    x = x.double()
    window = router.begin_step(6)
    idle = [(r, k) for r, m in layers.items() for k in range(m.num_experts) if (r, k) not in window.active]
    # skip: every idle slice is frozen; coast: only those never used yet
    frozen = [(r, k) for r, k in idle if inactive == "skip" or int(layers[r].steps[k]) == 0]
    coasting = [(r, k) for r, k in idle if (r, k) not in frozen]
    assert frozen and (inactive == "skip" or coasting)
    before = {key: expert_snapshot(opt, layers[key[0]], key[1]) for key in idle}
    with router.forward_pass():
        F.cross_entropy(model(x), y).backward()
    opt.step()
    for key in frozen:
        assert all(torch.equal(a, b) for a, b in zip(before[key], expert_snapshot(opt, layers[key[0]], key[1]))), key
    for key in coasting:  # stale momentum moved the values, the count advanced
        after = expert_snapshot(opt, layers[key[0]], key[1])
        assert int(after[0]) == int(before[key][0]) + 1 and not torch.equal(after[2], before[key][2])
    for r, k in window.active:
        assert int(layers[r].steps[k]) >= 1


def test_counting_one_adapter_worth_of_state():
    n = 4
    dense = AdapterConfig(method="parallel", bottleneck=8, num_experts=1, dropout=0.0)
    mosa = AdapterConfig(method="parallel", bottleneck=8, num_experts=n, share="none", dropout=0.0)

    def trainable(cfg):
        model, ref, refs, router, _ = build_pair(cfg)
        return (
            model,
            ref,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in ref.parameters() if p.requires_grad),
        )

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
    log.warning(
        "counting (hidden 32, r 8, N %d, share none): dense trainable %d, MoSA trainable %d, "
        "MoSA Adam state %d, reference trainable %d, reference Adam state %d",
        n,
        d_train,
        m_train,
        state,
        r_train,
        ref_state,
    )


def test_skip_all_changes_nothing():
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", dropout=0.0)
    model, _, _, router, opt = train_both(cfg, steps=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    decay = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".decay", ".steps"))}
    x, y = batches(1, seed=7)[0]
    x = x.double()
    router.begin_step(3)
    with router.forward_pass():
        F.cross_entropy(model(x), y).backward()
    opt.skip_all = True
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, state[id(p)][k]) for p, st in opt.state.items() for k, v in st.items())
    assert all(torch.equal(b, decay[n]) for n, b in model.named_buffers() if n.endswith((".decay", ".steps")))
    opt.skip_all = False
    opt.step()  # the same gradients now do move the weights
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("depth,n", [(2, 1), (2, 4), (6, 8)])
def test_param_groups_do_not_grow_with_depth_or_experts(depth, n):
    from tiny_models import Classifier, make_tower

    from mosa_scale.adapters import inject_adapters
    from mosa_scale.optim import build_param_groups
    from mosa_scale.sparse import Router

    tower = make_tower(depth=depth)
    model = Classifier(tower, 32)
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=n, share="none", dropout=0.0)
    inject_adapters(tower, tower.sites(), cfg, seed=0, router=Router(seed=0), width=32)
    groups = build_param_groups(model, weight_decay=WD)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert len(sparse_layers(model)) == (2 * depth if n > 1 else 0)


@pytest.mark.parametrize("inactive", ["skip", "coast"])
def test_per_run_and_vectorised_updates_are_bit_identical(inactive, monkeypatch):
    """A tensor with few stepped runs is updated run by run (torch's scalar AdamW on views), one with
    many through the masked per-element update: both give the same bits."""
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", split_bias=True, dropout=0.0)
    per_run = train_both(cfg, steps=8, inactive=inactive, dtype=torch.float32)[0]
    monkeypatch.setattr(MoSAAdamW, "loop_runs", 0)
    masked = train_both(cfg, steps=8, inactive=inactive, dtype=torch.float32)[0]
    a, b = dict(per_run.named_parameters()), dict(masked.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], dict(build_pair(cfg)[0].named_parameters())[n]) for n in a if "mosa" in n)


def _masked_training(cfg: AdapterConfig, inactive: str, piece: int, steps: int = 6):
    """Trains with every multi-run tensor through the masked update in pieces of ``piece``
    elements; returns the model, the optimizer and the live-tensor peak of the last step's update."""
    model, _, _, router, _ = build_pair(cfg)
    model.float()
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=WD, lr=LR, inactive=inactive)
    opt.loop_runs, opt.piece_numel = 0, piece
    for step, (x, y) in enumerate(batches(steps)):
        router.begin_step(step)
        with router.forward_pass():
            F.cross_entropy(model(x), y).backward()
        with LiveBytes() as live:  # Adam's moments exist after the first step: temporaries only
            opt.step()
        opt.zero_grad()
    return model, opt, live.peak


@pytest.mark.parametrize("inactive", ["skip", "coast"])
def test_masked_update_in_pieces_is_bit_identical_and_bounded(inactive):
    """The masked update goes piece by piece (a rank's flat ZeRO partition is one tensor): small
    pieces give the bits of one whole piece, and its temporaries shrink with the piece."""
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=4, share="none", split_bias=True, dropout=0.0)
    whole, opt, whole_peak = _masked_training(cfg, inactive, piece=1 << 40)
    cut, cut_opt, cut_peak = _masked_training(cfg, inactive, piece=8)
    a, b = dict(whole.named_parameters()), dict(cut.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    stepped = [n for n in a if opt.state[a[n]]]
    assert stepped == [n for n in b if cut_opt.state[b[n]]] and any("mosa" in n for n in stepped)
    for n in stepped:  # the moments too
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a[n]][key], cut_opt.state[b[n]][key]), (n, key)
    runs = [r for r in (cut_opt._runs_for(p) for p in cut.parameters() if p.requires_grad) if r is not None]
    biggest = max(runs, key=lambda r: r.numel)
    assert biggest.pieces(8) == [
        (i, i + 1, start, n) for i, (start, n) in enumerate(zip(biggest.starts, biggest.lengths))
    ]
    assert biggest.lengths == [64] * 4 and biggest.pieces(130) == [(0, 2, 0, 128), (2, 4, 128, 128)]
    longest_piece = max(n for r in runs for *_, n in r.pieces(8))
    # at least three temporaries of the whole tensor at once shrink to the piece's (5640 -> 2704 bytes
    # here; the rest is the dense parameters' AdamW, the same either way)
    assert whole_peak - cut_peak >= 3 * (biggest.numel - longest_piece) * 4
