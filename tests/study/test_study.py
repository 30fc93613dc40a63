"""The transfer study: its grid and choices, its row file, its splits, and a 2-run miniature end
to end through ``bench/transfer.py`` on real data, killed after its first row and resumed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from launch_util import REPO, launch_env

from mosa_scale.config import ConfigError
from mosa_scale.data import fashion_mnist_available, load_builtin
from mosa_scale.study import (
    DENSE,
    RowStore,
    RunSpec,
    Study,
    StudyError,
    StudyGrid,
    StudySettings,
    Task,
    Variant,
    summarize,
    write_report,
)

TOOL = REPO / "bench" / "transfer.py"
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- grid
def test_default_grid_pruned_as_documented():
    g = StudyGrid()
    a = g.phase_a()
    assert len(a) == 7 * 3 * 2 and {r.eval for r in a} == {"val"} and {r.steps for r in a} == {1250}
    assert {r.variant for r in a if r.method.startswith("mosa")} == {Variant(4, "down", False)}
    b = g.phase_b({m: 5e-3 for m in g.methods})
    # MoSA: N {2,4} x share {down,none} x consistency {off,on}; MoSA-LoRA: share down only; both semantics
    assert len(b) == 2 * (8 + 4) * 2
    assert len({r.id for r in b} - {r.id for r in a}) == 40  # the base variants at 5e-3 are phase A's runs
    runs, final = g.plan({})
    assert not final
    c = [r for r in runs if r.phase == "C"]
    # adapter, LoRA, probe, MoSA skip (best, + other N), MoSA coast, MoSA-LoRA skip and coast: 8 x 3 x 3 x 2
    assert len(c) == 8 * 3 * 3 * 2 and {r.eval for r in c} == {"test"}
    assert [r.steps for r in c[: 8 * 2 * 3]] == [300] * 48  # shortest schedule first
    assert len(runs) == 42 + 40 + 144 and len({r.id for r in runs}) == len(runs)
    assert StudyGrid.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_long_schedules_run_only_for_the_methods_named():
    g = StudyGrid(long_methods=("adapter", "mosa-skip"))
    c = [r for r in g.plan({})[0] if r.phase == "C"]
    assert {r.method for r in c if r.steps == 3000} == {"adapter", "mosa-skip"}
    assert {r.method for r in c if r.steps == 1250} == set(g.methods)  # up to select_steps: all
    # adapter, MoSA skip's provisional best and its other N: 3 configurations x 3 seeds x 2 tasks
    assert len([r for r in c if r.steps == 3000]) == 3 * 3 * 2
    assert len(c) == 8 * 3 * 2 * 2 + 18
    assert StudyGrid.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    with pytest.raises(ConfigError, match="long_methods"):
        StudyGrid(methods=("adapter",), long_methods=("lora",))


def test_bad_grid_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        StudyGrid(methods=("mosa-skip", "mosa-drift"), lrs=(0.0,), experts=(1,), tasks=())
    text = str(e.value)
    assert "mosa-drift" in text and "lrs: got 0.0" in text and "experts: got 1" in text and "tasks: must not" in text


def _val_rows(g: StudyGrid, scores: dict[tuple[str, Variant, float, str], float]) -> dict:
    return {
        (r := RunSpec(t, m, v, lr, g.select_steps, g.select_seed, "val")).id: {
            "id": r.id,
            "top1": acc,
            "seconds": 1.0,
            "time": 50.0,
        }
        for (m, v, lr, t), acc in scores.items()
    }


def test_choices_are_joint_over_tasks_and_ties_go_to_grid_order():
    g = StudyGrid(
        methods=("adapter", "mosa-skip", "mosa-coast"),
        lrs=(1e-3, 5e-3),
        extend_lrs=0,
        experts=(2, 4),
        shares=("down",),
        consistency=(False, True),
    )
    f, d, base = "fmnist_5-9", "digits", Variant(4, "down", False)
    rows = _val_rows(
        g,
        {
            # adapter: 1e-3 wins digits by a little, 5e-3 wins fmnist by more: the mean picks 5e-3
            ("adapter", DENSE, 1e-3, f): 0.80,
            ("adapter", DENSE, 1e-3, d): 0.90,
            ("adapter", DENSE, 5e-3, f): 0.86,
            ("adapter", DENSE, 5e-3, d): 0.88,
            # mosa-skip: a tie: the smaller rate
            ("mosa-skip", base, 1e-3, f): 0.8,
            ("mosa-skip", base, 1e-3, d): 0.8,
            ("mosa-skip", base, 5e-3, f): 0.7,
            ("mosa-skip", base, 5e-3, d): 0.9,
            ("mosa-coast", base, 1e-3, f): 0.5,
            ("mosa-coast", base, 1e-3, d): 0.5,
            ("mosa-coast", base, 5e-3, f): 0.6,
            ("mosa-coast", base, 5e-3, d): 0.6,
        },
    )
    lrs = g.choose_lrs(rows)
    assert lrs == {"adapter": 5e-3, "mosa-skip": 1e-3, "mosa-coast": 5e-3}
    assert g.choose_variants(rows, lrs) == {}  # phase B not run yet
    screen = {
        "mosa-skip": {
            Variant(2, "down", False): 0.81,
            Variant(2, "down", True): 0.83,
            Variant(4, "down", True): 0.82,
        },  # base: 0.80 (phase A)
        "mosa-coast": {Variant(2, "down", False): 0.55, Variant(2, "down", True): 0.55, Variant(4, "down", True): 0.61},
    }
    for m, vs in screen.items():
        rows.update(_val_rows(g, {(m, v, lrs[m], t): acc for v, acc in vs.items() for t in (f, d)}))
    chosen = g.choose_variants(rows, lrs)
    assert chosen["mosa-skip"] == {
        None: Variant(2, "down", True),
        2: Variant(2, "down", True),
        4: Variant(4, "down", True),
    }
    assert chosen["mosa-coast"] == {
        None: Variant(4, "down", True),
        2: Variant(2, "down", False),  # tie: off first
        4: Variant(4, "down", True),
    }
    gain = g.gain_method(rows, lrs, chosen)
    assert gain == "mosa-skip"  # 0.83 against 0.61
    configs = [(c.method, c.variant.tag, c.lr, c.role) for c in g.final_configs(lrs, chosen, gain)]
    assert configs == [
        ("adapter", "dense", 5e-3, "best"),
        ("mosa-skip", "n2-down-c1", 1e-3, "best"),
        ("mosa-skip", "n4-down-c1", 1e-3, "best at N 4"),
        ("mosa-coast", "n4-down-c1", 5e-3, "best"),
    ]
    runs, final = g.plan(rows)
    assert final and len([r for r in runs if r.phase == "C"]) == 4 * 3 * 3 * 2


def test_a_rate_at_the_grid_edge_is_bracketed_by_one_more_run():
    g = StudyGrid(tasks=("digits",), methods=("adapter", "lora"), lrs=(1e-3, 5e-3, 2e-2), extend_lrs=2)
    d = "digits"
    rows = _val_rows(
        g,
        {
            ("adapter", DENSE, 1e-3, d): 0.80,
            ("adapter", DENSE, 5e-3, d): 0.85,
            ("adapter", DENSE, 2e-2, d): 0.90,  # best at the top: try 8e-2
            ("lora", DENSE, 1e-3, d): 0.90,
            ("lora", DENSE, 5e-3, d): 0.85,
            ("lora", DENSE, 2e-2, d): 0.80,
        },
    )  # best at the bottom: try 2e-4
    assert g.method_lrs(rows, "adapter") == [1e-3, 5e-3, 2e-2, 0.08]
    assert g.method_lrs(rows, "lora") == [2e-4, 1e-3, 5e-3, 2e-2]
    missing = [r.id for r in g.phase_a(rows) if r.id not in rows]
    assert missing == ["digits:adapter:dense:lr0.08:1250:s0:val", "digits:lora:dense:lr0.0002:1250:s0:val"]
    assert g.choose_lrs(rows) == {}  # not before the bracket is in
    rows.update(_val_rows(g, {("adapter", DENSE, 0.08, d): 0.88, ("lora", DENSE, 2e-4, d): 0.95}))
    assert g.method_lrs(rows, "adapter") == [1e-3, 5e-3, 2e-2, 0.08]  # bracketed: done
    assert g.method_lrs(rows, "lora") == [4e-5, 2e-4, 1e-3, 5e-3, 2e-2]  # still at the edge: once more
    rows.update(_val_rows(g, {("lora", DENSE, 4e-5, d): 0.96}))
    assert g.method_lrs(rows, "lora")[0] == 4e-5  # at the limit of 2 extensions
    assert g.choose_lrs(rows) == {"adapter": 2e-2, "lora": 4e-5}
    assert StudyGrid(lrs=(5e-3,)).method_lrs({}, "adapter") == [5e-3]
    with pytest.raises(ConfigError, match="increasing order"):
        StudyGrid(lrs=(5e-3, 1e-3))


def test_report_pairs_gains_by_seed(tmp_path):
    g = StudyGrid(
        tasks=("digits",),
        methods=("adapter", "mosa-skip"),
        lrs=(5e-3,),
        final_steps=(10, 20),
        final_seeds=(0, 1),
        experts=(4,),
        shares=("down",),
        consistency=(False,),
    )
    base = Variant(4, "down", False)
    rows = _val_rows(g, {("adapter", DENSE, 5e-3, "digits"): 0.5, ("mosa-skip", base, 5e-3, "digits"): 0.6})
    test = {("adapter", 10): [0.70, 0.80], ("mosa-skip", 10): [0.72, 0.86], ("adapter", 20): [0.9, 0.9]}
    for (m, steps), accs in test.items():
        for seed, acc in enumerate(accs):
            r = RunSpec("digits", m, DENSE if m == "adapter" else base, 5e-3, steps, seed, "test")
            rows[r.id] = {"id": r.id, "top1": acc, "seconds": 1.0, "time": 100.0 + seed}
    s = summarize(g, rows)
    gain = {x["steps"]: x for x in s["gains"]}
    assert gain[10]["n"] == 2 and gain[10]["mean"] == pytest.approx(0.04)  # (0.02 + 0.06) / 2
    assert gain[10]["std"] == pytest.approx(np.std([0.02, 0.06], ddof=1))
    assert gain[20]["n"] == 0  # MoSA's 20-step runs are missing
    final = {(x["method"], x["steps"]): x for x in s["final"]}
    assert final[("mosa-skip", 10)]["mean"] == pytest.approx(0.79) and final[("adapter", 20)]["std"] == 0.0
    assert s["runs_done"] == 2 + 6 and s["runs_planned"] == 2 + 8 and s["plan_final"]
    files = write_report(
        tmp_path,
        g,
        {"bottleneck": 16, "weight_decay": 0.01, "batch": 64, "labelled": 1000, "val_fraction": 0.2},
        {},
        rows,
    )
    md = (tmp_path / "report.md").read_text()
    assert "| mosa-skip | n4-down-c0 | 0.005 | best | 79.00 ± 9.90 | — |" in md  # no runs yet: a dash
    assert "| adapter | dense | 0.005 | best | 75.00 ± 7.07 | 90.00 ± 0.00 |" in md
    assert "| mosa-skip | n4-down-c0 | adapter | digits | +4.00 ± 2.83 | — |" in md
    assert "Status: in progress, 8 of 10 runs done" in md
    for name in ("top1_vs_steps.png", "gain_vs_experts.png"):
        assert tmp_path / name in files and (tmp_path / name).read_bytes()[:8] == PNG
    # the same rows with MoSA pruned from schedules above select_steps (1250): the study is complete
    g = dataclasses.replace(g, final_steps=(10, 2000), long_methods=("adapter",))
    for seed, acc in enumerate([0.9, 0.9]):
        r = RunSpec("digits", "adapter", DENSE, 5e-3, 2000, seed, "test")
        rows[r.id] = {"id": r.id, "top1": acc, "seconds": 1.0, "time": 100.0 + seed}
    write_report(
        tmp_path,
        g,
        {"bottleneck": 16, "weight_decay": 0.01, "batch": 64, "labelled": 1000, "val_fraction": 0.2},
        {},
        rows,
        plots=False,
    )
    md = (tmp_path / "report.md").read_text()
    assert "Status: complete, 8 of 8 runs done" in md and "Pruned: 2000 steps only for adapter" in md
    assert "| mosa-skip | n4-down-c0 | 0.005 | best | 79.00 ± 9.90 | — |" in md


# ---------------------------------------------------------------------------------------------- rows
def test_row_store_drops_a_cut_row_and_appends_after_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    store = RowStore(path)
    store.append({"id": "a", "top1": 0.5})
    store.append({"id": "b", "top1": 0.25})
    with path.open("a") as f:
        f.write('{"id": "c", "to')  # killed while writing
    store = RowStore(path)
    assert [r["id"] for r in store.values()] == ["a", "b"] and "c" not in store
    store.append({"id": "c", "top1": 1.0})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2"):
        RowStore(path)


# ---------------------------------------------------------------------------------------------- splits
class Untouchable:
    """A test set that fails the test when anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __getitem__(self, key):
        raise AssertionError("the test split was read")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the test split was read")


