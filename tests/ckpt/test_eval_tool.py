"""launchers/eval.py (one process, no DeepSpeed) against the training run's own 2-rank evaluation."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from launch_util import REPO, launch_env

from mosa_scale.ckpt.consolidate import consolidate
from mosa_scale.eval import evaluate_adapter

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

log = logging.getLogger(__name__)
EVAL = REPO / "launchers" / "eval.py"


@pytest.mark.parametrize("stage", [2, 3])
def test_eval_tool_top1_equals_the_runs_evaluation(zero_run, tmp_path, stage):
    run = zero_run(stage)
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 10
    consolidate(run, tmp_path / "adapter")
    proc = subprocess.run(
        [
            sys.executable,
            str(EVAL),
            "--adapter",
            str(tmp_path / "adapter"),
            "--data",
            str(run / "data"),
            "--split",
            "val",
            "--batch-size",
            "50",
        ],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log.warning(
        "ZeRO-%d: eval.py top1 %.6f on %d samples; the run's own eval %.6f on %d",
        stage,
        result["top1"],
        result["samples"],
        final["top1"],
        final["eval_samples"],
    )
    assert result["samples"] == final["eval_samples"]  # every validation sample, as the run's eval saw them
    assert result["top1"] == pytest.approx(final["top1"], abs=1e-12)
    per_class = result["per_class"]
    assert sum(c["samples"] for c in per_class.values()) == result["samples"]
    correct = sum(round(c["top1"] * c["samples"]) for c in per_class.values())
    assert correct == round(result["top1"] * result["samples"])


def test_eval_refuses_an_unmerged_adapter(zero_run, tmp_path):
    consolidate(zero_run(2), tmp_path / "a", unmerged=True)
    with pytest.raises(ValueError, match="unmerged MoSA state; merge it first"):
        evaluate_adapter(tmp_path / "a" / "unmerged", str(zero_run(2) / "data"), split="val")
    proc = subprocess.run(
        [sys.executable, str(EVAL), "--adapter", str(tmp_path / "missing"), "--data", "x"],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "adapter.safetensors does not exist" in proc.stderr
