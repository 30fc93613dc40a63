"""Resume under attack and failure, with real 2-rank ``deepspeed`` launches: crafted pickles and
flipped bytes refused before anything is loaded or written, retention by step, no checkpoint in a
non-finite streak, one run per directory, and a SIGKILL in the middle of a save."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from hostile_files import flip_byte, plant_payload, refresh_manifest
from launch_util import REPO, deepspeed_launch, launch_env
from safetensors.torch import load_file

from mosa_scale.ckpt.manifest import MANIFEST_NAME, read_manifest, verify_tag
from mosa_scale.data import make_shards
from mosa_scale.engine.launch import deepspeed_command

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

TRAIN = REPO / "launchers" / "train.py"
CONFIG = REPO / "tests" / "engine" / "tiny_run.yaml"
STEPS = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Digits shards outside any run directory, so a copied run directory resumes on the same data."""
    out = tmp_path_factory.mktemp("data") / "digits"
    make_shards("digits", str(out), samples_per_shard=100, splits="train=0.8,val=0.2", seed=0, progress=False)
    return out


def args(run: Path, shards: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        f"train.run_dir={run}",
        f"data.train={shards}",
        f"data.val={shards}",
        f"train.steps={STEPS}",
        "train.checkpoint_every=5",
        "train.eval_every=10",
        *extra,
    ]