def test_validation_is_carved_from_the_labels_and_never_reads_the_test_split():
    digits = load_builtin("digits")
    task = Task("digits", digits.images, digits.labels, Untouchable(), Untouchable())
    train, val = task.selection_split(seed=3)  # would raise if it touched the test arrays
    assert (len(train), len(val)) == (800, 200)
    assert np.bincount(val.y.numpy()).tolist() == [20] * 10 and np.bincount(train.y.numpy()).tolist() == [80] * 10
    pooled = Task("digits", digits.images, digits.labels, None, None)  # test: the samples not labelled
    full, test = pooled.final_split(seed=3)
    key = lambda s: {tuple(row) for row in s.x.flatten(1).numpy().round(4)}  # noqa: E731
    assert len(full) == 1000 and len(test) == 1797 - 1000
    assert key(train) | key(val) == key(full)  # the validation split is part of the same labels
    assert not key(val) & key(test) and not key(full) & key(test)
    assert pooled.selection_split(seed=4)[1].x.shape == (200, 1, 28, 28)
    assert not torch_equal(pooled.selection_split(seed=4)[1].x, val.x)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    Study(tmp_path, StudyGrid(), StudySettings())
    Study(tmp_path, StudyGrid(lrs=(1e-3,)), StudySettings())  # the grid may change
    with pytest.raises(StudyError, match=r"bottleneck: 16 there, 8 now.*new --out-dir"):
        Study(tmp_path, StudyGrid(), StudySettings(bottleneck=8))


