"""Real 2-rank CPU training runs (one per ZeRO stage), launched once per test session and shared
by the consolidation, evaluation and inspection tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from launch_util import REPO, deepspeed_launch  # noqa: E402

TRAIN = REPO / "launchers" / "train.py"
CONFIG = REPO / "tests" / "engine" / "tiny_run.yaml"
# 10 steps, checkpoints at 5 and 10, one evaluation at the end over ALL validation samples
RUN_ARGS = (
    "train.steps=10",
    "train.checkpoint_every=5",
    "train.eval_every=10",
    "train.log_every=5",
    "train.eval_batches=null",
    "optim.lr=3.0e-2",
    "optim.warmup_steps=1",
)


@pytest.fixture(scope="session")
def zero_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``zero_run(stage)``: the run directory of a finished 2-rank run under that ZeRO stage."""
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            run = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            deepspeed_launch(
                TRAIN,
                [
                    "--config",
                    str(CONFIG),
                    f"train.run_dir={run}",
                    *RUN_ARGS,
                    f"train.zero_config=ds_configs/zero{stage}.json",
                ],
                ranks=2,
            )
            runs[stage] = run
        return runs[stage]

    return get
