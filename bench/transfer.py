"""A small real transfer study on 2 CPU cores (about 30 minutes; prints JSON).

1. Pretrain a small ViT (``transformers.ViTModel``, 28 px, 1 channel) from scratch in plain
   torch on Fashion-MNIST classes 0-4 (the Debian package ``dataset-fashion-mnist``), and save
   it with ``save_pretrained``.
2. Adapt the frozen tower through mosa_scale (``build_model``: backbone ``hf-vit`` from that
   directory, injected adapters, linear head; single process, no DeepSpeed) with 1000 labelled
   samples to two new tasks:
   * ``fmnist_5-9``: Fashion-MNIST classes 5-9 (200 per class; test: all 5000 test images),
   * ``digits``: scikit-learn's 8x8 digits upsampled to 28 px (100 per class; test: the other 797),
   comparing MoSA (parallel, N 4, share down), the dense adapter (N 1), LoRA, MoSA-LoRA (N 4,
   share down: A dense, B split) and a linear probe, over 5 seeds (the seed picks the labelled
   subset, the initialisation, the partition and the routing). Evaluation uses merged weights.
3. Reports mean and standard deviation of top-1 per task and method.

All methods use the same recipe (MOSA_SPEC section 7, VTAB-1k style): r 16, AdamW lr 5e-3, wd
0.01, eps 1e-6, 10% warm-up then cosine, batch 64; consistency regularisation is off (it doubles
the step cost; ``--consistency`` turns it on for the MoSA variants).

    python bench/transfer.py [--seeds 5] [--pretrain-epochs 5] [--steps 300] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.adapters import AdapterConfig
from mosa_scale.backbones import BackboneConfig
from mosa_scale.config.run import RunConfig, TrainConfig
from mosa_scale.data import load_builtin
from mosa_scale.loss import consistency_loss
from mosa_scale.model.assembly import build_model
from mosa_scale.optim import MoSAAdamW
from mosa_scale.sparse import Router

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics
TOWER = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, image_size=28,
             patch_size=7, num_channels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
METHODS = {  # name -> AdapterConfig overrides (seed added per run)
    "mosa": dict(method="parallel", num_experts=4, share="down"),
    "adapter": dict(method="parallel", num_experts=1),
    "lora": dict(method="lora", num_experts=1),
    "mosa_lora": dict(method="lora", num_experts=4, share="down"),
    "linear_probe": dict(method="parallel", num_experts=1, blocks=()),  # no adapter: head only
}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, 28, 28)."""
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def stratified(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return rng.permutation(np.concatenate(picks))


def load_tasks() -> tuple[dict, dict]:
    """Pretraining data (classes 0-4) and the two transfer tasks (full pools; subsets per seed)."""
    fm = load_builtin("fashion-mnist")
    x, y = fm.images, fm.labels
    train, test = slice(0, 60000), slice(60000, 70000)
    lo_tr, lo_te = y[train] < 5, y[test] < 5
    pre = {"train": (to_tensor(x[train][lo_tr]), torch.from_numpy(y[train][lo_tr])),
           "test": (to_tensor(x[test][lo_te]), torch.from_numpy(y[test][lo_te]))}
    digits = load_builtin("digits")
    tasks = {
        "fmnist_5-9": {"pool": (x[train][~lo_tr], y[train][~lo_tr] - 5), "test": (x[test][~lo_te], y[test][~lo_te] - 5),
                       "per_class": 200},
        "digits": {"pool": (digits.images, digits.labels), "test": None, "per_class": 100},
    }
    return pre, tasks


def task_split(task: dict, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    px, py = task["pool"]
    idx = stratified(py, task["per_class"], seed)
    train = (to_tensor(px[idx]), torch.from_numpy(py[idx]))
    if task["test"] is None:  # digits: the samples not drawn for training
        rest = np.setdiff1d(np.arange(len(py)), idx)
        return train, (to_tensor(px[rest]), torch.from_numpy(py[rest]))
    tx, ty = task["test"]
    return train, (to_tensor(tx), torch.from_numpy(ty))


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Pretrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.vit = ViTModel(ViTConfig(**TOWER), add_pooling_layer=False)
        self.head = nn.Linear(TOWER["hidden_size"], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 5)
        h = self.vit(pixel_values=x).last_hidden_state  # (B, 1 + 16, D)
        return self.head(h[:, 1:].mean(1))  # mean of patch tokens, as the adapted backbone pools


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def pretrain(data: dict, out_dir: Path, *, epochs: int, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Pretrain()
    x, y = data["train"]
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, steps // 20))
    g = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)  # (B, 1, 28, 28)
            loss = F.cross_entropy(model(xb), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
    model.vit.save_pretrained(str(out_dir))
    return {"epochs": epochs, "steps": step, "seconds": time.perf_counter() - t0,
            "test_top1_classes_0-4": accuracy(model, *data["test"])}


def adapt(pretrained: Path, method: str, train: tuple, test: tuple, *, seed: int, steps: int, batch: int,
          lr: float, consistency: bool) -> float:
    torch.manual_seed(seed)
    adapter = AdapterConfig(bottleneck=16, seed=seed, **METHODS[method])
    cfg = RunConfig(model=BackboneConfig(family="hf-vit", pretrained=str(pretrained), pooling="mean"),
                    adapter=adapter, train=TrainConfig(seed=seed))
    router = Router(seed)
    model, _, _ = build_model(cfg, router, num_classes=int(train[1].max()) + 1)
    opt = MoSAAdamW.for_model(model, router=router, weight_decay=0.01, lr=lr, eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, steps // 10))
    x, y = train
    g = torch.Generator().manual_seed(seed)
    two = consistency and adapter.num_experts > 1
    model.train()
    perm, pos = torch.randperm(len(x), generator=g), 0
    for step in range(steps):
        if pos + batch > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        router.begin_step(step, passes=2 if two else 1)
        with router.forward_pass(0, 0):
            logits = model(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        if two:  # a second pass with fresh experts (MOSA_SPEC section 6)
            with router.forward_pass(0, 1):
                logits2 = model(x[idx])
            loss = loss + consistency_loss(logits, logits2, weight=1.0)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return accuracy(model, *test)  # eval mode: merged weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300, help="adaptation steps per run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--consistency", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here (rewritten after every run)")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    pre_data, tasks = load_tasks()
    result: dict = {"bench": "transfer", "tower": TOWER, "threads": torch.get_num_threads(),
                    "recipe": {"bottleneck": 16, "lr": args.lr, "weight_decay": 0.01, "batch": args.batch,
                               "steps": args.steps, "labelled": 1000, "consistency": args.consistency},
                    "runs": [], "table": {}}

    def dump() -> None:
        result["seconds"] = time.perf_counter() - t0
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        result["pretrain"] = pretrain(pre_data, Path(tmp), epochs=args.pretrain_epochs, batch=128, seed=0)
        dump()
        for task_name, task in tasks.items():
            for seed in range(args.seeds):
                train, test = task_split(task, seed)
                for method in args.methods.split(","):
                    t1 = time.perf_counter()
                    top1 = adapt(Path(tmp), method, train, test, seed=seed, steps=args.steps, batch=args.batch,
                                 lr=args.lr, consistency=args.consistency)
                    result["runs"].append({"task": task_name, "method": method, "seed": seed, "top1": top1,
                                           "seconds": time.perf_counter() - t1, "test_samples": len(test[1])})
                    dump()
    for task_name in tasks:
        result["table"][task_name] = {}
        for method in args.methods.split(","):
            accs = [r["top1"] for r in result["runs"] if r["task"] == task_name and r["method"] == method]
            result["table"][task_name][method] = {"mean": statistics.fmean(accs),
                                                  "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                                  "n": len(accs)}
    dump()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
