"""A new adapter method is one folder: written here into a temporary package, found by discovery,
configured, injected, trained, merged and removed without touching any other file."""

import dataclasses
import sys
import textwrap

import pytest
import torch
from tiny_models import Classifier, batches, make_tower
from train_util import train_steps

from mosa_scale.adapters import (
    AdapterConfig,
    catalog,
    discover_methods,
    inject_adapters,
    is_adapter_name,
    registered_methods,
    remove_adapters,
)
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict
from mosa_scale.config import ConfigError
from mosa_scale.config.run import run_config_from_plain
from mosa_scale.optim import MoSAAdamW, sparse_layers
from mosa_scale.sparse import Router

FOLDER = {
    "__init__.py": '''
        """Test method ``side``: a low-rank branch beside the FFN, ``FFN(x) + B(A(x))``."""
        from mosa_scale.adapters.factory import projection, split_flags
        from mosa_scale.adapters.registry import register_method
        from mosa_scale.adapters.wrap import wrap

        from .config import SideConfig
        from .layer import Side, SideWrapper


        class SideMethod:
            name = "side"
            config_class = SideConfig

            def inject_block(self, model, site, block, cfg, ctx):
                n = cfg.experts_for(block)
                split_a, split_b = split_flags(cfg, n)
                common = dict(num_experts=n, cfg=cfg, ctx=ctx, bias=True)
                prefix = f"{site.mlp}.mosa_side"
                a = projection(ctx.width, cfg.side_rank, init="kaiming", split=split_a, name=f"{prefix}.a", **common)
                b = projection(cfg.side_rank, ctx.width, init="zeros", split=split_b, name=f"{prefix}.b", **common)
                side = Side(a, b)
                wrap(model, site.mlp, lambda m: SideWrapper(m, side))
                return {prefix: side}


        register_method(SideMethod())
    ''',
    "config.py": """
        from dataclasses import dataclass

        from mosa_scale.adapters.config import AdapterConfig, positive_int


        @dataclass(frozen=True)
        class SideConfig(AdapterConfig):
            side_rank: int = 4

            def validate_into(self, p, *, prefix, methods):
                super().validate_into(p, prefix=prefix, methods=methods)
                positive_int(p, f"{prefix}.side_rank", self.side_rank)
    """,
    "layer.py": """
        from mosa_scale.adapters.factory import CastIO
        from mosa_scale.adapters.wrap import Wrapper


        class Side(CastIO):
            def __init__(self, a, b):
                super().__init__()
                self.a, self.b = a, b

            def forward(self, x):  # (B, T, D) -> (B, T, D)
                return self.b(self.a(x))


        class SideWrapper(Wrapper):
            def __init__(self, base, side):
                super().__init__(base)
                self.mosa_side = side

            def forward(self, x):  # (B, T, D) -> (B, T, D)
                return self.base_layer(x) + self.mosa_side(x)
    """,
}


@pytest.fixture
def side_method(tmp_path, monkeypatch):
    builtin = registered_methods()
    folder = tmp_path / "mosa_test_methods" / "side"  # a namespace package: a plain folder of method folders
    folder.mkdir(parents=True)
    for name, text in FOLDER.items():
        (folder / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(catalog, "_METHODS", dict(catalog._METHODS))  # the method is forgotten afterwards
    yield builtin, discover_methods("mosa_test_methods")
    for name in [m for m in sys.modules if m.split(".")[0] == "mosa_test_methods"]:
        del sys.modules[name]


def test_new_method_folder(side_method):
    builtin, found = side_method
    assert found == sorted([*builtin, "side"])
    cfg = AdapterConfig(method="side", side_rank=4, num_experts=2, share="none")
    assert type(cfg).__name__ == "SideConfig" and cfg.side_rank == 4
    with pytest.raises(ConfigError) as e:  # the method's own validation, reported with the shared fields'
        AdapterConfig(method="side", side_rank=0, num_experts=0)
    assert len(e.value.problems) == 2 and "adapter.side_rank: got 0" in str(e.value)
    assert run_config_from_plain({"adapter": {"method": "side", "side_rank": 3}}).adapter.side_rank == 3

    frozen, tower = make_tower(), make_tower()
    model = Classifier(tower, 32)
    router = Router(seed=3407)
    report = inject_adapters(tower, tower.sites(), cfg, seed=3407, router=router, width=32)
    assert [r["module"] for r in report.rows] == ["blocks.0.mlp.mosa_side", "blocks.1.mlp.mosa_side"]
    assert [r["split"] for r in report.rows] == [[("a", 2), ("b", 2)]] * 2
    state = tower.state_dict()
    assert set(frozen.state_dict()) < set(state) and all(
        is_adapter_name(k) for k in set(state) - set(frozen.state_dict())
    )

    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.05, lr=2e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, router, opt, batches(4))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".mosa_side.a." in k for k in changed) and any(".mosa_side.b." in k for k in changed)
    assert all(is_adapter_name(k) for k in changed)

    # merge: the MoSA state becomes a dense adapter of the same method, with the same eval output
    dense_tower = make_tower()
    dense = Classifier(dense_tower, 32)
    inject_adapters(
        dense_tower, dense_tower.sites(), dataclasses.replace(cfg, num_experts=1), seed=3407, router=None, width=32
    )
    missing, unexpected = dense.load_state_dict(merge_state_dict(adapter_state_dict(model)), strict=False)
    assert not unexpected and not any(is_adapter_name(k) for k in missing)
    assert not sparse_layers(dense)
    model.eval()
    dense.eval()
    x, _ = batches(1, seed=5)[0]
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max().item() <= 1e-6
        assert not torch.equal(tower(x), frozen(x))  # the trained branch changes the features

    assert remove_adapters(tower) == 2
    after = tower.state_dict()
    assert after.keys() == frozen.state_dict().keys()
    assert all(torch.equal(after[k], v) for k, v in frozen.state_dict().items())
    with torch.no_grad():
        assert torch.equal(tower(x), frozen(x))
