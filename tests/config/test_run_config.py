"""The run config: one run seed (train.seed), and configs written with the removed adapter.seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mosa_scale.config import ConfigError
from mosa_scale.config.run import load_run_config, run_config_from_plain
from mosa_scale.eval.evaluate import load_merged_classifier

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_zero2_run"


def test_a_legacy_config_with_the_same_adapter_seed_loads_as_the_run_seed():
    plain = yaml.safe_load((LEGACY / "config.yaml").read_text())
    assert plain["adapter"]["seed"] == plain["train"]["seed"] == 3407  # written before train.seed was the one seed
    cfg = run_config_from_plain(plain)
    assert cfg.train.seed == 3407 and not hasattr(cfg.adapter, "seed")
    assert load_run_config(None, ["adapter.seed=3407"], check_files=False).train.seed == 3407


def test_a_legacy_adapter_file_loads_and_evaluates():
    model, _, cfg = load_merged_classifier(LEGACY / "adapter")  # its adapter_config.json records adapter.seed
    assert cfg.train.seed == 3407
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    "overrides",
    [["adapter.seed=11"], ["adapter.seed=11", "train.seed=5"], ["train.seed=11", "adapter.seed=3407"]],
)
def test_an_adapter_seed_other_than_the_run_seed_is_refused_with_the_fix(overrides):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, overrides, check_files=False)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("adapter.seed: got ") and "adapter.seed was removed" in str(e.value)
    assert "set train.seed to its value" in str(e.value)
