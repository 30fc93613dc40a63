"""Sweeps: grid expansion and validation, and the 2 x 2 x 2 tiny grid end to end with real 2-rank
deepspeed launches, interrupted with SIGTERM mid-run and resumed without redoing finished runs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from launch_util import REPO, launch_env

from mosa_scale.config import ConfigError
from mosa_scale.config.errors import Problems
from mosa_scale.config.loader import parse_overrides
from mosa_scale.sweep import SweepRunner, check_runs, load_sweep, parse_sweep, read_csv
from mosa_scale.sweep.spec import format_value

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

SWEEP = REPO / "launchers" / "configs" / "sweeps" / "tiny_grid.yaml"
TOOL = REPO / "tools" / "sweep.py"
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_env() -> dict[str, str]:
    return launch_env()  # includes a private DeepSpeed JIT cache for this checkout


def test_grid_expands_in_axis_order_with_unique_names(tmp_path):
    spec = load_sweep(SWEEP, out_dir=tmp_path)
    runs = spec.runs()
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].name == "size-w32_method-parallel_N-1_zero-z2_seed-3407"
    assert runs[-1].name == "size-w64_method-lora_N-4_zero-z2_seed-3407"
    assert [r.labels["N"] for r in runs[:2]] == ["1", "4"]  # the last axis varies fastest
    last = runs[-1].overrides
    assert last["adapter.method"] == "lora" and last["adapter.num_experts"] == 4
    assert last["model.hf_config.hidden_size"] == 64 and last["train.steps"] == 30
    assert runs[-1].run_dir == tmp_path / "runs" / runs[-1].name
    assert runs[-1].override_args()[-1] == f"train.run_dir={runs[-1].run_dir}"
    check_runs(spec)  # every grid point loads as a run config, exactly as train.py will load it


def test_every_problem_is_reported_before_launching(tmp_path):
    bad = yaml.safe_load(SWEEP.read_text())
    bad["set"]["train"]["stesp"] = 3
    bad["axes"]["twice"] = {"key": "adapter.method", "values": ["houlsby"]}
    bad["axes"]["N"]["values"] = [1, 200]
    bad["rank"] = 2
    with pytest.raises(ConfigError) as e:
        check_runs(parse_sweep(bad, out_dir=tmp_path))
    assert "twice" in str(e.value) and "rank: unknown key; did you mean 'ranks'" in str(e.value)
    bad["axes"].pop("twice")
    bad.pop("rank")
    with pytest.raises(ConfigError) as e:
        check_runs(parse_sweep(bad, out_dir=tmp_path))
    text = str(e.value)
    assert "train.stesp: unknown key; did you mean 'steps'" in text
    assert "adapter.num_experts: got 200" in text and "N-200" in text  # named by run
    assert text.count("train.stesp") == 8  # one per grid point, all at once


@pytest.mark.parametrize(
    "value", ["lora", "yes", "1.0", 3, 1e-5, 0.02, True, None, [1, 2], {0: 2, 3: 1}, {"hidden_size": 32}]
)
def test_override_values_round_trip(value):
    p = Problems()
    parsed = parse_overrides([f"k={format_value(value)}"], p)["k"]
    assert not p.items
    assert parsed == value or (isinstance(value, float) and float(parsed) == value)


def test_print_mode_lists_unfinished_runs(tmp_path):
    runner = SweepRunner(load_sweep(SWEEP, out_dir=tmp_path))
    out = io.StringIO()
    assert runner.print_commands(out) == 8
    lines = out.getvalue().splitlines()
    assert all(
        line.startswith("sbatch launchers/slurm/train.sbatch launchers/configs/digits_default.yaml ") for line in lines
    )
    assert "adapter.method=lora" in lines[2] and f"train.run_dir={tmp_path}/runs/" in lines[2]
    finished = runner.runs[0].run_dir  # what the trainer leaves behind when a run completes
    (finished / "adapter").mkdir(parents=True)
    (finished / "adapter" / "adapter_config.json").write_text("{}")
    (finished / "metrics.jsonl").write_text("")
    out = io.StringIO()
    assert runner.print_commands(out) == 7 and runner.runs[0].name not in out.getvalue()


def _state(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / "state.json").read_text())["runs"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]


def _launch_alive(run_dir: Path) -> bool:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"train.run_dir={run_dir}" in (p.info["cmdline"] or []):
                return True
        except psutil.Error:
            continue
    return False


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny grid, SIGTERM'd once two runs are done and the third has a checkpoint, then rerun."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    cmd = [sys.executable, str(TOOL), str(SWEEP), "--out-dir", str(out)]
    first = subprocess.Popen(
        cmd, cwd=REPO, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline, signalled = time.time() + 400, False
    while time.time() < deadline and first.poll() is None:
        state = _state(out)
        running = [n for n, s in state.items() if s == "running"]
        if sum(s == "done" for s in state.values()) >= 2 and running:
            if (out / "runs" / running[0] / "checkpoints" / "latest").is_file():
                first.send_signal(signal.SIGTERM)
                signalled = True
                break
        time.sleep(0.05)
    log1, _ = first.communicate(timeout=120)
    assert signalled, f"the sweep ended before it could be interrupted:\n{log1[-3000:]}"
    state1 = _state(out)
    done1 = {n for n, s in state1.items() if s == "done"}
    mtimes = {n: (out / "runs" / n / "adapter" / "adapter.safetensors").stat().st_mtime_ns for n in done1}
    interrupted = [n for n, s in state1.items() if s == "interrupted"]
    alive = _launch_alive(out / "runs" / interrupted[0]) if interrupted else None
    t0 = time.time()
    second = subprocess.run(cmd, cwd=REPO, env=sweep_env(), capture_output=True, text=True, timeout=600)
    return dict(
        out=out,
        rc1=first.returncode,
        state1=state1,
        done1=done1,
        mtimes=mtimes,
        interrupted=interrupted,
        alive=alive,
        second=second,
        second_s=time.time() - t0,
    )


def test_interrupt_stops_the_running_launch(swept):
    assert swept["rc1"] == 128 + signal.SIGTERM
    assert len(swept["done1"]) >= 2 and len(swept["interrupted"]) == 1
    assert swept["alive"] is False  # no rank of the interrupted launch survived the sweep
    assert sum(s == "pending" for s in swept["state1"].values()) == 8 - len(swept["done1"]) - 1


def test_rerun_resumes_without_redoing_finished_runs(swept):
    out, second = swept["out"], swept["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert set(_state(out).values()) == {"done"}
    starts: dict[str, list[dict]] = {}
    for e in _events(out):
        if e["event"] == "start":
            starts.setdefault(e["run"], []).append(e)
    for name in swept["done1"]:  # launched once, and their outputs were not rewritten
        assert len(starts[name]) == 1, name
        assert (out / "runs" / name / "adapter" / "adapter.safetensors").stat().st_mtime_ns == swept["mtimes"][name]
    skips = {e["run"] for e in _events(out) if e["event"] == "skip"}
    assert skips == swept["done1"]
    name = swept["interrupted"][0]
    assert len(starts[name]) == 2 and starts[name][0]["resume_from"] is None
    assert starts[name][1]["resume_from"] is not None  # the trainer's own checkpoint
    assert f"resumed from {starts[name][1]['resume_from']}" in (out / "logs" / f"{name}.log").read_text()
    assert all(len(v) == 1 for k, v in starts.items() if k != name)
    evals = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 30


def test_csv_has_every_run(swept):
    rows = read_csv(swept["out"] / "results.csv")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert 0.0 <= float(r["top1"]) <= 1.0 and int(r["step"]) == 30
        assert float(r["samples_per_s_per_gpu"]) == pytest.approx(float(r["samples_per_s"]) / 2)
        assert float(r["peak_memory_mb"]) > 0 and float(r["step_time_s"]) > 0
        assert float(r["flops_per_sample"]) > 0 and float(r["tflops_per_s_per_gpu"]) > 0
        assert r["zero_stage"] == "2" and r["num_experts"] == r["N"]
    by = {(r["size"], r["method"], r["N"]): r for r in rows}
    for size in ("w32", "w64"):
        for method in ("parallel", "lora"):
            dense, mosa = by[(size, method, "1")], by[(size, method, "4")]
            assert mosa["adapter_params"] == dense["adapter_params"]  # one merged dense adapter
            assert int(float(mosa["trainable_params"])) >= int(float(dense["trainable_params"]))
    assert int(by[("w64", "parallel", "1")]["backbone_params"]) > int(by[("w32", "parallel", "1")]["backbone_params"])
    # parallel N=4 keeps one Up bias per expert: 3 extra vectors of width 32 in each of 2 blocks
    w32 = by[("w32", "parallel", "4")], by[("w32", "parallel", "1")]
    assert float(w32[0]["trainable_params"]) - float(w32[1]["trainable_params"]) == 3 * 32 * 2


def test_plots_are_png_files(swept):
    for name in ("throughput.png", "memory.png", "accuracy_vs_params.png"):
        data = (swept["out"] / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name


def test_collect_only_rewrites_the_csv(swept):
    csv_path = swept["out"] / "results.csv"
    before = csv_path.read_text()
    csv_path.unlink()
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(SWEEP), "--out-dir", str(swept["out"]), "--collect"],
        cwd=REPO,
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert csv_path.read_text() == before
    assert os.path.getsize(swept["out"] / "launches.jsonl") > 0
