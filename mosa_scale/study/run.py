"""One adaptation run of the transfer study: the frozen pretrained tower through mosa_scale
(``build_model``, ``MoSAAdamW``; single process, no DeepSpeed), trained on one split and
evaluated with merged weights on another."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mosa_scale.adapters import AdapterConfig
from mosa_scale.backbones import BackboneConfig
from mosa_scale.config.run import RunConfig, TrainConfig
from mosa_scale.loss import consistency_loss
from mosa_scale.model import build_model
from mosa_scale.optim import MoSAAdamW
from mosa_scale.sparse import Router
from mosa_scale.study.tasks import Split
from mosa_scale.study.tower import accuracy, cosine

FAMILIES = {  # family -> AdapterConfig overrides
    "adapter": dict(method="parallel"),
    "lora": dict(method="lora"),
    "linear_probe": dict(method="parallel", blocks=()),  # no adapter: head only
    "mosa": dict(method="parallel"),
    "mosa_lora": dict(method="lora"),
}
SPARSE = {"mosa": "adapter", "mosa_lora": "lora"}  # sparse family -> the dense method it splits
SEMANTICS = ("skip", "coast")
METHODS = ("adapter", "lora", "linear_probe", *(f"{f}-{s}" for f in SPARSE for s in SEMANTICS))


def parse_method(method: str) -> tuple[str, str | None]:
    """``mosa-coast`` -> (``mosa``, ``coast``); ``lora`` -> (``lora``, None).

    Raises:
        ValueError: not one of :data:`METHODS`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    family, _, semantics = method.partition("-")
    return family, semantics or None


@dataclass(frozen=True, order=True)
class Variant:
    """How a sparse method is split: N experts, the shared projection, consistency on or off.
    Dense methods have the single variant ``Variant(1, "none", False)``."""

    num_experts: int = 1
    share: str = "none"
    consistency: bool = False

    @property
    def tag(self) -> str:
        if self.num_experts == 1:
            return "dense"
        return f"n{self.num_experts}-{self.share}-c{int(self.consistency)}"

    def describe(self) -> str:
        if self.num_experts == 1:
            return "-"
        return f"N {self.num_experts}, share {self.share}, consistency {'on' if self.consistency else 'off'}"


DENSE = Variant()


@dataclass(frozen=True)
class RunSpec:
    """One run: what is trained, how long, on which seed, evaluated on which split.

    Attributes:
        task: Task name.
        method: One of :data:`METHODS`.
        variant: :class:`Variant` (``DENSE`` for a dense method).
        lr: Peak learning rate.
        steps: Optimizer steps (10% warm-up, then cosine).
        seed: Picks the labelled set, the initialisation, the partition, the routing, the batches.
        eval: ``val`` (train on the selection split's train part, evaluate on its validation
            part) or ``test`` (train on all labelled samples, evaluate on the test split).
        phase: Which phase first asked for it (not part of the id).
    """

    task: str
    method: str
    variant: Variant
    lr: float
    steps: int
    seed: int
    eval: Literal["val", "test"]
    phase: str = ""

    @property
    def id(self) -> str:
        """Deterministic id from everything that changes the result."""
        return f"{self.task}:{self.method}:{self.variant.tag}:lr{self.lr:g}:{self.steps}:s{self.seed}:{self.eval}"

    @property
    def family(self) -> str:
        return parse_method(self.method)[0]

    @property
    def inactive(self) -> str:
        return parse_method(self.method)[1] or "skip"  # dense methods have no slices: no difference

    @property
    def cost(self) -> float:
        """Relative compute (dense adapter step = 1): consistency doubles the forward and backward;
        a linear probe runs no backward through the tower."""
        per_step = 0.4 if self.family == "linear_probe" else 1.0
        return self.steps * per_step * (2.0 if self.variant.consistency and self.variant.num_experts > 1 else 1.0)

    def labels(self) -> dict[str, Any]:
        """The fields of a result row that name this run."""
        v = asdict(self.variant)
        return {
            "id": self.id,
            "phase": self.phase,
            "task": self.task,
            "method": self.method,
            **v,
            "lr": self.lr,
            "steps": self.steps,
            "seed": self.seed,
            "eval": self.eval,
        }


def train_and_evaluate(
    run: RunSpec,
    tower: Path,
    train: Split,
    evaluate: Split,
    *,
    batch: int = 64,
    bottleneck: int = 16,
    weight_decay: float = 0.01,
) -> dict[str, Any]:
    """Adapts the frozen tower in ``tower`` with ``run``'s method on ``train``; returns top-1 on
    ``evaluate`` (merged weights) with what else was measured.

    Recipe (MOSA_SPEC section 7, VTAB-1k style): AdamW (eps 1e-6, ``weight_decay``), 10% warm-up
    then cosine, ``batch`` samples per step drawn epoch by epoch.
    """
    t0 = time.perf_counter()
    torch.manual_seed(run.seed)
    v = run.variant
    extra = dict(num_experts=v.num_experts, share=v.share) if v.num_experts > 1 else dict(num_experts=1)
    adapter = AdapterConfig(bottleneck=bottleneck, **FAMILIES[run.family], **extra)
    cfg = RunConfig(
        model=BackboneConfig(family="hf-vit", pretrained=str(tower), pooling="mean"),
        adapter=adapter,
        train=TrainConfig(seed=run.seed),
    )
    router = Router(run.seed)
    model, _, _ = build_model(cfg, router, num_classes=int(train.y.max()) + 1)
    opt = MoSAAdamW.for_model(
        model, router=router, weight_decay=weight_decay, lr=run.lr, eps=1e-6, inactive=run.inactive
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, run.steps, max(1, run.steps // 10)))
    g = torch.Generator().manual_seed(run.seed)
    two = v.consistency and v.num_experts > 1
    model.train()
    perm, pos, losses = torch.randperm(len(train), generator=g), 0, []
    for step in range(run.steps):
        if pos + batch > len(train):  # a new epoch: a fresh order, the remainder dropped
            perm, pos = torch.randperm(len(train), generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        router.begin_step(step, passes=2 if two else 1)
        with router.forward_pass(0, 0):
            logits = model(train.x[idx])  # (B, C)
        loss = F.cross_entropy(logits, train.y[idx])
        if two:  # a second pass with fresh experts and dropout (MOSA_SPEC section 6)
            with router.forward_pass(0, 1):
                logits2 = model(train.x[idx])
            loss = loss + consistency_loss(logits, logits2, weight=1.0)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - t0
    top1 = accuracy(model, evaluate)  # eval mode: merged weights
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "top1": top1,
        "train_samples": len(train),
        "eval_samples": len(evaluate),
        "final_loss": sum(tail) / len(tail),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
