"""Merged adapters outside mosa_scale: PEFT (the real library), LoRA folded into the weights,
and attach_merged_adapter into unmodified OpenCLIP / HF backbones, all against the MoSA model."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from train_util import train_steps  # noqa: E402

from mosa_scale.adapters import AdapterConfig  # noqa: E402
from mosa_scale.backbones import BackboneConfig, build_backbone  # noqa: E402
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict, write_adapter  # noqa: E402
from mosa_scale.ckpt.export import attach_merged_adapter, export_peft, fold_lora  # noqa: E402
from mosa_scale.config.loader import to_plain  # noqa: E402
from mosa_scale.config.run import RunConfig, TrainConfig  # noqa: E402
from mosa_scale.model.assembly import build_model  # noqa: E402
from mosa_scale.optim import MoSAAdamW  # noqa: E402
from mosa_scale.sparse import Router  # noqa: E402

log = logging.getLogger(__name__)
TINY_HF = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 16,
    "patch_size": 8,
}
TINY_OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
}
BACKBONES = {
    "hf-vit": BackboneConfig(family="hf-vit", hf_config=TINY_HF, pooling="mean"),
    "hf-clip": BackboneConfig(family="hf-clip", hf_config=TINY_HF, pooling="cls"),
    "openclip": BackboneConfig(family="openclip", name="tiny", openclip_cfg=TINY_OPENCLIP),
}
SEED, CLASSES = 7, 5


def pixels(n: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def trained_adapter(tmp_path, family: str, adapter: AdapterConfig, steps: int = 6):
    """Trains a MoSA adapter in-process, writes the merged adapter; returns (MoSA model in eval, dir)."""
    cfg = RunConfig(model=BACKBONES[family], adapter=adapter, train=TrainConfig(seed=SEED))
    router = Router(SEED)
    model, backbone, _ = build_model(cfg, router, num_classes=CLASSES)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.05, lr=3e-2)
    x, y = pixels(8, seed=1), torch.arange(8) % CLASSES
    train_steps(model, router, opt, [(x, y)] * steps)
    model.eval()
    manifest = {
        "config": to_plain(cfg),
        "backbone": {"name": backbone.name, "source": backbone.source, "family": family},
        "num_classes": CLASSES,
        "step": steps,
    }
    out = write_adapter(tmp_path / "merged", merge_state_dict(adapter_state_dict(model)), manifest)
    return model, out


def fresh_backbone(family: str):
    """The same frozen backbone, built again (build_model draws it under the run seed) and left unmodified."""
    torch.manual_seed(SEED)
    return build_backbone(BACKBONES[family])


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- PEFT and folding
LORA_CASES = [("hf-vit", 4), ("hf-vit", 1), ("hf-clip", 4)]


@pytest.mark.parametrize("family,n", LORA_CASES)
def test_peft_export_loads_in_peft_and_gives_the_same_logits(tmp_path, family, n):
    from peft import PeftModel

    mosa, merged = trained_adapter(
        tmp_path, family, AdapterConfig(method="lora", bottleneck=4, num_experts=n, share="none")
    )
    x = pixels()
    with torch.no_grad():
        expected = mosa(x)
    peft_dir = export_peft(merged, tmp_path / "peft")
    assert sorted(p.name for p in peft_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
    ]
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    backbone = fresh_backbone(family)
    library = backbone.model.tower  # the unmodified transformers ViTModel / CLIPVisionModel
    head = torch.nn.Linear(library.config.hidden_size, CLASSES)
    head.load_state_dict(load_file(str(peft_dir / "head.safetensors")))
    with torch.no_grad():
        assert max_gap(head(backbone.model(x)), expected) > 1e-3  # the adapter matters: a real check
    peft_model = PeftModel.from_pretrained(library, str(peft_dir)).eval()
    files = load_file(str(peft_dir / "adapter_model.safetensors"))
    loaded = {n_.replace(".default", ""): p for n_, p in peft_model.named_parameters() if "lora_" in n_}
    assert len(loaded) == len(files) == 2 * 2 * 2  # q and v, A and B, 2 blocks: every tensor was picked up
    assert all(torch.equal(loaded[k], files[k]) for k in files)
    with torch.no_grad():
        got = head(backbone.model(x))  # the feature model now runs the PEFT-wrapped tower
    gap = max_gap(got, expected)
    log.warning("%s N=%d: PEFT model vs mosa_scale merged model: max |logit diff| = %.3e", family, n, gap)
    assert gap <= 1e-5


@pytest.mark.parametrize("family,n", LORA_CASES)
def test_folded_lora_saved_as_a_plain_model_gives_the_same_logits(tmp_path, family, n):
    mosa, merged = trained_adapter(
        tmp_path, family, AdapterConfig(method="lora", bottleneck=4, num_experts=n, share="none")
    )
    x = pixels()
    with torch.no_grad():
        expected = mosa(x)
    backbone = fresh_backbone(family)
    library = backbone.model.tower
    with torch.no_grad():
        assert max_gap(attach_head(merged)(backbone.model(x)), expected) > 1e-3  # the adapter matters
    before = {k: v.clone() for k, v in library.state_dict().items()}
    changed = fold_lora(library, merged)
    assert len(changed) == 4 and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    after = library.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == sorted(changed, key=list(before).index)
    library.save_pretrained(tmp_path / "plain")
    reloaded = type(library).from_pretrained(tmp_path / "plain", local_files_only=True).eval()
    assert not any("lora" in k or "mosa" in k for k in reloaded.state_dict())
    backbone.model.add_module(type(backbone.model).prefix, reloaded)  # the plain saved model, nothing else
    head = attach_head(merged)
    with torch.no_grad():
        gap = max_gap(head(backbone.model(x)), expected)
    log.warning("%s N=%d: folded + save_pretrained model vs merged model: max |logit diff| = %.3e", family, n, gap)
    assert gap <= 1e-5


def attach_head(merged) -> torch.nn.Linear:
    state = load_file(str(merged / "adapter.safetensors"))
    w, b = state["mosa_head.weight"], state["mosa_head.bias"]
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head


def test_openclip_lora_folds_into_the_fused_in_projection(tmp_path):
    mosa, merged = trained_adapter(
        tmp_path, "openclip", AdapterConfig(method="lora", bottleneck=4, num_experts=4, share="none")
    )
    x = pixels()
    with torch.no_grad():
        expected = mosa(x)
    backbone = fresh_backbone("openclip")
    changed = fold_lora(backbone.model.tower, merged)  # the OpenCLIP VisionTransformer itself
    assert changed == [f"transformer.resblocks.{i}.attn.in_proj_weight[{s}]" for i in range(2) for s in "qv"]
    save_file(backbone.model.tower.state_dict(), str(tmp_path / "visual.safetensors"))  # a plain state dict
    plain = fresh_backbone("openclip")
    plain.model.tower.load_state_dict(load_file(str(tmp_path / "visual.safetensors")))
    with torch.no_grad():
        gap = max_gap(attach_head(merged)(plain.model(x)), expected)
    log.warning("openclip MoSA-LoRA folded: max |logit diff| = %.3e", gap)
    assert gap <= 1e-5
    with pytest.raises(ValueError, match="fold_lora"):
        export_peft(merged, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())


# ---------------------------------------------------------------------------- attach_merged_adapter
ATTACH_CASES = [
    ("parallel", "openclip", "feature"),
    ("parallel", "openclip", "library"),
    ("houlsby", "openclip", "feature"),
    ("parallel", "hf-vit", "library"),
    ("sequential", "hf-clip", "feature"),
    ("lora", "hf-vit", "feature"),
]


@pytest.mark.parametrize("method,family,root", ATTACH_CASES)
def test_attach_merged_adapter_into_an_unmodified_backbone(tmp_path, method, family, root):
    mosa, merged = trained_adapter(
        tmp_path, family, AdapterConfig(method=method, bottleneck=8, num_experts=4, share="none")
    )
    x = pixels()
    with torch.no_grad():
        expected = mosa(x)
    backbone = fresh_backbone(family)
    with torch.no_grad():
        assert max_gap(attach_head(merged)(backbone.model(x)), expected) > 1e-3  # the adapter matters
    target = backbone.model if root == "feature" else backbone.model.tower
    head = attach_merged_adapter(target, merged)
    assert not any(n.endswith(("slices", "assign")) for n, _ in target.named_buffers())  # dense: no MoSA code
    assert not [m for m in target.modules() if type(m).__name__ == "SparseExpertLinear"]
    backbone.model.eval()
    with torch.no_grad():
        gap = max_gap(head(backbone.model(x)), expected)
    log.warning("attach %s on %s (%s root): max |logit diff| = %.3e", method, family, root, gap)
    assert gap <= 1e-5


def test_attach_refuses_another_backbone_and_unmerged_states(tmp_path):
    mosa, merged = trained_adapter(
        tmp_path, "hf-clip", AdapterConfig(method="parallel", bottleneck=8, num_experts=2), steps=1
    )
    with pytest.raises(ValueError, match="has no module"):
        attach_merged_adapter(fresh_backbone("openclip").model, merged)
    write_adapter(
        tmp_path / "unmerged", adapter_state_dict(mosa), json.loads((merged / "adapter_config.json").read_text())
    )
    with pytest.raises(ValueError, match="unmerged MoSA state"):
        attach_merged_adapter(fresh_backbone("hf-clip").model, tmp_path / "unmerged")
    with pytest.raises(ValueError, match="attach_merged_adapter"):
        export_peft(merged, tmp_path / "peft")
