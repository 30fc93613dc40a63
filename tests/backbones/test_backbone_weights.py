"""Checkpoints read tensor by tensor: readers, every layout, and errors that name tensor and file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from tiny_towers import TOWERS
from torch import nn

from mosa_scale.backbones import build_backbone
from mosa_scale.backbones.construct import construct_in_dtype
from mosa_scale.backbones.hf import load_hf_weights
from mosa_scale.backbones.timm_towers import TIMM_KWARGS, timm_create_kwargs
from mosa_scale.backbones.weights import WeightsError, open_checkpoint


def _sharded(sd: dict, d: Path, stem: str = "open_clip_model", parts: int = 3) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    keys, weight_map = sorted(sd), {}
    for i in range(parts):
        name = f"{stem}-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: sd[k].contiguous() for k in keys[i::parts]}
        save_file(chunk, str(d / name))
        weight_map.update(dict.fromkeys(chunk, name))
    (d / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def _full(kind: str, seed: int = 4) -> nn.Module:
    """The full OpenCLIP model (image and text towers) of a tiny tower, random."""
    from mosa_scale.backbones.openclip import openclip_model_cfg

    mc = openclip_model_cfg(TOWERS[kind])
    custom = bool(mc.pop("custom_text", False))
    torch.manual_seed(seed)
    with timm_create_kwargs(mc["vision_cfg"]):
        mc["vision_cfg"] = {k: v for k, v in mc["vision_cfg"].items() if k != TIMM_KWARGS}
        return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**mc).eval()


def test_readers_read_exactly_the_asked_elements(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(13, generator=g),
        "c": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
        "s": torch.tensor(2.5),
    }
    save_file(sd, str(tmp_path / "one.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    readers = [
        open_checkpoint(tmp_path / "one.safetensors"),
        open_checkpoint(tmp_path / "wrapped.pt"),
        open_checkpoint(_sharded(sd, tmp_path / "sh", "model", 2) / "model.safetensors.index.json"),
    ]
    for r in readers:
        assert sorted(r.keys()) == sorted(sd)
        for k, v in sd.items():
            assert r.shape(k) == tuple(v.shape) and torch.equal(r.read(k), v)
            flat = v.reshape(-1)
            for start, count in ((0, flat.numel()), (3, 4), (flat.numel() - 1, 1), (2, 0)):
                if start + count <= flat.numel():
                    assert torch.equal(r.read_flat(k, start, count).reshape(-1), flat[start : start + count])
        r.close()
    assert readers[2].file_of("b").endswith(".safetensors") and "of-00002" in readers[2].file_of("b")


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        open_checkpoint(tmp_path / "nope.safetensors")
    d = _sharded({"a": torch.ones(2), "b": torch.ones(3)}, tmp_path / "sh", "model", 2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        open_checkpoint(d / "model.safetensors.index.json")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        open_checkpoint(tmp_path / "bad.safetensors")
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        open_checkpoint(tmp_path / "x.npz")


def test_truncated_or_inconsistent_safetensors_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(64), "b": torch.arange(32.0)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-16])  # the last tensor's tail is missing
    with pytest.raises(WeightsError, match=r"cut\.safetensors: tensor 'b' .* truncated or corrupted"):
        open_checkpoint(tmp_path / "cut.safetensors")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["a"]["shape"] = [65]  # the shape no longer matches the byte range
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (tmp_path / "shape.safetensors").write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(WeightsError, match=r"tensor 'a' \(F32 \[65\], 260 bytes\)"):
        open_checkpoint(tmp_path / "shape.safetensors")


# Reads every element of a 64 MiB tensor through a reader and prints how much of the file stayed
# mapped in the process (RssFile growth): a memory map would keep every page read resident.
_RESIDENT_CHILD = r"""
import sys
from mosa_scale.backbones.weights import open_checkpoint
def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
r = open_checkpoint(sys.argv[1])
before = rss_file()
for start in range(0, 16 << 20, 1 << 20):  # this rank's part, a piece at a time, copied as loading does
    part = r.read_flat("w", start, 1 << 20).clone()
    del part
whole = r.read("w").clone()
del whole
print(rss_file() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_reading_leaves_no_file_pages_resident(tmp_path: Path, name: str) -> None:
    import subprocess
    import sys

    w = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    if name.endswith(".safetensors"):
        save_file({"w": w}, str(tmp_path / name))
    else:
        torch.save({"w": w}, tmp_path / name)
    out = subprocess.run(
        [sys.executable, "-c", _RESIDENT_CHILD, str(tmp_path / name)], capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip()) < 4 << 20  # of 64 MiB read twice


@pytest.mark.parametrize("kind", ["openclip", "siglip", "eva02", "eva02-e"])
@pytest.mark.parametrize("layout", ["full.pt", "sharded"])
def test_openclip_layouts_equal_the_library_model(kind: str, layout: str, tmp_path: Path, pixels: torch.Tensor) -> None:
    full = _full(kind)
    sd = full.state_dict()
    if layout == "full.pt":
        torch.save(sd, tmp_path / "full.pt")
        target = tmp_path / "full.pt"
    else:
        target = _sharded(sd, tmp_path / "dir")
    bb = build_backbone(dataclasses.replace(TOWERS[kind], pretrained=str(target)))
    bb.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(pixels), full.encode_image(pixels), rtol=0, atol=0)
    n_visual = sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("visual."))
    assert bb.loaded["bytes_read"] == n_visual  # the text tower is never read
    low = build_backbone(dataclasses.replace(TOWERS[kind], pretrained=str(target), precision="bf16"))
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    for name, p in low.model.named_parameters():  # loaded straight into bf16: the rounded checkpoint
        assert torch.equal(p, sd[name].to(torch.bfloat16)), name


