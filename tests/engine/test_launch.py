"""The bench scripts' launch helper: the command, environment, per-rank rows and the measured engines'
DeepSpeed config (the 2-rank launches themselves run in tests/bench)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from launch_util import REPO

from mosa_scale.engine.launch import bench_zero_config, deepspeed_command, read_rank_rows, repo_env, write_rank_rows


def test_bench_zero_config_is_a_plain_engine_at_the_given_stage():
    ds = bench_zero_config(3, micro=4, world=2, stage3_param_persistence_threshold=0)
    assert ds == {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    assert bench_zero_config(1, micro=32, world=2)["zero_optimization"] == {"stage": 1}


def test_command_and_environment(tmp_path):
    cmd = deepspeed_command(tmp_path / "bench.py", ["--worker", "--out", "x"], ranks=2)
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ["--num_gpus", "2"] and cmd[3] == "--master_port"
    assert 0 < int(cmd[4]) < 65536
    assert cmd[5:] == [str(tmp_path / "bench.py"), "--worker", "--out", "x"]
    if Path(sys.executable).with_name("deepspeed").is_file():
        assert cmd[0] == str(Path(sys.executable).with_name("deepspeed"))
    env = repo_env(tmp_path, OMP_NUM_THREADS="3")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path) and env["OMP_NUM_THREADS"] == "3"
    assert env["PATH"] == os.environ["PATH"]


def test_rank_rows_come_back_rank_by_rank(tmp_path):
    write_rank_rows(tmp_path, 1, [{"rank": 1, "v": 2.5}])
    write_rank_rows(tmp_path, 0, [{"rank": 0, "v": 1}, {"rank": 0, "v": 3}])
    assert read_rank_rows(tmp_path) == [{"rank": 0, "v": 1}, {"rank": 0, "v": 3}, {"rank": 1, "v": 2.5}]


def test_a_rank_ends_its_process_group_before_the_interpreter_exits(tmp_path):
    """The group's gloo threads are gone when the interpreter shuts down, also when a library
    imported after the group started binds it as a default argument (open_clip imports
    ``torch.distributed.nn``, whose functions take ``group=group.WORLD``): left running, a thread
    releasing a finished collective's tensors aborted the rank at exit."""
    code = (
        "import atexit, os, torch, torch.distributed as dist\n"
        "def threads():\n"
        "    return sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))\n"
        "atexit.register(lambda: print('ended', not dist.is_initialized(), threads()))  # runs last in, first out\n"
        "from mosa_scale.engine.deepspeed_engine import init_distributed\n"
        "init_distributed()\n"
        "import open_clip, torch.distributed.nn\n"
        "assert dist.is_initialized() and dist.get_world_size() == 1\n"
        "out = torch.empty(4)\n"
        "dist.all_gather_into_tensor(out, torch.ones(4))\n"
        "print('running', sum(t == 'pt_gloo_runloop' for t in threads()))\n"
    )
    env = repo_env(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "running 2"  # gloo's two run-loop threads while the group lives
    ended, initialized, names = lines[-1].split(" ", 2)
    assert (ended, initialized) == ("ended", "True")
    assert not [t for t in ast.literal_eval(names) if "gloo" in t], names
