"""Real 2-rank DeepSpeed launches on CPU: MoSA under ZeRO 0-3 against the N-copies reference, in both
update semantics (``skip``: an unused copy has no gradient; ``coast``: zero gradients from its first
use on, as in the authors' PyTorch 1.11 runs)."""

from __future__ import annotations

import copy
import functools
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from launch_util import REPO, deepspeed_launch
from mosa_reference import build_pair, max_gap, ref_optimizer
from safetensors.torch import load_file
from tiny_models import batches

from mosa_scale.adapters import AdapterConfig
from mosa_scale.optim import sparse_layers
from mosa_scale.sparse import Router

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

log = logging.getLogger(__name__)
WORKER = REPO / "tests" / "engine" / "zero_worker.py"
STEPS, MICRO, LR, WD, EPS = 20, 4, 1e-2, 0.05, 1e-6
SHARES, SEMANTICS, SCOPES = ("none", "down", "up"), ("skip", "coast"), ("rank", "global")


def matrix() -> list[tuple[int, int, str, str, str]]:
    """(stage, N, share, inactive, scope) checked against the reference: every share x N x
    semantics at each of ZeRO 1-3, the routing scope alternating so both scopes meet every share,
    N, semantics and stage; ZeRO-0; and N 3 at ZeRO-3, where partition boundaries cut slices
    (with N 2 and 4 each parameter's midpoint is an expert boundary)."""
    out = []
    for stage in (1, 2, 3):
        for si, share in enumerate(SHARES):
            for n in (2, 4):
                for ii, inactive in enumerate(SEMANTICS):
                    out.append((stage, n, share, inactive, SCOPES[(stage + si + n // 2 + ii) % 2]))
    out += [(0, 4, "none", inactive, "rank") for inactive in SEMANTICS]
    out += [(3, 3, "none", inactive, scope) for inactive in SEMANTICS for scope in SCOPES]
    return out


RESUMED = [m for m in matrix() if m[0] in (1, 2, 3) and m[1:3] == (4, "none")]  # both semantics, each stage
DENSE = [(stage, 1, "none", "skip", "rank") for stage in (0, 1, 2, 3)]


def tag(stage, n, share, inactive, scope, world=2) -> str:
    return f"s{stage}_n{n}_{share}_{inactive}_{scope}_w{world}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    specs = [
        f"{s}/{n}/{sh}/{i}/{sc}" + ("/resume" if (s, n, sh, i, sc) in RESUMED else "")
        for s, n, sh, i, sc in matrix() + DENSE
    ]
    deepspeed_launch(WORKER, ["--out", str(out), "--runs", ",".join(specs), "--name", "two"], ranks=2, timeout=1500)
    deepspeed_launch(
        WORKER,
        ["--out", str(out), "--runs", "1/4/none/skip/rank,2/4/none/skip/rank,3/4/none/skip/rank", "--name", "one"],
        ranks=1,
    )
    results = []
    for f in sorted(out.glob("result_*.json")):
        results += json.loads(f.read_text())
    return out, results


@functools.cache
def reference(share: str, n: int, inactive: str, scope: str, world: int = 2):
    """Single process, in the runs' float32: each rank's micro-batch with its own experts; slice k's
    gradient is the mean over the ranks that used it, every other gradient the mean over all ranks.
    ``coast``: a copy that had a gradient before gets a zero one when no rank used it. (A float64
    reference drifts ~3e-6 from any float32 run, dense parameters included: Adam amplifies the
    float32 rounding of tiny gradients. tests/adapters/test_reference_exact.py checks the semantics
    in float64 to 1e-9.)"""
    cfg = AdapterConfig(method="parallel", bottleneck=8, num_experts=n, share=share, split_bias=True, dropout=0.0)
    model, ref, refs, _, _ = build_pair(cfg, seed=3)
    layers = sorted(sparse_layers(model).items(), key=lambda kv: kv[1].route_id)
    plans = Router(seed=3, scope=scope, world_size=world)
    plans.num_experts, plans.names = [m.num_experts for _, m in layers], [name for name, _ in layers]
    route = {name: m.route_id for name, m in layers}
    opt = ref_optimizer(ref, refs, lr=LR, wd=WD, eps=EPS)
    data = batches(STEPS * world, batch=MICRO, seed=1)
    copies = {id(p) for r in refs.values() for p in r.parameters()}
    had_grad: set[int] = set()
    for step in range(STEPS):
        choices = plans.plan(step)  # (ranks, routes)
        grads: dict[torch.nn.Parameter, list[torch.Tensor]] = {}
        for rank in range(world):
            for name, r in refs.items():
                r.k = int(choices[rank, route[name]])
            x, y = data[step * world + rank]
            F.cross_entropy(ref(x), y).backward()
            for r in refs.values():
                r.mask_grads()
            for p in ref.parameters():
                if p.grad is not None:
                    grads.setdefault(p, []).append(p.grad.clone())
                    p.grad = None
        for p in ref.parameters():
            if p in grads:
                p.grad = torch.stack(grads[p]).sum(0) / (len(grads[p]) if id(p) in copies else world)
                had_grad.add(id(p))
            elif inactive == "coast" and id(p) in had_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    return model, ref, refs


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_frozen_slices_bit_identical(runs, stage):
    _, results = runs
    mine = [r for r in results if r["stage"] == stage and r["experts"] > 1 and r["world"] == 2]
    assert len(mine) == 2 * sum(1 for m in matrix() if m[0] == stage)  # both ranks of every run
    assert all(r["checks"] > 0 and r["violations"] == 0 for r in mine), mine
    # skip freezes every unused slice, coast only the never-used ones: far fewer checks
    for inactive in SEMANTICS:
        assert sum(r["checks"] for r in mine if r["inactive"] == inactive) > 0


def test_partition_boundaries_cut_slices(runs):
    """The checks above include slices whose elements sit on both ranks' partitions."""
    _, results = runs
    for stage in (1, 2, 3):
        cut = [
            r["cut_slices"]
            for r in results
            if r["stage"] == stage and r["experts"] in (3, 4) and r["share"] == "none" and r["world"] == 2
        ]
        assert sum(cut) > 0, (stage, cut)


@pytest.mark.parametrize("stage,n,share,inactive,scope", matrix())
def test_trained_values_match_reference(runs, stage, n, share, inactive, scope):
    out, _ = runs
    values = load_file(str(out / f"values_{tag(stage, n, share, inactive, scope)}.safetensors"))
    model, ref, refs = reference(share, n, inactive, scope)
    model = copy.deepcopy(model)  # the cached reference twin stays untouched
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not unexpected
    assert not [k for k in missing if "mosa_" in k and not k.endswith(("assign", "base", "dims"))]
    gap = max_gap(model, ref, refs)
    assert gap <= 1e-6, gap


@pytest.mark.parametrize("stage,n,share,inactive,scope", RESUMED)
def test_resume_mid_run_equals_uninterrupted(runs, stage, n, share, inactive, scope):
    _, results = runs
    mine = [
        r
        for r in results
        if (r["stage"], r["experts"], r["share"], r["inactive"], r["scope"], r["world"])
        == (stage, n, share, inactive, scope, 2)
    ]
    assert len(mine) == 2 and all(r["resumed_gap"] is not None and r["resumed_gap"] <= 1e-6 for r in mine), mine


def test_two_param_groups_and_one_dense_adapter_of_state(runs):
    _, results = runs
    by = {
        (r["stage"], r["experts"], r["share"], r["inactive"], r["world"], r["rank"]): r
        for r in results
        if r["scope"] == "rank" or r["world"] == 2 and r["experts"] == 4
    }
    lines = []
    for stage in (0, 1, 2, 3):
        mosa = by[(stage, 4, "none", "skip", 2, 0)]
        dense = by[(stage, 1, "none", "skip", 2, 0)]
        assert mosa["groups"] == dense["groups"] == 2
        assert mosa["state_matches_masters"] and dense["state_matches_masters"]
        # split biases: MoSA holds exactly the dense adapter's values; ZeRO pads each of the 2 groups
        pad = 2 * 2 * 2 * 4 * 2
        assert abs(mosa["adam_state_bytes"] - dense["adam_state_bytes"]) <= pad
        line = (
            f"ZeRO-{stage}: Adam state per rank MoSA {mosa['adam_state_bytes']} B, dense {dense['adam_state_bytes']} B"
        )
        if stage == 0:
            assert mosa["adam_state_bytes"] == dense["adam_state_bytes"] == 8 * mosa["trainable"]
        else:
            one = by[(stage, 4, "none", "skip", 1, 0)]["adam_state_bytes"]
            two = [by[(stage, 4, "none", "skip", 2, r)]["adam_state_bytes"] for r in (0, 1)]
            assert all(abs(b - one / 2) <= pad for b in two), (one, two)
            line += f", 1 rank {one} B"
        lines.append(line)
    log.warning("optimizer state: %s", "; ".join(lines))


def test_frozen_tower_partitioned_only_under_zero3(runs):
    _, results = runs
    for r in results:
        if r["world"] != 2:
            continue
        if r["stage"] == 3:
            assert r["frozen_local"] <= r["frozen_total"] / 2 + 64 * 40, r  # a partition, plus per-param padding
        else:
            assert r["frozen_local"] == r["frozen_total"] > 0, r
