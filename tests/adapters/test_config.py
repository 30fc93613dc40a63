import dataclasses

import pytest
from tiny_models import make_tower

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.config import ConfigError
from mosa_scale.config.errors import Problems
from mosa_scale.config.loader import build_dataclass
from mosa_scale.sparse import Router


@pytest.mark.parametrize(
    "kwargs,field,allowed",
    [
        ({"num_experts": 0}, "adapter.num_experts", ">= 1"),
        ({"method": "prefix"}, "adapter.method", "'houlsby', 'lora', 'parallel', 'sequential'"),
        ({"share": "both"}, "adapter.share", "'none', 'down', 'up'"),
        ({"mode": "diagonal"}, "adapter.mode", "'all', 'row', 'column'"),
        ({"bottleneck": 0}, "adapter.bottleneck", "positive integer"),
        ({"bottleneck": -3}, "adapter.bottleneck", "positive integer"),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ConfigError) as e:
        AdapterConfig(**kwargs)
    assert field in str(e.value) and allowed in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        AdapterConfig(num_experts=0, share="x", mode="y", bottleneck=0)
    assert len(e.value.problems) == 4


def test_more_experts_than_entries():
    tower = make_tower()
    cfg = AdapterConfig(bottleneck=2, num_experts=4, share="none", mode="row")  # Up rows hold 2 entries
    with pytest.raises(ValueError, match=r"num_experts: 4 experts cannot split 'blocks.0.mosa_adapter.up.weight'"):
        inject_adapters(tower, tower.sites(), cfg, seed=0, router=Router(seed=0), width=32)


def test_each_method_has_its_config_class():
    assert type(AdapterConfig()).__name__ == "BottleneckConfig" and AdapterConfig().bottleneck == 64
    lora = AdapterConfig(method="lora", bottleneck=8, lora_targets=("q",))
    assert type(lora).__name__ == "LoRAConfig" and lora.lora_targets == ("q",)
    assert dataclasses.replace(lora, num_experts=1) == AdapterConfig(
        method="lora", bottleneck=8, lora_targets=("q",), num_experts=1
    )
    with pytest.raises(TypeError, match="lora_targets"):
        AdapterConfig(method="parallel", lora_targets=("q",))
    with pytest.raises(ConfigError) as e:
        AdapterConfig(method="lora", lora_targets=("k",), bottleneck=0, share="x")
    assert len(e.value.problems) == 3 and "adapter.lora_targets: got 'k'" in str(e.value)
    with pytest.raises(ConfigError, match="'parallel' is configured by BottleneckConfig, not LoRAConfig"):
        dataclasses.replace(lora, method="parallel")


def build(section: dict):
    p = Problems()
    return build_dataclass(AdapterConfig, section, "adapter", p), p.items


def test_yaml_section_is_read_into_the_method_config():
    cfg, problems = build({"method": "lora", "bottleneck": 8, "lora_targets": ["v"]})
    assert not problems and type(cfg).__name__ == "LoRAConfig" and cfg.lora_targets == ("v",)
    # configs written before the per-method classes carry every method's fields at their defaults
    cfg, problems = build({"method": "parallel", "bottleneck": 8, "lora_targets": ["q", "v"]})
    assert not problems and cfg.bottleneck == 8 and not hasattr(cfg, "lora_targets")
    cfg, problems = build({"method": "parallel", "lora_targets": ["q"], "num_experts": 0})
    # both problems reported; the section is rebuilt with the bad fields at their defaults so that
    # checks across sections still run (the recorded problems fail the load)
    assert len(problems) == 2 and cfg.num_experts == 4
    assert "adapter.lora_targets: belongs to method lora, not to 'parallel'" in problems[0]
    cfg, problems = build({"method": "lroa", "bottleneck": 8, "lora_targets": ["q"]})
    assert problems == ["adapter.method: got 'lroa'; allowed values are ['houlsby', 'lora', 'parallel', 'sequential']"]
    cfg, problems = build({"method": "sequential", "bottlneck": 8})
    assert problems == ["adapter.bottlneck: unknown key; did you mean 'bottleneck'?"]
