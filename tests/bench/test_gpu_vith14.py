"""The GPU benchmark's code path, run here on the CPU with a tiny OpenCLIP tower (about 15 s)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from launch_util import REPO, launch_env


def test_gpu_script_cpu_tiny_mode():
    env = launch_env()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_vith14.py"),
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--classes",
            "10",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["zero_stage"] == 2 and out["precision"] == "bf16" and out["batch"] == 4
    dense, mosa = out["variants"]["dense"], out["variants"]["mosa"]
    assert (dense["experts"], mosa["experts"]) == (1, 4)
    assert len(dense["step_s_all"]) == len(mosa["step_s_all"]) == 2
    assert mosa["flops_per_sample"] == dense["flops_per_sample"] > 0  # MoSA computes what the dense adapter does
    assert mosa["param_groups"] == dense["param_groups"] == 2  # the groups of a dense adapter, whatever N
    assert 0 < mosa["trainable_params"] - dense["trainable_params"] < 0.05 * dense["trainable_params"]
    assert dense["mfu"] is None  # no peak FLOP/s for a CPU
    assert all(math.isfinite(v["final_loss"]) for v in (dense, mosa))
    assert out["step_time_ratio_mosa_vs_dense"] == mosa["step_s_median"] / dense["step_s_median"]
