"""tools/merge_adapter.py on real 2-rank ZeRO-2 and ZeRO-3 checkpoints: equal to the training run's
own merged adapter, read weights-only, and refusing bad checkpoints without writing anything."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from launch_util import REPO, launch_env
from safetensors.torch import load_file

from mosa_scale.ckpt import read_adapter
from mosa_scale.ckpt.consolidate import consolidate
from mosa_scale.ckpt.safe_load import CheckpointError, load_weights_only
from mosa_scale.ckpt.verify import CheckpointMismatch
from mosa_scale.ckpt.zero_reader import read_zero_checkpoint
from mosa_scale.config.run import load_run_config
from mosa_scale.data import DataSpec, build_loader
from mosa_scale.eval import load_merged_classifier
from mosa_scale.model.assembly import build_model
from mosa_scale.sparse import Router

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

log = logging.getLogger(__name__)
MERGE = REPO / "tools" / "merge_adapter.py"


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def run(request, zero_run) -> Path:
    return zero_run(request.param)


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory) -> tuple[Path, dict]:
    """The tool's output for the run's latest checkpoint (merged + unmerged), through the real CLI."""
    out = tmp_path_factory.mktemp("merged") / "out"
    proc = subprocess.run(
        [sys.executable, str(MERGE), str(run), "--out", str(out), "--unmerged"],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def _copy_run(run: Path, dst: Path) -> Path:
    """The run's config and checkpoints (not its adapter, data or logs)."""
    dst.mkdir(parents=True)
    shutil.copy(run / "config.yaml", dst / "config.yaml")
    shutil.copytree(run / "checkpoints", dst / "checkpoints")
    return dst


def _tag_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_tool_output_equals_the_training_runs_adapter(run, merged):
    out, report = merged
    assert report["world_size"] == 2 and report["step"] == 10 and report["structure_checked"]
    zero_config = yaml.safe_load((run / "config.yaml").read_text())["train"]["zero_config"]
    assert zero_config.endswith(f"zero{report['zero_stage']}.json")
    tool, manifest = read_adapter(out)  # checksums verified
    trained, trained_manifest = read_adapter(run / "adapter")
    assert tool.keys() == trained.keys() and not any(k.endswith((".slices", ".assign")) for k in tool)
    gap = max((tool[k] - trained[k]).abs().max().item() for k in tool)
    log.warning("ZeRO-%d: |tool merge - training run's merge| max = %.3e", report["zero_stage"], gap)
    assert gap <= 1e-6
    assert manifest["config"] == trained_manifest["config"] and manifest["num_classes"] == 10
    assert manifest["backbone"] == trained_manifest["backbone"] and manifest["mosa_scale_version"]
    assert set(manifest["tensors"]) == set(tool) and all(len(v["sha256"]) == 64 for v in manifest["tensors"].values())
    assert manifest["checkpoint"] == {"tag": "step00000010", "zero_stage": report["zero_stage"], "world_size": 2}
    unmerged, um = read_adapter(out / "unmerged")
    assert um["format"] == "unmerged" and any(k.endswith(".slices") for k in unmerged)
    # only safetensors and JSON are written, and nothing temporary is left behind
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == [
        "adapter.safetensors",
        "adapter_config.json",
        "unmerged",
        "unmerged/adapter.safetensors",
        "unmerged/adapter_config.json",
    ]


def test_reader_equals_deepspeeds_zero_to_fp32(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ours = read_zero_checkpoint(run)
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), exclude_frozen_parameters=True)
    mine = {**ours.buffers, **ours.params}
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # bit-identical fp32 values and buffers
    assert ours.step == 10 and ours.router["scope"] == "rank"


def test_every_deepspeed_file_is_read_weights_only(run, tmp_path, monkeypatch):
    optim = next(_tag_dir(run).glob("*optim_states.pt"))
    with pytest.raises(pickle.UnpicklingError, match="deepspeed"):  # why stand-ins are needed at all
        torch.load(optim, weights_only=True)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    consolidate(run, tmp_path / "out")
    assert len(calls) >= 3 and all(c is True for c in calls), calls
    assert load_weights_only(optim)["optimizer_state_dict"]["zero_stage"] in (2, 3)  # the enum, as a plain int


