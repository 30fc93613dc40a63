"""The run config: every section checks itself, all problems reported together; one run seed
(train.seed), and configs written with the removed adapter.seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mosa_scale.config import ConfigError
from mosa_scale.config.run import (
    ConsistencyConfig,
    HeadConfig,
    OptimConfig,
    RoutingConfig,
    TrainConfig,
    load_run_config,
    run_config_from_plain,
)
from mosa_scale.data.config import DataConfig
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


@pytest.mark.parametrize(
    "build,problem",
    [
        (lambda: OptimConfig(lr=0.0), "optim.lr: got 0.0; must be > 0"),
        (lambda: OptimConfig(inactive="drift"), "optim.inactive: got 'drift'; allowed values are ['skip', 'coast']"),
        (lambda: TrainConfig(steps=0), "train.steps: got 0; must be > 0"),
        (
            lambda: TrainConfig(precision="fp8"),
            "train.precision: got 'fp8'; allowed values are ['fp32', 'bf16', 'fp16']",
        ),
        (lambda: DataConfig(workers=-1), "data.workers: got -1; must be >= 0"),
        (lambda: HeadConfig(kind="zeroshot"), "head.class_names: 'zeroshot' needs the class names for its prompts"),
        (lambda: RoutingConfig(scope="node"), "routing.scope: got 'node'; allowed values are ['global', 'rank']"),
        (lambda: ConsistencyConfig(hidden_blocks=-1), "consistency.hidden_blocks: must be >= 0"),
    ],
)
def test_every_section_checks_itself_when_built(build, problem):
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.problems == [problem]


def test_problems_of_every_section_and_across_sections_are_reported_together():
    overrides = ["optim.lr=0", "optim.warmup_steps=500", "data.workers=-1", "consistency.hidden_blocks=-1"]
    overrides += ["model.image_size=0", "adapter.num_experts=200", "train.global_batch=30", "train.micro_batch=8"]
    with pytest.raises(ConfigError) as e:
        load_run_config(None, overrides, check_files=False)
    assert sorted(e.value.problems) == [
        "adapter.num_experts: got 200; at most 127 experts are supported",
        "consistency.hidden_blocks: must be >= 0",
        "data.workers: got -1; must be >= 0",
        "model.image_size: got image_size=0; must be a positive int or None",
        "optim.lr: got 0.0; must be > 0",
        "optim.warmup_steps: got 500; must be in [0, train.steps=100)",  # checked although optim.lr was bad
        "train.global_batch: 30 is not micro_batch (8) x accumulation x world size (1) for any whole accumulation; "
        "use a multiple of 8",
    ]
