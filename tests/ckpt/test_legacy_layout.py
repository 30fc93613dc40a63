"""A checkpoint written by mosa_scale before MoSA layers held their experts in one tensor (one parameter
and one optimizer param group per expert slice): read by the offline tools as the same numbers, refused
for resume with a message, never misread. The fixture is a real 2-rank ZeRO-2 run of that version
(tiny_run.yaml, 6 steps), with the merged adapter that run wrote itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mosa_scale.ckpt import read_adapter
from mosa_scale.ckpt.consolidate import consolidate
from mosa_scale.ckpt.inspect import inspect_path
from mosa_scale.ckpt.safe_load import CheckpointError
from mosa_scale.ckpt.zero_reader import read_zero_checkpoint, refuse_legacy_layout
from mosa_scale.sparse.layout import legacy_layers

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_zero2_run"


def test_legacy_checkpoint_consolidates_to_the_adapter_its_run_wrote(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    with pytest.raises(CheckpointError, match="manifest.json does not exist"):  # it predates manifests
        read_zero_checkpoint(run)
    with pytest.raises(CheckpointError, match="manifest.json does not exist"):
        consolidate(run, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    ck = read_zero_checkpoint(run, unverified=True)  # the explicit opt-in
    assert ck.legacy_layout and ck.stage == 2 and ck.world_size == 2 and ck.step == 6
    assert any(k.endswith(".slice3") for k in ck.params)  # really the old layout
    state = ck.trained_state()
    assert not legacy_layers(state) and any(k.endswith(".slices") for k in state)
    result = consolidate(run, tmp_path / "out", unverified=True)
    merged, _ = read_adapter(result.merged_dir)
    written, _ = read_adapter(run / "adapter")  # what the old training run merged itself
    assert merged.keys() == written.keys() and len(merged) > 4
    assert max(float((merged[k] - written[k]).abs().max()) for k in merged) == 0.0
    with pytest.raises(CheckpointError, match="manifest.json does not exist"):
        inspect_path(run)
    report = inspect_path(run, unverified=True)
    assert report["kind"] == "deepspeed" and report["zero_stage"] == 2 and report["step"] == 6
    assert report["partitions"] and report["expert_activations"]


def test_legacy_checkpoint_is_refused_for_resume(tmp_path):
    tag = FIXTURE / "checkpoints" / "step00000006"
    with pytest.raises(CheckpointError, match="one optimizer param group per expert slice"):
        refuse_legacy_layout(tag)
    # a checkpoint of the current layout passes the same check
    cur = tmp_path / "step1"
    cur.mkdir()
    torch.save(
        {
            "module": {
                "tower.b.mosa_adapter.up.slices": torch.zeros(4),
                "tower.b.mosa_adapter.up.assign": torch.zeros(4, dtype=torch.int8),
            }
        },
        cur / "mp_rank_00_model_states.pt",
    )
    refuse_legacy_layout(cur)
