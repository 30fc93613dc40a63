"""bench/huge_tower.py end to end on a small tower (ViT-B-32, 2 real CPU ranks, ZeRO-3 with the
low-memory settings): the sharded checkpoint it writes, the partition each rank holds, the bytes
it reads, the planner beside each measurement. Peaks and times are the bench's to report; the
test checks what is deterministic and what the numbers must satisfy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from launch_util import REPO, launch_env

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

GB = 1e9


def test_bench_runs_a_sharded_tower_and_reports_beside_the_planner():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "huge_tower.py"),
            "--model",
            "ViT-B-32",
            "--image-size",
            "64",
            "--zero-config",
            "ds_configs/zero3_lowmem.json",
        ],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    plan = r["planner"]
    assert r["model"] == "ViT-B-32" and r["zero_config"] == "ds_configs/zero3_lowmem.json"
    half_tower = plan["tower_params"] * 2 / 2  # bf16, half on each of 2 ranks
    assert r["budget_gb_per_rank"] == pytest.approx(half_tower / GB + 1.5)
    # one shard: the image tower in bf16 plus a text-tower tensor (49408 x 1024) that is never read
    ckpt = r["checkpoint"]
    assert ckpt["files"] == 1
    assert 0 < ckpt["bytes"] - (plan["tower_params"] + 49408 * 1024) * 2 < 2**20  # + safetensors headers
    for part in ("random", "pretrained"):
        rows = r[part]
        assert [row["rank"] for row in rows] == [0, 1]
        for row in rows:
            assert row["tower_partition_gb"] * GB == pytest.approx(half_tower, rel=1e-4)
            read = row["bytes_read_gb"] * GB
            assert read == (pytest.approx(row["tower_partition_gb"] * GB) if part == "pretrained" else 0)
            # the partition is resident on top of the start-up size in every phase
            floor = row["startup_rss_gb"] + row["tower_partition_gb"]
            for phase in ("build", "initialize", "step", "second_step"):
                assert row[f"{phase}_peak_rss_gb"] > floor, (phase, row)
            # the planner's predictions sit beside the measurements (start-up size + its bytes)
            assert row["step_peak_rss_gb_predicted"] == pytest.approx(
                row["startup_rss_gb"] + plan["step_bytes"] / GB, rel=1e-9
            )
            assert row["step_s_predicted"] == plan["step_s"] > 0
            assert math.isfinite(row["loss"]) and 0 < row["loss"] < 20
    # the same seeded batches: the loaded tower's values, not the random ones, gave the losses
    assert [x["loss"] for x in r["random"]] != [x["loss"] for x in r["pretrained"]]
    assert r["within_budget"] is True