def test_timm_pos_embed_is_resampled_to_the_built_grid(tmp_path: Path) -> None:
    full = _full("eva02")
    torch.save(full.state_dict(), tmp_path / "m.pt")
    bb = build_backbone(dataclasses.replace(TOWERS["eva02"], pretrained=str(tmp_path / "m.pt"), image_size=48))
    assert bb.model.visual.trunk.pos_embed.shape == (1, 37, 64)
    assert bb.model(torch.randn(1, 3, 48, 48)).shape == (1, bb.width)


def test_missing_mismatched_and_unexpected_tensors_name_tensor_and_file(tmp_path: Path) -> None:
    sd = _full("openclip").state_dict()
    cfg = TOWERS["openclip"]
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.mlp.c_fc.weight"}
    d = _sharded(missing, tmp_path / "missing")
    with pytest.raises(WeightsError) as ei:
        build_backbone(dataclasses.replace(cfg, pretrained=str(d)))
    assert "'visual.transformer.resblocks.1.mlp.c_fc.weight'" in str(ei.value)
    assert "open_clip_model.safetensors.index.json" in str(ei.value) and "missing" in str(ei.value)

    wrong = dict(sd, **{"visual.ln_post.weight": torch.ones(65)})
    d = _sharded(wrong, tmp_path / "wrong")
    shard_of = json.loads((d / "open_clip_model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(WeightsError) as ei:
        build_backbone(dataclasses.replace(cfg, pretrained=str(d)))
    msg = str(ei.value)
    assert "'visual.ln_post.weight'" in msg and shard_of["visual.ln_post.weight"] in msg
    assert "[65]" in msg and "[64]" in msg

    torch.save(dict(sd, **{"visual.extra.weight": torch.ones(2)}), tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"visual\.extra\.weight.*extra\.pt"):
        build_backbone(dataclasses.replace(cfg, pretrained=str(tmp_path / "extra.pt")))


@pytest.mark.parametrize("kind", ["hf-vit", "hf-clip"])
def test_hf_tensor_by_tensor_load_equals_from_pretrained(kind: str, tmp_path: Path) -> None:
    """The loader the sharded build uses, replicated here: transformers' legacy checkpoint names
    (``encoder.layer.0.attention.attention.query``) map to the tower's modules."""
    torch.manual_seed(3)
    ref = build_backbone(TOWERS[kind]).model.tower
    ref.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loaded = build_backbone(dataclasses.replace(TOWERS[kind], pretrained=str(tmp_path / "m"))).model.tower
    torch.manual_seed(9)
    fresh = build_backbone(TOWERS[kind]).model.tower
    stats = load_hf_weights(fresh, tmp_path / "m")
    assert stats["tensors"] == len(list(fresh.parameters())) + len(dict(fresh.named_buffers())) - sum(
        1 for m in fresh.modules() for b in m._non_persistent_buffers_set
    )
    for (n, a), (_, b) in zip(loaded.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    if kind == "hf-vit":  # the file really uses the legacy names
        names = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(".attention.attention.query." in k for k in names)


def test_directory_with_an_index_prefers_it_over_its_shards(tmp_path: Path) -> None:
    from mosa_scale.backbones.openclip import _checkpoint_in_dir

    _sharded({"visual.a": torch.ones(1), "visual.b": torch.ones(1)}, tmp_path, "weights", 2)
    assert _checkpoint_in_dir(tmp_path).endswith("weights.safetensors.index.json")


def test_construct_in_dtype_keeps_ties_and_casts_buffers() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.register_buffer("table", torch.arange(4.0) / 3)
            self.register_buffer("index", torch.arange(4))

    with construct_in_dtype(torch.bfloat16):
        m = Tied()
    assert m.a.weight is m.b.weight and len(list(m.parameters())) == 3
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.table.dtype == torch.bfloat16 and m.index.dtype == torch.int64
    assert torch.equal(m.table, (torch.arange(4.0) / 3).to(torch.bfloat16))  # computed in fp32, rounded once
    assert Tied().a.weight.dtype == torch.float32  # the hooks are gone after the context


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_bf16_construction_is_a_real_init(kind: str, pixels: torch.Tensor) -> None:
    """Initialised in bf16 directly (no fp32 copy), with the init's distribution intact
    (truncated normals computed in fp32: in bf16 they saturate at the bounds)."""
    torch.manual_seed(0)
    ref = dict(build_backbone(TOWERS[kind]).model.named_parameters())
    torch.manual_seed(0)
    low = build_backbone(TOWERS[kind], dtype=torch.bfloat16)
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    exact = 0
    for name, p in low.model.named_parameters():
        r, q = ref[name].detach(), p.detach().float()
        exact += torch.equal(q, r.to(torch.bfloat16).float())
        if r.numel() > 16 and r.std() > 0:
            assert abs(q.std() / r.std() - 1) < 0.05, name
            assert q.abs().max() <= 1.1 * r.abs().max(), name
        elif r.numel() > 1 and r.std() == 0:  # constant inits (norms, zero biases) are exact
            assert torch.equal(q, r.to(torch.bfloat16).float()), name
    assert exact >= 0.7 * len(ref)  # mostly the very same draws, rounded
    assert torch.isfinite(low.model(pixels)).all()
