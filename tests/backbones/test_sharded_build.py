"""Towers built partitioned under ZeRO-3 (``zero.Init``) on 2 real DeepSpeed CPU ranks equal the
replicated build: random init, pretrained loading from every checkpoint layout, and a MoSA /
MoSA-LoRA run's outputs, trained adapter and merged adapter."""

from __future__ import annotations

import json

import pytest
from launch_util import REPO, deepspeed_launch
from tiny_towers import TOWERS

pytestmark = pytest.mark.slow  # multi-process DeepSpeed launches

WORKER = REPO / "tests" / "backbones" / "shard_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    deepspeed_launch(WORKER, ["--out", str(out), "--phases", "init,load,train"], ranks=2, timeout=1500)
    return {
        (phase, rank): json.loads((out / f"{phase}_rank{rank}.json").read_text())
        for phase in ("init", "load", "train")
        for rank in (0, 1)
    }


def test_random_init_equals_the_replicated_build(results):
    for rank in (0, 1):
        rows = results["init", rank]
        assert {(r["kind"], r["dtype"]) for r in rows} == {
            (k, d) for k in TOWERS for d in ("torch.float32", "torch.bfloat16")
        }
        for r in rows:
            assert r["equal"] and r["dtypes_equal"] and r["max_diff"] == 0.0, r
            # sharded: each rank holds half of every parameter (rounded up) and nothing whole
            assert r["total_elems"] / 2 <= r["local_elems"] <= r["total_elems"] / 2 + 2 * 200, r
            assert r["whole_params_outside_gather"] == 0, r


def test_pretrained_loading_equals_the_replicated_load(results):
    cases = {
        "openclip_pt_with_text",
        "openclip_sharded_safetensors",
        "siglip_sharded_safetensors",
        "eva02_sharded_safetensors",
        "eva02-e_sharded_safetensors",
        "hf-vit_save_pretrained",
        "hf-vit_save_pretrained_sharded",
        "hf-clip_save_pretrained",
        "hf-clip_save_pretrained_sharded",
    }
    for rank in (0, 1):
        rows = results["load", rank]
        assert {r["case"] for r in rows} == cases
        for r in rows:
            assert r["equal"] and r["max_diff"] == 0.0 and r["dtypes_equal"], r  # exactly, fp32 and bf16
            # each rank read only its half of the image tower from the (fp32) files
            fp32_bytes = r["tower_bytes"] * (1 if r["dtype"] == "torch.float32" else 2)
            assert fp32_bytes / 2 <= r["bytes_read"] <= fp32_bytes / 2 + 4 * 400, r
            if r["replicated_bytes_read"] is not None:  # the text tower was never read
                assert r["replicated_bytes_read"] == fp32_bytes, r


def test_training_on_a_sharded_tower_equals_the_replicated_tower(results):
    for rank in (0, 1):
        rows = results["train", rank]
        assert {(r["kind"], r["method"]) for r in rows} >= {
            ("openclip", "parallel"),
            ("hf-vit", "parallel"),
            ("hf-clip", "lora"),
            ("siglip", "lora"),
            ("eva02-e", "parallel"),
            ("eva02-e", "lora"),
        }
        for r in rows:
            assert r["same_keys"] and r["merged_tensors"] > 0, r
            assert r["logits_diff"] <= 1e-6 and r["trained_diff"] <= 1e-6 and r["merged_diff"] <= 1e-6, r
            assert r["logits_moved_by_training"] > 1e-3, r  # the adapters did train
        # ds_configs/zero3_lowmem.json's fetch (all-reduce into the parameters' buffer) trains the same bits
        fetched = {(r["kind"], r["method"]): r["all_reduce_fetch_diff"] for r in rows}
        assert {k for k, v in fetched.items() if v is not None} == {
            ("openclip", "parallel"),
            ("eva02-e", "parallel"),
            ("hf-vit", "sequential"),
        }
        assert all(v == 0.0 for v in fetched.values() if v is not None), fetched
        # ... and did fetch by all-reduce (every step, several modules)
        assert all(r["all_reduce_fetches"] >= 3 * 2 for r in rows if r["all_reduce_fetches"] is not None), rows