def final_eval(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith('{"final_eval"')][-1])["final_eval"]


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: tags 15 and 20 kept, its adapter and final evaluation."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = deepspeed_launch(TRAIN, args(run, shards))
    return run, final_eval(proc.stdout)


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file of a run directory but its lock file."""
    return {
        p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


def launch(run: Path, shards: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return deepspeed_launch(TRAIN, args(run, shards, *extra), timeout=timeout, check=False)


def test_resuming_a_finished_run_prints_its_final_eval_and_latest_is_required(finished, shards, tmp_path):
    run, evaluation = finished
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000015", "step00000020"]
    assert evaluation and 0 <= evaluation["top1"] <= 1
    copy = copy_run(run, tmp_path / "run")
    (copy / "checkpoints" / "latest").unlink()
    before = snapshot(copy)
    proc = launch(copy, shards)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (
            f"[rank{rank}] train: stopped: {copy / 'checkpoints'} holds checkpoint(s) step00000015, "
            "step00000020 but no 'latest' file" in proc.stderr
        )
    assert f"echo step00000020 > {copy / 'checkpoints' / 'latest'}" in proc.stderr and "to start fresh" in proc.stderr
    assert snapshot(copy) == before  # refused before anything was written
    (copy / "checkpoints" / "latest").write_text("step00000020")
    proc = launch(copy, shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step00000020 at step 20" in proc.stderr
    assert final_eval(proc.stdout) == evaluation


def test_crafted_pickles_and_flipped_bytes_are_refused_on_resume(finished, shards, tmp_path):
    run = copy_run(finished[0], tmp_path / "run")
    tag = run / "checkpoints" / "step00000020"
    marker = tmp_path / "payload_ran"
    planted = ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank00000_state.pt"]
    for name in planted:  # the three kinds of file: DeepSpeed model states, optimizer states, our rank state
        plant_payload(tag / name, marker)
    refresh_manifest(tag)  # sizes and sha256 fit: only reading them weights-only can refuse them
    flipped = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank00001_state.pt"]
    for name in flipped:  # damaged after the manifest was written
        flip_byte(tag / name)
    before = snapshot(run)
    proc = launch(run, shards, f"train.steps={STEPS + 5}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint" in proc.stderr and "is refused (5 problem(s))" in proc.stderr
    for name in planted:
        assert (
            f"{tag / name}: refused without running anything from it: it holds the pickled global 'exec'" in proc.stderr
        )
    for name in flipped:
        assert f"{tag / name}: sha256 differs from the manifest's" in proc.stderr
    assert "[rank0] train: stopped" in proc.stderr and "[rank1] train: stopped" in proc.stderr
    assert not marker.exists()  # no payload ran, in any rank
    assert snapshot(run) == before  # nothing written: no checkpoint, adapter, metrics or TensorBoard file


def test_retention_by_step_keeps_latest_and_the_tag_just_written(finished, shards, tmp_path):
    """Stale tags named ``step25``/``step30`` sort after ``step00000020`` by name; the old rule kept
    them and deleted the tag just written. Retention now orders this run's complete tags by step."""
    run = copy_run(finished[0], tmp_path / "run")
    ckpts = run / "checkpoints"
    (ckpts / "step00000020").rename(ckpts / "step30")
    shutil.copytree(ckpts / "step00000015", ckpts / "step25")
    for name, step in (("step25", 25), ("step30", 30)):
        body = read_manifest(ckpts / name)
        body["step"] = step
        (ckpts / name / MANIFEST_NAME).write_text(json.dumps(body))
    (ckpts / "latest").write_text("step00000015")
    shutil.rmtree(run / "adapter")
    proc = launch(run, shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step00000015 at step 15" in proc.stderr
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000015", "step00000020", "step25", "step30"]
    assert (ckpts / "latest").read_text() == "step00000020"
    verify_tag(ckpts / "step00000020")
    a, b = (
        load_file(str(finished[0] / "adapter" / "adapter.safetensors")),
        load_file(str(run / "adapter" / "adapter.safetensors")),
    )
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_no_checkpoint_inside_a_nonfinite_streak(shards, tmp_path):
    run = tmp_path / "nan"
    proc = launch(
        run,
        shards,
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.max_bad_steps=3",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
    )
    assert proc.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss (train.max_bad_steps=3)" in proc.stderr
    assert "step 2: no checkpoint, the last 1 step(s) had a non-finite loss" in proc.stderr
    # step 1 had a finite loss; steps 2-4 did not: the last good checkpoint is kept and `latest` names it
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000001"]
    assert (run / "checkpoints" / "latest").read_text() == "step00000001"
    assert read_manifest(run / "checkpoints" / "step00000001")["step"] == 1


def _ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launch's rank processes by local rank (not their data-loader workers, forked with the
    same command line)."""
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmd, parent = child.cmdline(), child.parent().cmdline()
        except (psutil.Error, AttributeError):
            continue
        if "deepspeed.launcher.launch" in parent:
            for a in cmd:
                if a.startswith("--local_rank="):
                    out[int(a.split("=")[1])] = child
    return out


def _mid_save(ckpts: Path) -> str | None:
    """A tag being written: a step folder without manifest, newer than the one `latest` names."""
    try:
        latest = (ckpts / "latest").read_text().strip()
        names = [e.name for e in ckpts.iterdir() if e.name.startswith("step")]
    except OSError:
        return None
    for name in names:
        if name > latest and not (ckpts / name / MANIFEST_NAME).exists():
            return name
    return None


def test_second_launch_is_refused_and_a_kill_mid_save_resumes_exactly(finished, shards, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    cmd = deepspeed_command(TRAIN, args(run, shards, "train.checkpoint_every=1"))
    launcher = subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    caught, deadline = None, time.time() + 400
    try:
        while caught is None and time.time() < deadline and launcher.poll() is None:
            tag = _mid_save(ckpts)
            if tag is None:
                time.sleep(0.001)
                continue
            ranks = _ranks(launcher)
            for p in ranks.values():
                p.send_signal(signal.SIGSTOP)  # frozen in the middle of writing `tag`
            if (
                len(ranks) == 2
                and not (ckpts / tag / MANIFEST_NAME).exists()
                and (ckpts / "latest").read_text().strip() < tag
            ):
                caught = (tag, ranks)
            else:
                for p in ranks.values():
                    p.send_signal(signal.SIGCONT)
        assert caught is not None, "no save was caught in the middle"
        tag, ranks = caught
        # the run is alive (stopped, holding its lock): a second launch in its directory is refused
        second = deepspeed_launch(TRAIN, args(run, shards), timeout=300, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"run directory {run} is in use by another run (pid {ranks[0].pid} on host" in second.stderr
        assert "[rank1] train: stopped: run directory" in second.stderr
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the whole launch dies at once, as on a node failure
        launcher.wait(timeout=60)
    port = cmd[cmd.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # even a kill leaks no memory
    previous = (ckpts / "latest").read_text().strip()
    assert previous < tag and not (ckpts / tag / MANIFEST_NAME).exists() and (ckpts / tag).is_dir()
    assert not json.loads((run / "run.lock").read_text()).get("released")
    proc = launch(run, shards, "train.checkpoint_every=1")  # the same command: takes the lock over, resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the lock of an earlier run in {run} that ended without releasing it" in proc.stderr
    assert f"resumed from {previous}" in proc.stderr
    assert f"removing {ckpts / tag}: an earlier save of step {int(tag[4:])} that did not finish" in proc.stderr
    a, b = (
        load_file(str(finished[0] / "adapter" / "adapter.safetensors")),
        load_file(str(run / "adapter" / "adapter.safetensors")),
    )
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert final_eval(proc.stdout) == finished[1]
