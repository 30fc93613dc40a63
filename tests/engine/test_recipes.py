"""The shipped run configs load, the benchmark recipes are the authors' recipe (MOSA_SPEC section 7),
and the cluster launch files (hostfile example, SLURM script) do what they say."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from launch_util import REPO
from webdataset.shardlists import expand_urls

from mosa_scale.config.run import load_run_config

CONFIGS = REPO / "launchers" / "configs"
RECIPES = CONFIGS / "recipes"
DIGITS = CONFIGS / "digits_default.yaml"
SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
HOSTFILE = REPO / "launchers" / "hostfile.example"

VTAB_CLASSES = {
    "cifar100": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_distance": 6,
    "dmlab": 6,
    "kitti_distance": 4,
    "dsprites_location": 16,
    "dsprites_orientation": 16,
    "smallnorb_azimuth": 18,
    "smallnorb_elevation": 9,
}
# recipe: (lr, r, N, share, classes, train images, val images); the image counts are the make_shards
# split of the source folder named in each file's header (VTAB-1k: 800 train / 200 val of 1,000).
SPEC = {
    "cub": (1e-3, 64, 4, "down", 200, 5395, 599),
    "nabirds": (5e-4, 64, 4, "down", 555, 21536, 2393),
    "oxford_flowers": (5e-3, 64, 4, "down", 102, 1020, 1020),
    "stanford_dogs": (5e-4, 64, 4, "down", 120, 10800, 1200),
    "stanford_cars": (5e-3, 64, 2, "up", 196, 7330, 814),
    "fgvc_aircraft": (5e-3, 64, 4, "down", 100, 3334, 3333),
    "cifar100": (5e-4, 64, 4, "down", 100, 45000, 5000),
    "food101": (5e-4, 64, 4, "down", 101, 68175, 7575),
    **{f"vtab_{task}": (5e-3, 16, 4, "down", k, 800, 200) for task, k in VTAB_CLASSES.items()},
}
# recipe folder: (family, OpenCLIP name, tower precision, ZeRO file, gradient checkpointing)
BACKBONES = {
    "vit_b16": ("hf-vit", None, "fp32", "ds_configs/zero2.json", False),
    "vit_h14": ("openclip", "ViT-H-14", "bf16", "ds_configs/zero2.json", False),
    "vit_g14": ("openclip", "ViT-g-14", "bf16", "ds_configs/zero3.json", True),
    "vit_bigg14": ("openclip", "ViT-bigG-14", "bf16", "ds_configs/zero3.json", True),
}
ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))
RECIPE_IDS = [str(p.relative_to(RECIPES)) for p in ALL_RECIPES]


def test_every_config_is_a_known_recipe():
    run_configs = [p for p in CONFIGS.rglob("*.yaml") if "sweeps" not in p.relative_to(CONFIGS).parts]
    assert sorted(run_configs) == sorted([DIGITS, *ALL_RECIPES])  # sweeps/ holds sweep specs, not runs
    assert {p.stem for p in (RECIPES / "vit_b16").glob("*.yaml")} == set(SPEC)  # the full ViT-B/16 table
    assert {p.parent.name for p in ALL_RECIPES} == set(BACKBONES)
    for scaled in ("vit_h14", "vit_g14", "vit_bigg14"):
        assert {"cub", "vtab_cifar100"} <= {p.stem for p in (RECIPES / scaled).glob("*.yaml")}


def test_digits_default_loads_on_two_ranks():
    cfg = load_run_config(DIGITS, [], world_size=2)
    assert cfg.data.train == "builtin:digits" and cfg.accumulation(2) == 1


@pytest.mark.parametrize("path", ALL_RECIPES, ids=RECIPE_IDS)
def test_recipe_is_the_authors_recipe(path: Path):
    # /data/... and /models/... do not exist here: the launcher's check of those files is off
    cfg = load_run_config(path, [], world_size=8, check_files=False)
    lr, r, n, share, classes, n_train, n_val = SPEC[path.stem]
    a, o, t, d = cfg.adapter, cfg.optim, cfg.train, cfg.data
    assert (o.lr, a.bottleneck, a.num_experts, a.share, d.num_classes) == (lr, r, n, share, classes)
    assert (a.method, a.mode, a.experts_per_block, a.mosa_blocks) == ("parallel", "all", {}, None)
    assert (o.betas, o.eps, o.weight_decay, o.min_lr_ratio, o.clip_grad) == ((0.9, 0.999), 1e-6, 0.01, 0.0, 0.0)
    assert o.inactive == "coast"  # the authors' PyTorch 1.11 update semantics
    assert t.seed == 3407 and not hasattr(a, "seed")
    assert cfg.consistency.enabled and cfg.consistency.weight == 1.0
    # 100 epochs of batch 128 over the train split, 10 of them warm-up, evaluated every 10 epochs
    per_epoch = math.ceil(n_train / 128)
    assert (t.global_batch, t.steps, o.warmup_steps) == (128, 100 * per_epoch, 10 * per_epoch)
    assert o.warmup_steps * 10 == t.steps and t.eval_every == o.warmup_steps
    assert f"ceil({n_train}/128) = {per_epoch} steps/epoch" in path.read_text()  # the header says it
    for world in (1, 2, 4, 8):  # one node of any size keeps the global batch through accumulation
        assert t.micro_batch * cfg.accumulation(world) * world == 128


@pytest.mark.parametrize("path", ALL_RECIPES, ids=RECIPE_IDS)
def test_recipe_selects_on_a_val_split(path: Path):
    d = load_run_config(path, [], world_size=8, check_files=False).data
    *_, n_train, n_val = SPEC[path.stem]
    root = f"/data/vtab/{path.stem[5:]}/" if path.stem.startswith("vtab_") else f"/data/{path.stem}/"
    train, val = expand_urls(d.train), expand_urls(d.val or "")
    assert d.val and d.val != d.train and not set(train) & set(val)
    assert all(u.startswith(root + "train-") for u in train) and all(u.startswith(root + "val-") for u in val)
    assert (len(train), len(val)) == (math.ceil(n_train / 1000), math.ceil(n_val / 1000))  # make_shards' default
    cfg = load_run_config(path, [], world_size=8, check_files=False)
    for p in (d.train, d.val, cfg.model.pretrained or "", cfg.train.run_dir):
        assert "test" not in p.lower(), p
    assert d.hflip is not path.stem.startswith("vtab_")  # VTAB-1k labels include orientations and positions


@pytest.mark.parametrize("path", ALL_RECIPES, ids=RECIPE_IDS)
def test_recipe_backbone_and_memory_layout(path: Path):
    cfg = load_run_config(path, [], world_size=8, check_files=False)
    family, name, precision, zero, ckpt = BACKBONES[path.parent.name]
    m, t = cfg.model, cfg.train
    assert (m.family, m.precision, t.zero_config, t.gradient_checkpointing) == (family, precision, zero, ckpt)
    assert t.precision == "fp32"  # adapters and head train in fp32 whatever the tower dtype
    if name is None:
        assert m.pretrained == "/models/vit-base-patch16-224-in21k"  # the authors' ImageNet-21k weights
    else:
        assert m.name == name and m.pretrained
    assert t.run_dir == f"runs/{path.parent.name}/{path.stem}"


def test_hostfile_example_parses_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(HOSTFILE))) == {"node1": 8, "node2": 8}


def test_sbatch_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_sbatch_builds_hostfile_and_launches_deepspeed(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", '[ "$1 $2 $3" = "show hostnames gpu-[7-8]" ] && printf "gpu-7\\ngpu-8\\n"\n')
    _stub(bin_dir / "deepspeed", 'printf "%s\\n" "$@" > "$SLURM_SUBMIT_DIR/argv"\n')
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_NODELIST": "gpu-[7-8]",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "SLURM_GPUS_ON_NODE": "4",
    }
    proc = subprocess.run(
        ["bash", str(SBATCH), "cfg.yaml", "train.steps=5"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    hostfile = tmp_path / "mosa-hostfile.4242"
    assert hostfile.read_text() == "gpu-7 slots=4\ngpu-8 slots=4\n"
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == [
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "gpu-7",
        "--master_port",
        str(20000 + 4242),
        "launchers/train.py",
        "--config",
        "cfg.yaml",
        "train.steps=5",
    ]


def test_sbatch_without_config_prints_usage(tmp_path: Path):
    proc = subprocess.run(
        ["bash", str(SBATCH)], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert proc.returncode != 0 and "usage: sbatch launchers/slurm/train.sbatch CONFIG.yaml" in proc.stderr