# ---------------------------------------------------------------------------------------------- end to end
MINI = [
    "--tasks",
    "digits",
    "--methods",
    "mosa-coast",
    "--lrs",
    "0.005",
    "--select-steps",
    "60",
    "--final-steps",
    "80",
    "--final-seeds",
    "0",
    "--experts",
    "4",
    "--shares",
    "down",
    "--consistency",
    "off",
    "--pretrain-epochs",
    "1",
    "--pretrain-samples",
    "512",
]


@pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Debian package dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_miniature_study_killed_after_its_first_row_resumes_without_redoing_it(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(TOOL), "--out-dir", str(out), *MINI]
    env = launch_env()  # one thread: robust next to other work
    rows_file = out / "rows.jsonl"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if rows_file.is_file() and rows_file.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
        proc.wait()
    first_log = (tmp_path / "first.log").read_text()
    first = rows_file.read_text()
    assert first.count("\n") == 1, first_log[-3000:]  # killed during the second run
    row_a = json.loads(first)
    assert row_a["id"] == "digits:mosa-coast:n4-down-c0:lr0.005:60:s0:val" and row_a["phase"] == "A"
    assert (row_a["train_samples"], row_a["eval_samples"], row_a["steps"]) == (800, 200, 60)
    assert 0.2 < row_a["top1"] <= 1.0  # 10 classes: well above chance after 60 steps
    tower_info = out / "tower" / "pretrain.json"
    tower_mtime = tower_info.stat().st_mtime_ns

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the pretrained tower" in proc.stderr and tower_info.stat().st_mtime_ns == tower_mtime
    assert "phase A: 1 runs, 1 already done" in proc.stderr and "phase B: 1 runs, 1 already done" in proc.stderr
    assert "[2/2] C digits mosa-coast n4-down-c0 lr 0.005, 80 steps, seed 0: test top-1" in proc.stderr
    assert "0 left, ETA 0m00s" in proc.stderr
    lines = rows_file.read_text().splitlines()
    assert len(lines) == 2 and lines[0] + "\n" == first  # the finished run was not rerun
    row_c = json.loads(lines[1])
    assert row_c["id"] == "digits:mosa-coast:n4-down-c0:lr0.005:80:s0:test" and row_c["phase"] == "C"
    assert (row_c["train_samples"], row_c["eval_samples"]) == (1000, 797)  # all labels; the rest of digits
    assert 0.2 < row_c["top1"] <= 1.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen_lr"] == {"mosa-coast": 0.005} and summary["runs_done"] == summary["runs_planned"] == 2
    assert summary["final"] == [
        {
            "method": "mosa-coast",
            "variant": "n4-down-c0",
            "lr": 0.005,
            "role": "best",
            "task": "digits",
            "steps": 80,
            "seeds": [0],
            "mean": row_c["top1"],
            "std": 0.0,
            "n": 1,
        }
    ]
    report = (out / "report.md").read_text()
    assert "Status: complete, 2 of 2 runs done" in report
    assert f"| mosa-coast | n4-down-c0 | 0.005 | best | {100 * row_c['top1']:.2f} |" in report
    val = f"{100 * row_a['top1']:.2f}"
    assert f"| mosa-coast | n4-down-c0 | 0.005 | {val} | {val} | **yes** |" in report
    assert (out / "top1_vs_steps.png").read_bytes()[:8] == PNG

    for name in ("report.md", "summary.json", "top1_vs_steps.png"):
        (out / name).unlink()
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--out-dir", str(out), "--report-only"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.md").read_text() == report and json.loads((out / "summary.json").read_text()) == summary
    assert (out / "top1_vs_steps.png").read_bytes()[:8] == PNG
    assert rows_file.read_text().splitlines() == lines
