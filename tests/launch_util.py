"""Real ``deepspeed`` launches from tests (2 ranks on CPU), with hub access off: the package's
launcher (:mod:`mosa_scale.engine.launch`) with the tests' environment, and a failed launch as a
test failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mosa_scale.engine.launch import LaunchFailed, launch_ranks, repo_env

REPO = Path(__file__).resolve().parents[1]


def launch_env() -> dict[str, str]:
    """The environment of a process a test starts: this checkout first on ``PYTHONPATH``, no hub
    access, one thread per rank."""
    # a private build cache: DeepSpeed JIT-builds its CPU comm op once per checkout instead of
    # rebuilding whenever another checkout on the machine built it with other flags
    return repo_env(
        REPO,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    )


def deepspeed_launch(
    script: Path | str, args: list[str], *, ranks: int = 2, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs ``script`` on ``ranks`` ranks from the checkout; with ``check``, a failed launch fails
    the test with the end of its output."""
    try:
        return launch_ranks(script, args, repo=REPO, env=launch_env(), ranks=ranks, timeout=timeout, check=check)
    except LaunchFailed as e:
        raise AssertionError(str(e)) from None