def test_dense_model_gives_the_logits_of_the_mosa_model_in_eval(run, merged):
    """The merged adapter in a plain dense model == the run's unmerged MoSA state in eval mode."""
    out, _ = merged
    cfg = load_run_config(run / "config.yaml")
    dense, backbone, _ = load_merged_classifier(out)
    mosa, _, _ = build_model(cfg, Router(cfg.train.seed, cfg.routing.scope), num_classes=10)
    state, _ = read_adapter(out / "unmerged")
    missing, unexpected = mosa.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "mosa_" in k]
    mosa.eval()
    frozen = {k: v for k, v in dense.state_dict().items() if "mosa_" not in k}
    assert all(torch.equal(v, mosa.state_dict()[k]) for k, v in frozen.items())
    img = backbone.image
    loader = build_loader(
        DataSpec(shards=str(run / "data"), split="val"),
        image_size=img.size,
        mean=img.mean,
        std=img.std,
        train=False,
        batch_size=64,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=cfg.train.seed,
        epoch=0,
    )
    gap, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            a, b = dense(batch["image"]), mosa(batch["image"])
            gap, n = max(gap, (a - b).abs().max().item()), n + int(batch["valid"].sum())
    log.warning("dense merged model vs MoSA eval: max |logit diff| = %.3e over %d samples", gap, n)
    assert n > 300 and gap <= 1e-5


# ---------------------------------------------------------------------------- refusals
def _write_config(src: Path, dst: Path, **changes) -> Path:
    data = yaml.safe_load(src.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    dst.write_text(yaml.safe_dump(data))
    return dst


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"adapter__bottleneck": 16}, ["adapter.bottleneck: run config.yaml 8, given 16", "shape(s) differ"]),
        ({"train__seed": 11}, ["train.seed: run config.yaml 3407, given 11", "partition differs"]),
        ({"adapter__mode": "row"}, ["adapter.mode", "partition differs"]),
        ({"adapter__num_experts": 2}, ["adapter.num_experts: run config.yaml 4, given 2", "shape(s) differ"]),
    ],
)
def test_mismatched_config_is_refused_naming_the_difference(zero_run, tmp_path, changes, needles):
    run = _copy_run(zero_run(2), tmp_path / "run")
    bad = _write_config(run / "config.yaml", tmp_path / "bad.yaml", **changes)
    with pytest.raises(CheckpointMismatch) as e:
        consolidate(run, tmp_path / "out", config=bad)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not (tmp_path / "out").exists()


def test_a_bare_checkpoint_folder_is_checked_against_its_tensors(zero_run, tmp_path):
    """Without the run's config.yaml to compare with, the seeded partition still gives it away."""
    tag = _tag_dir(zero_run(3))
    bare = tmp_path / tag.name
    shutil.copytree(tag, bare)
    bad = _write_config(zero_run(3) / "config.yaml", tmp_path / "bad.yaml", train__seed=11)
    with pytest.raises(CheckpointMismatch, match=r"partition differs in \d+ of 256 entries") as e:
        consolidate(bare, tmp_path / "out", config=bad)
    # the 4 split projections and the routing seed (train.seed seeds both), nothing else
    assert len(e.value.differences) == 5
    assert "train.seed: checkpoint routing seed 3407, config 11" in e.value.differences
    with pytest.raises(CheckpointError, match="pass --config"):
        consolidate(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    consolidate(bare, tmp_path / "good", config=zero_run(3) / "config.yaml")  # the right config is accepted
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == ["adapter.safetensors", "adapter_config.json"]


@pytest.mark.parametrize("stage", [2, 3])
def test_truncated_checkpoint_is_refused_and_leaves_the_output_as_it_was(zero_run, tmp_path, stage):
    run = _copy_run(zero_run(stage), tmp_path / "run")
    out = tmp_path / "out"
    consolidate(run, out)  # an earlier, good adapter in the output folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = _tag_dir(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = subprocess.run(
        [sys.executable, str(MERGE), str(run), "--out", str(out)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in proc.stderr and "truncated or damaged" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temp folder left


@pytest.mark.parametrize(
    "stage,missing",
    [
        (2, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        (3, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        (3, "zero_pp_rank_1_mp_rank_00_model_states.pt"),
    ],
)
def test_missing_shard_is_refused(zero_run, tmp_path, stage, missing):
    run = _copy_run(zero_run(stage), tmp_path / "run")
    (_tag_dir(run) / missing).unlink()
    with pytest.raises(CheckpointError) as e:
        consolidate(run, tmp_path / "out")
    assert f"{_tag_dir(run) / missing}: missing (the manifest lists it" in str(e.value)  # the manifest's check
    manifest = json.loads((_tag_dir(run) / "manifest.json").read_text())
    del manifest["files"][missing]  # a manifest that agrees: the layout check still finds the gap
    (_tag_dir(run) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as e:
        consolidate(run, tmp_path / "out")
    assert f"written by 2 rank(s) under ZeRO-{stage}, but {missing} is missing" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_an_earlier_tag_can_be_merged(zero_run, tmp_path):
    run = zero_run(2)
    result = consolidate(run, tmp_path / "out5", tag="step00000005")
    assert result.checkpoint.step == 5
    five, final = load_file(str(tmp_path / "out5" / "adapter.safetensors")), read_adapter(run / "adapter")[0]
    assert five.keys() == final.keys() and any(not torch.equal(five[k], final[k]) for k in five)
