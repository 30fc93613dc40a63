"""Local multi-rank launches (bench scripts, sweeps, tests): ``deepspeed --num_gpus N`` on this
machine (CPU ranks on gloo when there is no GPU), and the plain DeepSpeed config of the engines the
benches measure.

A bench script launches itself: the parent runs :func:`launch_ranks` with the script's own
``--worker`` arguments, each rank writes its rows with :func:`write_rank_rows`, and the parent
reads them back with :func:`read_rank_rows`. Imports nothing heavy (no deepspeed, no torch), so a
bench's parent process stays light.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class LaunchFailed(RuntimeError):
    """A multi-rank launch exited with an error; the message holds the end of its output."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_env(repo: str | Path, **overrides: str) -> dict[str, str]:
    """This process's environment with ``repo`` first on ``PYTHONPATH`` (so the ranks import the same
    ``mosa_scale``) and ``overrides`` set."""
    return dict(os.environ, **overrides, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))


def deepspeed_command(script: str | Path, args: Sequence[str], *, ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS...`` (the launcher beside this
    Python when there is one, else the one on ``PATH``), on a free port."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [
        str(deepspeed) if deepspeed.is_file() else "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


def launch_ranks(
    script: str | Path,
    args: Sequence[str],
    *,
    repo: str | Path,
    env: dict[str, str] | None = None,
    ranks: int = 2,
    what: str = "deepspeed launch",
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Runs ``script`` on ``ranks`` local ranks from ``repo`` and waits for it.

    Args:
        script: The script each rank runs.
        args: Its arguments.
        repo: Working directory of the launch.
        env: The ranks' environment (default: :func:`repo_env` of ``repo``).
        ranks: Number of ranks.
        what: Names the launch in the error message.
        timeout: Seconds before the launch is killed (``subprocess.TimeoutExpired``); None waits.
        check: Raise when the launch exits with an error; False returns it for the caller to read.

    Raises:
        LaunchFailed: when ``check`` and the launch exits with an error, with the end of its stdout
            and stderr.
    """
    proc = subprocess.run(
        deepspeed_command(script, args, ranks=ranks),
        cwd=repo,
        env=repo_env(repo) if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise LaunchFailed(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_rank_rows(out_dir: str | Path, rank: int, rows: list[dict[str, Any]]) -> None:
    """One rank's result rows, as ``out_dir/rank{rank}.json``."""
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(rows))


def read_rank_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's rows (:func:`write_rank_rows`), rank by rank."""
    return [r for f in sorted(Path(out_dir).glob("rank*.json")) for r in json.loads(f.read_text())]


def bench_zero_config(stage: int, *, micro: int, world: int, **zero: Any) -> dict[str, Any]:
    """The DeepSpeed config of a measured engine: ZeRO ``stage`` (plus ``zero`` settings), ``micro``
    samples per rank, no accumulation, no clipping, no logging; the optimizer is passed in (MoSA's)."""
    return {
        "train_batch_size": micro * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, **zero},
    }
