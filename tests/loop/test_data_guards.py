"""Bad data in a real 2-rank run: out-of-range labels are skipped and named, too many losses and an
epoch without a valid sample stop every rank with one clear message (no rank left waiting), and
the errors that used to come after the process group started are reported by the config check."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from launch_util import REPO, deepspeed_launch, launch_env

from mosa_scale.config import ConfigError
from mosa_scale.config.run import load_run_config
from mosa_scale.data import make_shards

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

TRAIN = REPO / "launchers" / "train.py"
CONFIG = REPO / "tests" / "engine" / "tiny_run.yaml"
BAD_LABEL = b"12"


@pytest.fixture(scope="module")
def bad_labels(tmp_path_factory) -> tuple[Path, list[str]]:
    """Digits shards whose every train shard holds one sample labelled 12 (of 10 classes); the index
    still lists them as written. Returns the folder and the keys of the bad samples."""
    out = tmp_path_factory.mktemp("data") / "digits"
    index = make_shards("digits", str(out), samples_per_shard=100, splits="train=0.8,val=0.2", seed=0, progress=False)
    keys = []
    for name in index["splits"]["train"]["shards"]:
        path = out / name
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        first = members[0][0].name.split(".", 1)[0]
        with tarfile.open(path, "w") as tar:
            for m, data in members:
                key, field = m.name.split(".", 1)
                if key == first and field == "cls":
                    data = BAD_LABEL
                    keys.append(key)
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out, keys


def run_args(run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        f"train.run_dir={run}",
        "train.steps=30",
        "train.checkpoint_every=30",
        "train.eval_every=30",
        *extra,
    ]


def test_out_of_range_labels_are_skipped_named_and_the_skip_rate_stops_every_rank(bad_labels, tmp_path):
    data, keys = bad_labels
    assert len(keys) == 15  # one per train shard
    t0 = time.time()
    proc = deepspeed_launch(
        TRAIN,
        run_args(tmp_path / "run", f"data.train={data}", f"data.val={data}", "data.max_skip_rate=0.001"),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.time() - t0 < 300
    named = [line for line in proc.stderr.splitlines() if "label 12 is outside [0, num_classes=10)" in line]
    assert named, proc.stderr[-3000:]
    assert any(f"of shard {data}/train-0000" in line and any(f"sample {k} " in line for k in keys) for line in named)
    assert "step 5/30 loss" in proc.stderr  # bad samples were skipped and training went on
    for rank in (0, 1):
        assert f"[rank{rank}] train: stopped: " in proc.stderr
    assert "samples read so far were lost" in proc.stderr and "more than data.max_skip_rate=0.001" in proc.stderr
    assert "IndexError" not in proc.stderr and "Traceback" not in proc.stderr


def test_an_epoch_without_a_valid_sample_stops_every_rank(tmp_path):
    t0 = time.time()
    failing = "data.train=pipe:cat /nonexistent/train-{000000..000003}.tar"  # every shard command fails
    proc = deepspeed_launch(TRAIN, run_args(tmp_path / "run", failing, "data.num_classes=10"), timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.time() - t0 < 300
    for rank in (0, 1):
        assert f"[rank{rank}] train: stopped: epoch 0 gave no valid sample on any of the 2 rank(s)" in proc.stderr
    assert "4 shard(s)" in proc.stderr


# ---------------------------------------------------------------------------- config check
@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    zero = tmp_path / "zero_bad.json"
    zero.write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": 64}')
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text('{"hidden_size": 32,')
    return {"zero": zero, "hf": hf}


def test_late_errors_are_found_by_the_config_check(bad_files):
    cases = {
        f"train.zero_config={bad_files['zero']}": f"train.zero_config: file '{bad_files['zero']}' sets "
        "train_batch_size=64",
        "data.train=/nonexistent/shards": "data.train: '/nonexistent/shards' does not exist",
        f"model.pretrained={bad_files['hf']}": f"model.pretrained: file '{bad_files['hf'] / 'config.json'}' is "
        "not valid JSON (Expecting property name",
    }
    for override, needle in cases.items():
        with pytest.raises(ConfigError) as e:
            load_run_config(CONFIG, [override])
        assert needle in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="model.name: got 'ViT-Q-99'; not an OpenCLIP model"):
        load_run_config(
            CONFIG, ["model.family=openclip", "model.name=ViT-Q-99", "model.hf_config=null", "model.pooling=cls"]
        )


def test_late_errors_stop_the_launcher_before_any_process_group(bad_files):
    """One message for all problems, exit 2, seconds: no process group, no model."""
    for extra, needles in (
        (
            [
                f"train.zero_config={bad_files['zero']}",
                "data.train=/nonexistent/shards",
                "model.family=openclip",
                "model.name=ViT-Q-99",
                "model.hf_config=null",
                "model.pooling=cls",
            ],
            [
                "4 configuration problem(s)",
                "train_batch_size=64",
                "'/nonexistent/shards' does not exist",
                "data.num_classes: not set",
                "'ViT-Q-99'; not an OpenCLIP model",
            ],
        ),
        ([f"model.pretrained={bad_files['hf']}"], ["1 configuration problem(s)", "config.json' is not valid JSON"]),
    ):
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, str(TRAIN), "--config", str(CONFIG), *extra],
            cwd=REPO,
            env=launch_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and time.time() - t0 < 60, proc.stderr[-3000:]
        for needle in needles:
            assert needle in proc.stderr, (needle, proc.stderr)
        assert "Traceback" not in proc.stderr and "TorchBackend" not in proc.stderr


def test_a_recipes_cluster_paths_are_named_when_they_are_missing_here():
    recipe = REPO / "launchers" / "configs" / "recipes" / "vit_b16" / "cub.yaml"
    with pytest.raises(ConfigError) as e:
        load_run_config(recipe, [], world_size=8)
    problems = e.value.problems
    assert (
        "data.train: 6 of the 6 shard file(s) of '/data/cub/train-{000000..000005}.tar' do not exist, e.g. "
        "'/data/cub/train-000000.tar'" in problems
    )
    assert (
        "data.val: 1 of the 1 shard file(s) of '/data/cub/val-{000000..000000}.tar' do not exist, e.g. "
        "'/data/cub/val-000000.tar'" in problems
    )
    assert any(p.startswith("model.pretrained: '/models/vit-base-patch16-224-in21k' is not a folder") for p in problems)
    assert len(problems) == 3
