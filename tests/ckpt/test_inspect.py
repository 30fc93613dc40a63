"""tools/inspect_checkpoint.py: counts, partitions and expert activations read back exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_util import REPO, launch_env

from mosa_scale.ckpt.consolidate import consolidate
from mosa_scale.ckpt.inspect import inspect_path
from mosa_scale.config.run import load_run_config
from mosa_scale.model.assembly import build_model
from mosa_scale.sparse import Router

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches


def replayed_activations(cfg, world: int = 2) -> dict[str, list[int]]:
    """Steps in which each expert was active, from the pure routing plans of the run."""
    router = Router(cfg.train.seed, cfg.routing.scope, 0, world)
    build_model(cfg, router, num_classes=10, meta=True)  # registers the routes in training order
    counts = {f"tower.{name}": [0] * n for name, n in zip(router.names, router.num_experts)}
    for step in range(cfg.train.steps):
        window = router.begin_step(step, micro_batches=cfg.accumulation(world), passes=2)
        for route, k in window.active:
            counts[f"tower.{router.names[route]}"][k] += 1
    return counts


@pytest.mark.parametrize("stage", [2, 3])
def test_inspect_deepspeed_checkpoint(zero_run, stage):
    run = zero_run(stage)
    cfg = load_run_config(run / "config.yaml")
    report = inspect_path(run)
    assert (report["zero_stage"], report["world_size"], report["step"]) == (stage, 2, 10)
    model, _, _ = build_model(cfg, Router(cfg.train.seed), num_classes=10, meta=True)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert report["counts"]["trainable_values"] == trainable == 1802
    assert report["counts"]["head_values"] == 330
    assert len(report["partitions"]) == 4
    for layer in report["partitions"].values():
        assert layer["experts"] == 4 and sum(layer["entries_per_expert"]) == layer["entries"] == 256
        assert layer["balanced"] and layer["slices_match_partition"]
        assert all(0.99 < s <= 1.0 for s in layer["decay"])
    assert report["expert_activations"] == replayed_activations(cfg)
    assert report["tensors"]["mosa_head.weight"] == {"shape": [10, 32], "dtype": "float32", "numel": 320}


def test_inspect_adapters_and_single_files(zero_run, tmp_path):
    run = zero_run(2)
    consolidate(run, tmp_path / "a", unmerged=True)
    merged = inspect_path(tmp_path / "a")
    assert merged["format"] == "merged" and merged["checksums"] == "ok" and not merged["partitions"]
    assert merged["counts"]["float_values"] == 2 * (32 * 2 + 8 * 32 + 8 + 32 * 8 + 32) + 330
    unmerged = inspect_path(tmp_path / "a" / "unmerged" / "adapter.safetensors")
    assert unmerged["format"] == "unmerged" and len(unmerged["partitions"]) == 4
    shard = inspect_path(run / "checkpoints" / "step00000005" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert shard["kind"] == "torch_file"
    assert shard["entries"]["optimizer_state_dict.zero_stage"] == "2"
    assert "cur_scale" in shard["entries"]["optimizer_state_dict.loss_scaler"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "inspect_checkpoint.py"), str(run), "--no-tensors"],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = json.loads(proc.stdout)
    assert cli["tag"] == "step00000010" and "tensors" not in cli and cli["counts"]["trainable_values"] == 1802
