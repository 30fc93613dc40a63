"""Metrics: TensorBoard scalars and ``metrics.jsonl`` on rank 0 only; one-line logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricLogger:
    """Writes scalars to TensorBoard (``run_dir/tb``) and evaluations to ``metrics.jsonl``.

    Every rank may call it; only rank 0 writes.
    """

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.rank = rank
        self._tb = None
        self._jsonl = run_dir / "metrics.jsonl"
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            self._tb.add_scalar(k, float(v), step)

    def evaluation(self, record: dict) -> None:
        if self.rank != 0:
            return
        with self._jsonl.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
