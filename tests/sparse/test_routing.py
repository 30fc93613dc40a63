import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from tiny_models import Classifier, batches, make_tower

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.loss import consistency_loss
from mosa_scale.sparse import Router


def test_plans_are_pure_functions_of_the_step():
    a, b = Router(seed=5), Router(seed=5)
    for r in (a, b):
        for n in (2, 4, 3):
            r.register(f"l{n}", n)
    torch.manual_seed(0)
    pa = [a.plan(s, m, p) for s in range(5) for m in range(2) for p in range(2)]
    torch.manual_seed(99)  # global RNG state is not used
    pb = [b.plan(s, m, p) for s in range(5) for m in range(2) for p in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert all(int(p.max(0).values[i]) < n for p in pa for i, n in enumerate((2, 4, 3)))
    # a "resumed" router replays step 3 exactly
    c = Router(seed=5)
    for n in (2, 4, 3):
        c.register(f"l{n}", n)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.begin_step(3).choices, a.begin_step(3).choices)


def test_uniform_draws():
    r = Router(seed=0)
    r.register("x", 4)
    counts = torch.bincount(torch.cat([r.plan(s)[0] for s in range(4000)]), minlength=4).float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.03


def test_rank_scope_counts_and_scales():
    routers = [Router(seed=1, scope="rank", rank=i, world_size=4) for i in range(4)]
    for r in routers:
        r.register("a", 4)
    windows = [r.begin_step(7, micro_batches=2) for r in routers]
    assert all(torch.equal(w.choices, windows[0].choices) for w in windows)  # every rank knows every plan
    ch = windows[0].choices[:, 0, :, 0]  # (micro, ranks)
    assert len(set(ch.reshape(-1).tolist())) > 1  # ranks differ under rank scope
    for k in range(4):
        units = int((ch == k).sum())
        assert int(windows[0].counts[0, k]) == units
        if units:
            assert routers[0].grad_scale(0, k) == pytest.approx(4 * 2 / units)
    g = Router(seed=1, scope="global", world_size=4)
    g.register("a", 4)
    w = g.begin_step(7)
    assert len(set(w.choices[0, 0, :, 0].tolist())) == 1 and g.grad_scale(0, int(w.choices[0, 0, 0, 0])) == 1.0


def test_load_state_dict_refuses_another_run():
    a = Router(seed=1)
    a.register("x", 4)
    b = Router(seed=2)
    b.register("x", 2)
    with pytest.raises(ValueError, match="seed.*num_experts"):
        b.load_state_dict(a.state_dict())


def test_training_forward_outside_a_pass_is_an_error():
    router = Router(seed=0)
    tower = make_tower()
    inject_adapters(tower, tower.sites(), AdapterConfig(bottleneck=8, num_experts=2), seed=0, router=router, width=32)
    with pytest.raises(RuntimeError, match="forward_pass"):
        tower(torch.randn(2, 5, 16))


def _grads(checkpoint_fn, cfg, backward_in_pass=False, seed=11):
    router = Router(seed=seed)
    tower = make_tower()
    model = Classifier(tower, 32)
    inject_adapters(tower, tower.sites(), cfg, seed=seed, router=router, width=32)
    if checkpoint_fn == "router":
        tower.checkpoint_fn = router.checkpoint
    elif checkpoint_fn == "plain":
        tower.checkpoint_fn = lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)
    x, y = batches(1)[0]
    router.begin_step(0, passes=2)
    torch.manual_seed(0)
    with router.forward_pass(0, 0):
        l1 = model(x)
    with router.forward_pass(0, 1):  # a second pass with fresh experts, then one backward
        l2 = model(x)
    loss = F.cross_entropy(l1, y) + consistency_loss(l1, l2)["total"]
    if backward_in_pass:
        with router.forward_pass(0, 1):
            loss.backward()
    else:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_replays_the_experts():
    cfg = AdapterConfig(bottleneck=8, num_experts=4, share="none", dropout=0.1)
    plain = _grads(None, cfg)
    ckpt = _grads("router", cfg)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=1e-6)
    # controls: a checkpoint that does not capture the plan fails loudly outside a pass, and
    # inside one it recomputes pass 1 with pass 2's experts
    with pytest.raises(RuntimeError, match="outside a routing pass"):
        _grads("plain", cfg)
    naive = _grads("plain", cfg, backward_in_pass=True)
    assert max((naive[n] - plain[n]).abs().max().item() for n in plain) > 1e-4
