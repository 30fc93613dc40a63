"""The training run: build everything once, then a plain loop of optimizer steps."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from mosa_scale.backbones import enable_gradient_checkpointing
from mosa_scale.ckpt import adapter_state_dict, merge_state_dict, write_adapter
from mosa_scale.ckpt.manifest import MANIFEST_NAME
from mosa_scale.ckpt.safe_load import CheckpointError
from mosa_scale.ckpt.zero_reader import refuse_legacy_layout
from mosa_scale.config.loader import to_plain
from mosa_scale.config.run import RunConfig
from mosa_scale.data import IGNORE_INDEX, DataError, build_loader, prepare_data
from mosa_scale.engine import checkpoint as ckpt
from mosa_scale.engine.agree import on_rank0
from mosa_scale.engine.deepspeed_engine import (
    all_reduce_sum,
    barrier,
    deepspeed_config,
    full_fp32_params,
    init_distributed,
    initialize,
    tower_shard,
)
from mosa_scale.eval import evaluate
from mosa_scale.loop.metrics import MetricLogger
from mosa_scale.loop.rundir import RunDirError, RunLock
from mosa_scale.loss import HiddenCapture, consistency_loss
from mosa_scale.model.assembly import build_model
from mosa_scale.model.flops import peak_flops, step_flops, throughput_metrics
from mosa_scale.optim import MoSAAdamW, sparse_layers, warmup_cosine
from mosa_scale.sparse import Router
from mosa_scale.sparse.routing import PROBE_PASS

log = logging.getLogger(__name__)


class Trainer:
    """One training run in ``train.run_dir``; resumes from ``checkpoints/latest`` when present."""

    def __init__(self, cfg: RunConfig) -> None:
        init_distributed()
        import torch.distributed as dist

        self.cfg, self.rank, self.world = cfg, dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.train.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # before anything is built or written: one run per directory, and a checkpoint to resume
        # from is known and every file of it verified (all ranks refuse alike, none waits)
        self.lock = on_rank0(lambda: RunLock.acquire(self.run_dir), errors=(RunDirError,))
        self.resume_from = on_rank0(lambda: ckpt.resume_tag(self.ckpt_dir), errors=(CheckpointError,), share=True)
        if self.resume_from is not None:
            if not (self.ckpt_dir / self.resume_from / MANIFEST_NAME).is_file():
                refuse_legacy_layout(self.ckpt_dir / self.resume_from)  # older than manifests: say what it is
            ckpt.verify(self.ckpt_dir, self.resume_from)
        self.gas = cfg.accumulation(self.world)
        self.passes = 2 if cfg.consistency.enabled else 1
        torch.manual_seed(cfg.train.seed * 1000 + self.rank)  # dropout differs per rank, replayable
        self.train_spec, self.val_spec, self.num_classes = prepare_data(
            cfg.data, self.run_dir, self.rank, seed=cfg.train.seed, wait=barrier
        )
        self.router = Router(cfg.train.seed, cfg.routing.scope, self.rank, self.world)
        ds_config = deepspeed_config(cfg, self.world)
        # ZeRO-3: the tower is partitioned as it is built, no rank ever holds all of it
        model, self.backbone, self.report = build_model(
            cfg, self.router, num_classes=self.num_classes, shard=tower_shard(ds_config)
        )
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.backbone, self.router.checkpoint)
        o = cfg.optim
        self.optimizer = MoSAAdamW.for_model(
            model,
            router=self.router,
            weight_decay=o.weight_decay,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            inactive=o.inactive,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, warmup=o.warmup_steps, total=cfg.train.steps, min_ratio=o.min_lr_ratio),
        )
        self.engine = initialize(model, self.optimizer, sched, ds_config)
        self.device = self.engine.device
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.sparse = sparse_layers(model)
        self.flops = step_flops(
            model,
            self.backbone,
            image_size=cfg.data.image_size or self.backbone.image.size,
            global_batch=cfg.train.global_batch,
            consistency=cfg.consistency.enabled,
        )
        # most FLOPs run in the frozen tower, so its precision sets the peak when training is fp32
        self.peak_flops = peak_flops(
            self.device, cfg.model.precision if cfg.train.precision == "fp32" else cfg.train.precision
        )
        self.metrics = MetricLogger(self.run_dir, self.rank)
        self.step, self.epoch, self.data_state, self.bad_in_row, self.bad_total = 0, 0, None, 0, 0
        self.skipped = {"corrupt": 0, "missing": 0, "bad_shards": 0, "extra": 0}  # this rank's, whole run
        self.valid, self.epoch_valid = 0, 0  # this rank's valid samples: whole run, this epoch
        self.last_eval: dict[str, float] = {}
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
            log.info("%s", self.report.format())
            log.info(
                "FLOPs per sample: %.3g (frozen forward %.3g, frozen backward %.3g, trainable %.3g)",
                self.flops["per_sample"],
                self.flops["forward_frozen"],
                self.flops["backward_frozen"],
                self.flops["forward_trainable"] + self.flops["backward_trainable"],
            )

    # ---------------------------------------------------------------- data
    def _loader(self, *, train: bool, epoch: int, resume: dict | None = None):
        img = self.backbone.image
        spec = self.train_spec if train else self.val_spec
        return build_loader(
            spec,
            image_size=self.cfg.data.image_size or img.size,
            mean=img.mean,
            std=img.std,
            train=train,
            batch_size=self.cfg.train.micro_batch,
            rank=self.rank,
            world_size=self.world,
            num_workers=self.cfg.data.workers,
            seed=self.cfg.train.seed,
            epoch=epoch,
            resampled=self.cfg.data.resampled and train,
            resume=resume,
            num_classes=self.num_classes,
        )

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Training batches across epochs; ``self.data_state`` is the position after the last one."""
        resume = self.data_state
        while True:
            loader = self._loader(train=True, epoch=self.epoch, resume=resume)
            resume = None
            for batch in loader:
                self.data_state = loader.state_dict()
                for k, v in batch["skipped"].items():
                    self.skipped[k] = self.skipped.get(k, 0) + v
                n = int(batch["valid"].sum())
                self.valid, self.epoch_valid = self.valid + n, self.epoch_valid + n
                yield batch
            # every rank ends the epoch at the same batch: the sums line up
            epoch_valid, valid, corrupt, missing = all_reduce_sum(
                [
                    float(self.epoch_valid),
                    float(self.valid),
                    float(self.skipped["corrupt"]),
                    float(self.skipped["missing"]),
                ]
            )
            if epoch_valid == 0:
                raise DataError(
                    f"epoch {self.epoch} gave no valid sample on any of the {self.world} rank(s) (data."
                    f"train={self.cfg.data.train!r}, {len(loader.shards.urls)} shard(s); this rank skipped "
                    f"{self.skipped}): the shards are empty, unreadable or every label is outside "
                    f"[0, {self.num_classes}); see the warnings above"
                )
            self._check_losses(valid, corrupt, missing, judge=True)
            self.epoch += 1
            self.data_state, self.epoch_valid = None, 0

    def _check_losses(self, valid: float, corrupt: float, missing: float, *, judge: bool) -> None:
        """Stops the run (every rank alike: the counts are all ranks' sums) when the share of lost
        samples passes ``data.max_skip_rate``; early in a run a few bad samples are a large share,
        so it is judged at epoch ends (``judge``), and at log steps once 10 global batches were read."""
        lost, limit = corrupt + missing, self.cfg.data.max_skip_rate
        if (judge or valid + lost >= 10 * self.cfg.train.global_batch) and lost > limit * (valid + lost):
            raise DataError(
                f"{lost:.0f} of {valid + lost:.0f} samples read so far were lost ({corrupt:.0f} corrupt "
                f"or out-of-range labels, {missing:.0f} missing from truncated shards), more than data."
                f"max_skip_rate={limit}; see the warnings above for the shards and keys, fix the data or "
                "raise data.max_skip_rate"
            )

    # ---------------------------------------------------------------- step
    def _forward_loss(self, batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.consistency
        x = batch["image"].to(self.device)
        y = batch["label"].to(self.device)
        valid = y != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        blocks = [self.backbone.model.get_submodule(s.block) for s in self.backbone.sites[: c.hidden_blocks]]
        capture = HiddenCapture(blocks) if c.enabled and c.hidden_blocks else None
        with self.router.forward_pass(micro, 0):
            logits = self.engine(x)  # (B, C)
        hidden1 = capture.take() if capture else []
        # mean over real samples only; an all-padding micro-batch contributes zero
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid
        parts = {"loss/ce": loss.detach()}
        if c.enabled:
            with self.router.forward_pass(micro, 1):  # fresh experts (and dropout) for the second pass
                logits2 = self.engine(x)
            hidden2 = capture.take() if capture else []
            if valid.any():  # an all-padding micro-batch (end of epoch) has nothing to compare
                terms = consistency_loss(
                    logits[valid],
                    logits2[valid],
                    y[valid],
                    weight=c.weight,
                    hidden1=hidden1,
                    hidden2=hidden2,
                    hidden_weight=c.hidden_weight,
                    second_ce=c.second_ce,
                )
                loss = loss + terms["total"]
                parts["loss/consistency"] = terms["kl"].detach()
            else:
                loss = loss + 0.0 * logits2.sum()  # same graph on every rank
                parts["loss/consistency"] = torch.zeros(())
        if capture:
            capture.remove()
        return loss, {k: float(v) for k, v in parts.items()}

    def train_step(self, batches: Iterator[dict[str, Any]], *, log: bool = True) -> dict[str, float]:
        """One optimizer step: ``gas`` micro-batches, each forward (one or two passes) and backward.
        The metrics that need all ranks' counts (data skips, and the skip-rate check on them) are
        gathered only when ``log`` is set: one all-reduce per logged step, none otherwise."""
        window = self.router.begin_step(self.step, micro_batches=self.gas, passes=self.passes)
        t0, data_time, sums, bad = time.perf_counter(), 0.0, {}, False
        for micro in range(self.gas):
            td = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - td
            loss, parts = self._forward_loss(batch, micro)
            # every rank must agree on skipping, or ZeRO's collectives would diverge
            bad = bad or all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0
            self.engine.backward(loss)
            self.optimizer.skip_all = bad  # a non-finite window changes no value, moment or count
            self.engine.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / self.gas
        self.optimizer.skip_all = False
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        self.bad_total += int(bad)
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_in_row} optimizer steps in a row had a non-finite loss "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); lower optim.lr or check data"
            )
        step_time = time.perf_counter() - t0
        out = {
            **sums,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time/step_s": step_time,
            "time/data_s": data_time,
            "throughput/samples_per_s": self.cfg.train.global_batch / step_time,
            "train/nonfinite_steps": self.bad_total,
            "memory/peak_mb": peak_memory_mb(),
        }
        out.update(throughput_metrics(self.flops, step_time_s=step_time, world_size=self.world, peak=self.peak_flops))
        counts = window.counts
        for name, layer in self.sparse.items():
            for k in range(layer.num_experts):
                out[f"experts/{name}/{k}"] = float(counts[layer.route_id, k])
        if not log:
            return out
        *totals, valid = all_reduce_sum([*(float(v) for v in self.skipped.values()), float(self.valid)])  # all ranks'
        for k, v in zip(self.skipped, totals):
            out[f"data/skipped_{k}"] = v
        self._check_losses(valid, out["data/skipped_corrupt"], out["data/skipped_missing"], judge=False)
        return out

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """Top-1 of the merged model over the validation shards (all ranks), and on the first batch
        the gap between the merged model and one stochastic training-mode pass."""
        if self.val_spec is None:
            return {}
        self.engine.module.eval()
        result = evaluate(
            self.engine,
            self._loader(train=False, epoch=0),
            num_classes=self.num_classes,
            device=self.device,
            max_batches=self.cfg.train.eval_batches,
            drain=False,  # every rank stops at the same batch (equal batch counts per rank)
            probe=self._stochastic_gap,
        )
        self.engine.module.train()
        gap, agree = result.extra.get("l1", 0.0), result.extra.get("agree", 0.0)  # 0 on a rank without a batch
        correct, total, gap, agree = all_reduce_sum([float(result.correct), float(result.samples), gap, agree])
        return {
            "top1": correct / max(total, 1.0),
            "eval_samples": total,
            "merged_vs_stochastic_l1": gap / self.world,
            "merged_vs_stochastic_agree": agree / self.world,
        }

    def _stochastic_gap(self, x: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
        """Mean L1 between the softmax of the merged model and of one stochastic training-mode
        pass (the probe routing plan of this step), and how often their top-1 agree."""
        self.engine.module.train()
        with torch.random.fork_rng(), self.router.use(self.router.plan(self.step, 0, PROBE_PASS)[self.rank]):
            stochastic = self.engine(x)
        self.engine.module.eval()
        return {
            "l1": float((stochastic.float().softmax(-1) - logits.float().softmax(-1)).abs().sum(-1).mean()),
            "agree": float((stochastic.argmax(-1) == logits.argmax(-1)).float().mean()),
        }

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        client = {
            "step": self.step,
            "epoch": self.epoch,
            "router": self.router.state_dict(),
            "bad_total": self.bad_total,
            "last_eval": self.last_eval,
        }
        rank_state = {
            "rng": ckpt.rng_state(),
            "data": self.data_state,
            "epoch": self.epoch,
            "skipped": self.skipped,
            "valid": self.valid,
            "epoch_valid": self.epoch_valid,
        }
        ckpt.save(
            self.engine,
            self.ckpt_dir,
            self.step,
            client_state=client,
            rank_state=rank_state,
            keep=self.cfg.train.keep_checkpoints,
        )

    def maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        client, rank_state = ckpt.load(self.engine, self.ckpt_dir, self.resume_from)
        self.router.load_state_dict(client["router"])
        self.step, self.bad_total = client["step"], client["bad_total"]
        self.last_eval = dict(client.get("last_eval") or {})
        self.epoch, self.data_state = rank_state["epoch"], rank_state["data"]
        self.skipped, self.valid = dict(rank_state["skipped"]), rank_state["valid"]
        self.epoch_valid = rank_state["epoch_valid"]
        ckpt.set_rng_state(rank_state["rng"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", self.resume_from, self.step)

    # ---------------------------------------------------------------- adapter
    def merged_adapter(self) -> dict[str, torch.Tensor]:
        """The merged dense adapter (all ranks take part: fp32 values are gathered under ZeRO)."""
        state = full_fp32_params(self.engine, self.trainable)
        # persistent adapter buffers (partition, W0, decay factors) by the one name contract;
        # the full fp32 parameter values replace the (possibly partitioned) module copies
        buffers = {n: t.cpu() for n, t in adapter_state_dict(self.engine.module).items() if n not in state}
        return merge_state_dict({**buffers, **state})

    def write_adapter(self) -> Path | None:
        merged = self.merged_adapter()
        if self.rank != 0:
            return None
        manifest = {
            "config": to_plain(self.cfg),
            "backbone": {"name": self.backbone.name, "source": self.backbone.source, "family": self.cfg.model.family},
            "num_classes": self.num_classes,
            "step": self.step,
        }
        return write_adapter(self.run_dir / "adapter", merged, manifest)

    # ---------------------------------------------------------------- run
    def run(self) -> dict[str, float]:
        t = self.cfg.train
        self.maybe_resume()
        batches = self._batches()
        bar = tqdm(total=t.steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        self.engine.module.train()
        while self.step < t.steps:
            log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
            stats = self.train_step(batches, log=log_now)
            self.step += 1
            bar.update(1)
            if log_now:
                self.metrics.scalars(self.step, stats)
                bar.set_postfix(loss=f"{stats['loss/ce']:.4f}", lr=f"{stats['lr']:.2e}")
                if self.rank == 0:
                    log.info(
                        "step %d/%d loss %.4f lr %.3e %.1f samples/s",
                        self.step,
                        t.steps,
                        stats["loss/ce"],
                        stats["lr"],
                        stats["throughput/samples_per_s"],
                    )
            if self.step % t.eval_every == 0 or self.step == t.steps:
                self.last_eval = self.evaluate()
                if self.last_eval:
                    self.metrics.scalars(self.step, {f"eval/{k}": v for k, v in self.last_eval.items()})
                    self.metrics.evaluation({"step": self.step, **self.last_eval})
                    if self.rank == 0:
                        log.info("step %d eval top1 %.4f", self.step, self.last_eval["top1"])
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                if self.bad_in_row:  # never a checkpoint inside a non-finite streak: `latest` stays good
                    if self.rank == 0:
                        log.warning(
                            "step %d: no checkpoint, the last %d step(s) had a non-finite loss",
                            self.step,
                            self.bad_in_row,
                        )
                else:
                    self.save_checkpoint()
            self.metrics.flush()
        bar.close()
        path = self.write_adapter()
        if path is not None:
            log.info("merged adapter written to %s", path)
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()
        return self.last_eval


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
