import pytest
from tiny_models import make_tower

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.config import ConfigError
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
