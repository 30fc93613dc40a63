"""Checkpoint and adapter files under attack and damage, on real 2-rank checkpoints: crafted pickles
are refused without running, every flipped byte is found (exit 2, file named, nothing written),
non-finite and misshapen adapters are refused before anything is allocated."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hostile_files import (
    data_offsets,
    flip_byte,
    nan_into,
    plant_payload,
    refresh_manifest,
    rewrite_adapter,
    set_header_shape,
)
from launch_util import REPO, launch_env
from safetensors.torch import load_file

from mosa_scale.ckpt.adapter_file import MANIFEST, WEIGHTS, AdapterFileError, read_adapter
from mosa_scale.ckpt.consolidate import consolidate
from mosa_scale.ckpt.manifest import MANIFEST_NAME, file_digest, read_manifest, tag_files, verify_tag
from mosa_scale.ckpt.safe_load import CheckpointError, load_weights_only
from mosa_scale.engine.checkpoint import RANK_STATE, WeightsOnlyLoads, retain

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

MERGE = REPO / "tools" / "merge_adapter.py"
INSPECT = REPO / "tools" / "inspect_checkpoint.py"
EVAL = REPO / "launchers" / "eval.py"
KINDS = {
    "model": "mp_rank_00_model_states.pt",
    "optim": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "rank": "rank00000_state.pt",
}


def _copy_run(run: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(run / "config.yaml", dst / "config.yaml")
    shutil.copytree(run / "checkpoints", dst / "checkpoints")
    return dst


def _tag_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _cli(tool: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(tool), *args], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300
    )


# ---------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("stage", [2, 3])
def test_every_tag_has_a_manifest_of_all_its_files(zero_run, stage):
    ckpts = zero_run(stage) / "checkpoints"
    for tag in ("step00000005", "step00000010"):
        manifest = read_manifest(ckpts / tag)
        assert manifest["step"] == int(tag[4:]) and manifest["world_size"] == 2 and manifest["tag"] == tag
        assert sorted(manifest["files"]) == tag_files(ckpts / tag)
        assert {RANK_STATE.format(rank=r) for r in (0, 1)} <= set(manifest["files"])
        assert sum(n.endswith("optim_states.pt") for n in manifest["files"]) == 2
        for name, want in manifest["files"].items():
            assert file_digest(ckpts / tag / name) == want
        verify_tag(ckpts / tag)


def test_rank_state_is_tensors_and_plain_containers(zero_run):
    state = load_weights_only(_tag_dir(zero_run(2)) / "rank00001_state.pt", stand_ins=False)
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["rng"]["numpy"]["keys"].numel() == 624
    assert state["rng"]["python"]["state"].numel() == 625
    assert state["data"]["batch"] >= 1 and state["epoch"] == 0 and state["valid"] > 0


# ---------------------------------------------------------------------------- crafted pickles
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crafted_pickle_is_refused_without_running(zero_run, tmp_path, kind):
    run = _copy_run(zero_run(2), tmp_path / "run")
    target = _tag_dir(run) / KINDS[kind]
    marker = tmp_path / "payload_ran"
    plant_payload(target, marker)
    refresh_manifest(_tag_dir(run))  # the sizes and checksums fit: only the content check can refuse it
    for load in (load_weights_only, lambda p: WeightsOnlyLoads(None).load(str(p), map_location="cpu")):
        with pytest.raises(CheckpointError, match="pickled global 'exec'") as e:
            load(target)
        assert str(target) in str(e.value)
    proc = _cli(MERGE, str(run), "--out", str(tmp_path / "out"))
    if kind != "rank":  # merging reads the DeepSpeed files only; resume reads all (tests/engine)
        assert proc.returncode == 2 and KINDS[kind] in proc.stderr and "'exec'" in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "out").exists()
    assert not marker.exists()


# ---------------------------------------------------------------------------- flipped bytes
@pytest.mark.parametrize(
    "name",
    [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rank00001_state.pt",
    ],
)
def test_flipped_byte_in_any_checkpoint_file_is_refused(zero_run, tmp_path, name):
    run = _copy_run(zero_run(2), tmp_path / "run")
    target = _tag_dir(run) / name
    start, size = data_offsets(target)[-1] if "optim" in name else (None, 0)
    flip_byte(target, None if start is None else start + size // 2)  # optimizer shards: inside tensor data
    for tool, args in (
        (MERGE, ["--out", str(tmp_path / "out")]),
        (INSPECT, []),
        (MERGE, ["--out", str(tmp_path / "out"), "--unverified"]),
    ):  # a manifest always counts
        proc = _cli(tool, str(run), *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{target}: sha256 differs from the manifest's" in proc.stderr
    proc = _cli(INSPECT, str(target))  # one file given alone is checked against its tag's manifest too
    assert proc.returncode == 2 and "sha256 differs" in proc.stderr and not proc.stdout
    assert not (tmp_path / "out").exists()


def test_unlisted_truncated_and_unmanifested_tags_are_refused(zero_run, tmp_path):
    run = _copy_run(zero_run(2), tmp_path / "run")
    tag = _tag_dir(run)
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        verify_tag(tag)
    assert "2 problem(s)" in str(e.value)
    assert f"{tag / 'mp_rank_01_model_states.pt'}: not listed in manifest.json" in str(e.value)
    assert f"{shard}: 1000 bytes, the manifest records" in str(e.value) and "truncated or damaged" in str(e.value)
    (tag / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="manifest.json does not exist: checkpoint 'step00000010' is incomplete"):
        consolidate(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_non_finite_values(zero_run, tmp_path):
    run = _copy_run(zero_run(2), tmp_path / "run")
    shard = _tag_dir(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    fp32 = load_weights_only(shard)["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    nan_into(shard, fp32)  # one fp32 master value of rank 1's partition
    refresh_manifest(_tag_dir(run))
    proc = _cli(MERGE, str(run), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "non-finite values" in proc.stderr and "NaN/inf" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- retention
def test_retention_orders_complete_tags_by_step_and_protects_latest(zero_run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    src = _tag_dir(zero_run(2))
    for name, step in (
        ("step25", 25),
        ("step30", 30),
        ("step00000005", 5),
        ("step00000007", 7),
        ("step00000009", 9),
        ("step00000010", 10),
    ):
        shutil.copytree(src, ckpts / name)
        body = read_manifest(ckpts / name)
        body["step"] = step
        (ckpts / name / MANIFEST_NAME).write_text(json.dumps(body))
    for name in ("step00000008", "step00000011", "step12"):  # interrupted saves (no manifest), a foreign folder
        (ckpts / name).mkdir()
        shutil.copy(src / "mp_rank_00_model_states.pt", ckpts / name)
    removed = retain(ckpts, keep=2, step=10, protect={"step00000005"})
    # 9 and 10 are the newest two, 5 is protected; 8 is an earlier save that never finished
    assert sorted(removed) == ["step00000007", "step00000008"]
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step00000005",
        "step00000009",
        "step00000010",
        "step00000011",
        "step12",
        "step25",
        "step30",
    ]


# ---------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapter(zero_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "a"
    consolidate(zero_run(2), out)
    return out


def _eval(adapter_dir: Path, data: Path) -> subprocess.CompletedProcess:
    return _cli(EVAL, "--adapter", str(adapter_dir), "--data", str(data), "--split", "val", "--max-batches", "1")


def _variant(adapter: Path, tmp_path: Path) -> Path:
    d = tmp_path / "variant"
    shutil.copytree(adapter, d)
    return d


@pytest.mark.parametrize("where", ["tensor data", "safetensors header", "adapter_config.json"])
def test_flipped_byte_in_an_adapter_file_is_refused(zero_run, adapter, tmp_path, where):
    d = _variant(adapter, tmp_path)
    raw = (d / WEIGHTS).read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if where == "tensor data":
        flip_byte(d / WEIGHTS, (header_end + len(raw)) // 2)
    elif where == "safetensors header":
        flip_byte(d / WEIGHTS, raw.index(b'"shape":[') + len(b'"shape":['))  # a digit of a shape
    else:
        text = (d / MANIFEST).read_bytes()
        flip_byte(d / MANIFEST, text.index(b'"bottleneck": 8') + len(b'"bottleneck": '))
    proc = _eval(d, zero_run(2) / "data")
    assert proc.returncode == 2 and not proc.stdout, proc.stderr[-2000:]
    assert str(d / (MANIFEST if where == "adapter_config.json" else WEIGHTS)) in proc.stderr
    with pytest.raises((AdapterFileError, json.JSONDecodeError)):
        read_adapter(d)


def test_consistently_rewritten_bad_adapters_are_refused_before_allocating(zero_run, adapter, tmp_path):
    data = zero_run(2) / "data"
    tensors = load_file(str(adapter / WEIGHTS))
    base_manifest = json.loads((adapter / MANIFEST).read_text())
    up = next(k for k in tensors if k.endswith("mosa_adapter.up.weight"))
    cases = {}

    nan = dict(tensors)
    nan["mosa_head.bias"] = nan["mosa_head.bias"].clone()
    nan["mosa_head.bias"][3] = float("nan")
    cases["nan"] = (nan, base_manifest, "non-finite values in mosa_head.bias (1 NaN/inf)")

    shape = dict(tensors)
    shape[up] = torch.zeros(shape[up].shape[0], shape[up].shape[1] + 3)
    cases["shape"] = (shape, base_manifest, f"{up}: (32, 11) in the file, (32, 8) from its config")

    huge = json.loads(json.dumps(base_manifest))
    huge["config"]["adapter"]["bottleneck"] = 2**36  # 8 TB of adapter weights if it were built
    cases["huge"] = (tensors, huge, "(32, 8) in the file, (32, 68719476736) from its config")

    classes = json.loads(json.dumps(base_manifest))
    classes["num_classes"] = 10**12
    cases["classes"] = (tensors, classes, "mosa_head.weight: (10, 32) in the file, (1000000000000, 32)")
    for name, (state, manifest, needle) in cases.items():
        d = tmp_path / name
        shutil.copytree(adapter, d)
        rewrite_adapter(d, state, json.loads(json.dumps(manifest)))
        t0 = time.perf_counter()
        proc = _eval(d, data)
        assert proc.returncode == 2 and not proc.stdout, (name, proc.stderr[-2000:])
        assert needle in proc.stderr and str(d) in proc.stderr, (name, proc.stderr[-2000:])
        assert time.perf_counter() - t0 < 120


def test_lying_safetensors_header_is_refused(zero_run, adapter, tmp_path):
    d = _variant(adapter, tmp_path)
    set_header_shape(d / WEIGHTS, "mosa_head.weight", [10_000, 32])  # claims 1.28 MB the file does not hold
    proc = _eval(d, zero_run(2) / "data")
    assert proc.returncode == 2 and not proc.stdout
    assert (
        f"{d / WEIGHTS}: tensor 'mosa_head.weight': the header says shape [10000, 32] F32 (1280000 bytes)"
        in proc.stderr
    )
