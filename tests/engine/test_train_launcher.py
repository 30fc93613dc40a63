"""``deepspeed launchers/train.py`` end to end: outputs, TensorBoard, checkpoints, kill and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from launch_util import REPO, deepspeed_launch, launch_env
from safetensors.torch import load_file

from mosa_scale.ckpt.safe_load import load_weights_only
from mosa_scale.engine.launch import deepspeed_command, free_port

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

TRAIN = REPO / "launchers" / "train.py"
CONFIG = REPO / "tests" / "engine" / "tiny_run.yaml"


def train_args(run_dir, *extra):
    return ["--config", str(CONFIG), f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    proc = deepspeed_launch(TRAIN, train_args(run), ranks=2)
    return run, proc


def test_run_directory_layout(full_run):
    run, proc = full_run
    for rel in (
        "config.yaml",
        "tb",
        "checkpoints/latest",
        "metrics.jsonl",
        "adapter/adapter.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (run / rel).exists(), rel
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [15, 30] and all(0.0 <= e["top1"] <= 1.0 for e in evals)
    assert evals[-1]["eval_samples"] == 4 * 8 * 2  # eval_batches x micro_batch x ranks
    final = json.loads([l for l in proc.stdout.splitlines() if l.startswith('{"final_eval"')][-1])["final_eval"]
    assert final["top1"] == pytest.approx(evals[-1]["top1"])
    manifest = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert manifest["backbone"]["family"] == "hf-vit" and manifest["mosa_scale_version"]
    merged = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert any(k.endswith("mosa_adapter.up.weight") for k in merged)
    assert not any(k.endswith((".slices", ".assign")) for k in merged)  # a plain dense adapter
    assert set(manifest["tensors"]) == set(merged)


def test_tensorboard_scalars(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = full_run
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "loss/ce",
        "loss/consistency",
        "lr",
        "throughput/samples_per_s",
        "time/step_s",
        "time/data_s",
        "memory/peak_mb",
        "eval/top1",
        "eval/merged_vs_stochastic_l1",
        "data/skipped_corrupt",
    ):
        assert tag in tags, tag
    assert any(t.startswith("experts/") for t in tags)
    # FLOPs per GPU per second follow from the step's FLOPs and its measured time
    step_time = {e.step: e.value for e in acc.Scalars("time/step_s")}
    tflops = {e.step: e.value for e in acc.Scalars("perf/tflops_per_s_per_gpu")}
    per_step = {s: tflops[s] * 1e12 * step_time[s] * 2 for s in tflops}  # 2 ranks
    values = list(per_step.values())
    assert values and min(values) > 0 and max(values) / min(values) - 1 < 1e-4
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert lr[5] == pytest.approx(1e-2 * (0.5 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 27)).item())), rel=1e-5)
    assert [e.step for e in acc.Scalars("eval/top1")] == [15, 30]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert acc.Scalars("eval/top1")[-1].value == pytest.approx(evals[-1]["top1"], rel=1e-6)
    # a slice counts the (rank, micro-batch) units that used it in either pass: 2 ranks x 2 micro-batches
    # give 4 units, each using 1 or 2 distinct experts (2 passes) per split layer
    per_layer = {}
    for t in tags:
        if t.startswith("experts/"):
            layer = t.rsplit("/", 1)[0]
            per_layer[layer] = per_layer.get(layer, 0) + acc.Scalars(t)[0].value
    assert len(per_layer) == 4 and all(4 <= v <= 8 for v in per_layer.values())


def test_checkpoints_hold_no_frozen_backbone(full_run):
    run, _ = full_run
    tag = (run / "checkpoints" / "latest").read_text().strip()
    files = list((run / "checkpoints" / tag).glob("*model_states.pt"))
    assert files
    state = load_weights_only(files[0])
    keys = list(state["module"].keys()) if state.get("module") else []
    assert keys and all("mosa_" in k for k in keys), [k for k in keys if "mosa_" not in k][:5]
    # all checkpoints together stay far below one copy of the frozen tower (about 27k fp32 values)
    size = sum(f.stat().st_size for f in (run / "checkpoints" / tag).rglob("*") if f.is_file())
    assert size < 1_000_000


def _rank_pid(launcher: subprocess.Popen, local_rank: int) -> int | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "train.py" in " ".join(child.cmdline()) and f"--local_rank={local_rank}" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


def test_kill_a_rank_and_resume_matches_uninterrupted(full_run, tmp_path):
    run_a, _ = full_run
    run_b = tmp_path / "run"
    cmd = deepspeed_command(TRAIN, train_args(run_b), ranks=2)
    launcher = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline, killed = run_b / "checkpoints" / "latest", time.time() + 300, False
    while time.time() < deadline and launcher.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step00000005":
            pid = _rank_pid(launcher, 1)
            if pid is not None:
                psutil.Process(pid).send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    assert killed, "the run ended before it could be killed"
    assert launcher.wait(timeout=120) != 0
    stopped_at = latest.read_text().strip()
    assert stopped_at < "step00000030"
    assert not (run_b / "adapter" / "adapter.safetensors").exists()
    deepspeed_launch(TRAIN, train_args(run_b), ranks=2)  # same command: resumes from `latest`
    a = load_file(str(run_a / "adapter" / "adapter.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert gap <= 1e-6, (stopped_at, gap)


def test_bad_config_fails_fast_listing_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stesp: 5, micro_batch: 8, global_batch: 30, precision: fp8}\nadapter: {share: both}\n")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "--config", str(bad), "optim.lr=fast"],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.time() - t0
    assert proc.returncode == 2 and elapsed < 10
    for needle in (
        "train.stesp: unknown key; did you mean 'steps'",
        "train.precision",
        "adapter.share",
        "optim.lr",
        "train.global_batch: 30",
    ):
        assert needle in proc.stderr, (needle, proc.stderr)
    assert "5 configuration problem(s)" in proc.stderr


def test_bf16_zero3_keeps_mosa_buffers_and_adapter_in_fp32(tmp_path):
    run = tmp_path / "bf16"
    deepspeed_launch(
        TRAIN,
        train_args(
            run,
            "train.precision=bf16",
            "train.zero_config=ds_configs/zero3.json",
            "train.steps=6",
            "train.eval_every=6",
            "train.checkpoint_every=6",
        ),
        ranks=2,
    )
    merged = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert merged and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in merged.values())
    tag = (run / "checkpoints" / "latest").read_text().strip()
    module = load_weights_only(next((run / "checkpoints" / tag).glob("*model_states.pt")))["module"]
    buffers = {k: v for k, v in module.items() if k.endswith((".base", ".decay"))}
    assert buffers and all(v.dtype == torch.float32 for v in buffers.values())
    # the off-mask decay factors moved (weight decay 0.01 ran in fp32) but stay below 1
    decays = torch.cat([v for k, v in buffers.items() if k.endswith(".decay")])
    assert (decays < 1).any() and (decays > 0.99).all()


def test_nonfinite_losses_stop_the_run_after_max_bad_steps(tmp_path):
    run = tmp_path / "nan"
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            *train_args(run, "optim.lr=1e30", "optim.warmup_steps=0", "train.max_bad_steps=3", "train.micro_batch=32"),
        ],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss (train.max_bad_steps=3)" in proc.stderr
    assert not (run / "adapter" / "adapter.safetensors").exists()


def test_torchrun_launch_trains_the_same_adapter(full_run, tmp_path):
    run_a, _ = full_run
    run_b = tmp_path / "torchrun"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(TRAIN), *train_args(run_b)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(run_a / "adapter" / "adapter.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
