"""Small runs whose planner predictions are checked against real 2-rank DeepSpeed steps on CPU."""

from __future__ import annotations

from tiny_towers import TINY_EVA_E, TINY_OPENCLIP

from mosa_scale.adapters import AdapterConfig
from mosa_scale.backbones import BackboneConfig
from mosa_scale.config.run import ConsistencyConfig, DataConfig, RunConfig, TrainConfig

VIT = BackboneConfig(
    family="hf-vit",
    pooling="mean",
    hf_config=dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        image_size=64,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
)
OPENCLIP = BackboneConfig(family="openclip", name="tiny", openclip_cfg=TINY_OPENCLIP)
EVA_E = BackboneConfig(family="openclip", name="tiny-eva02-e", openclip_cfg=TINY_EVA_E)
EVERY_USE = {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0}

# name: tower, adapter method, ZeRO stage, checkpointing, consistency, ZeRO-3 knobs
CASES = {  # stages 0-2 first: a ZeRO-3 engine replaces F.linear for the rest of its process
    "s0": dict(tower=VIT, method="parallel", stage=0, ac=False, consistency=False, zero={}),
    "s2": dict(tower=VIT, method="parallel", stage=2, ac=False, consistency=False, zero={}),
    "s3": dict(tower=VIT, method="parallel", stage=3, ac=False, consistency=False, zero=EVERY_USE),
    "s3_ac": dict(tower=VIT, method="parallel", stage=3, ac=True, consistency=False, zero=EVERY_USE),
    "s3_consistency": dict(tower=VIT, method="parallel", stage=3, ac=False, consistency=True, zero=EVERY_USE),
    "s3_resident": dict(
        tower=VIT, method="parallel", stage=3, ac=False, consistency=False, zero={"stage3_prefetch_bucket_size": 0}
    ),  # DeepSpeed's reuse distance: held all step
    "s3_openclip_lora": dict(tower=OPENCLIP, method="lora", stage=3, ac=False, consistency=False, zero=EVERY_USE),
    "s3_eva02e_lora": dict(tower=EVA_E, method="lora", stage=3, ac=False, consistency=False, zero=EVERY_USE),
}
MICRO = 8


def case_config(name: str) -> RunConfig:
    c = CASES[name]
    return RunConfig(
        model=c["tower"],
        adapter=AdapterConfig(method=c["method"], bottleneck=16, num_experts=4, dropout=0.0),
        data=DataConfig(image_size=None),
        train=TrainConfig(seed=5, micro_batch=MICRO, global_batch=2 * MICRO, gradient_checkpointing=c["ac"]),
        consistency=ConsistencyConfig(enabled=c["consistency"]),
    )


def ds_config(name: str, world: int) -> dict:
    c = CASES[name]
    return {
        "train_batch_size": MICRO * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": c["stage"], "stage3_param_persistence_threshold": 0, **c["zero"]},
    }
