"""bench/collectives.py on 2 real CPU ranks: MoSA issues exactly the dense adapter's collectives per
optimizer step at ZeRO 1, 2 and 3 (counts are deterministic; times stay in the bench)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_util import REPO, launch_env

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches


def test_mosa_adds_no_collective_over_the_dense_adapter(tmp_path):
    out = tmp_path / "collectives.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "collectives.py"),
            "--stages",
            "1,2,3",
            "--blocks",
            "3",
            "--experts",
            "4,8",
            "--steps",
            "2",
            "--rounds",
            "0",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["all_counts_steady"]  # the same calls every step, whatever experts were drawn
    assert report["calls_ratio_mosa_vs_dense"] == {"zero1": 1.0, "zero2": 1.0, "zero3": 1.0}
    rows = report["rows"]
    assert len(rows) == 3 * 3 * 2  # stages x (dense, N 4, N 8) x ranks
    for row in rows:
        dense = next(r for r in rows if (r["stage"], r["rank"], r["experts"]) == (row["stage"], row["rank"], 1))
        assert row["calls_by_kind"] == dense["calls_by_kind"], (row, dense)
        assert row["param_groups"] == dense["param_groups"] == 2
        assert row["calls_per_step"] > 0
    # bytes: MoSA's extra expert bias vectors only (3 blocks x (N - 1) x 64 values in the Up bias)
    for stage, ratio in report["bytes_ratio_mosa_vs_dense"].items():
        assert 1.0 <= ratio < 1.1, (stage, ratio)
