"""Running a sweep: one ``deepspeed launchers/train.py`` per unfinished run, one after another.

Bookkeeping in ``out_dir``:

* ``sweep.json``: the expanded grid (names, axis labels, overrides), for the collector.
* ``state.json``: every run's status (``pending``, ``running``, ``done``, ``failed``,
  ``interrupted``) and the sweep's pid, rewritten atomically on every change.
* ``launches.jsonl``: append-only events: ``start`` (with the checkpoint it resumes from),
  ``end`` (return code, seconds), ``skip`` (already done), ``interrupted``.
* ``logs/<run>.log``: the launcher's output, appended across attempts.

A run is done when its run dir holds ``adapter/adapter_config.json`` and ``metrics.jsonl``.
Rerunning the sweep skips done runs; an interrupted run is launched again with the same
command, and the trainer resumes it from its own ``checkpoints/latest``.

SIGINT / SIGTERM stop the running launch (its whole process group), record it as interrupted
and exit with 128 + the signal number.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mosa_scale.engine.launch import deepspeed_command
from mosa_scale.sweep.spec import RunSpec, SweepSpec, cluster_command

log = logging.getLogger(__name__)
TRAIN = Path(__file__).resolve().parents[2] / "launchers" / "train.py"
STOP_GRACE_S = 30.0


class Interrupted(Exception):
    """The sweep process got SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def is_done(run_dir: Path) -> bool:
    """Whether a run finished: it wrote its merged adapter and its evaluations."""
    return (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def resume_tag(run_dir: Path) -> str | None:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def local_command(spec: SweepSpec, run: RunSpec) -> list[str]:
    """``deepspeed --num_gpus R --master_port P launchers/train.py --config C key=value ...``."""
    return deepspeed_command(TRAIN, ["--config", str(spec.config), *run.override_args()], ranks=spec.ranks)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class SweepRunner:
    """Launches the unfinished runs of ``spec`` locally, or prints their cluster commands."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.out = spec.out_dir
        self.runs = spec.runs()
        self.status: dict[str, str] = {}

    # ------------------------------------------------------------- bookkeeping
    def write_grid(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        grid = {
            "config": str(self.spec.config),
            "ranks": self.spec.ranks,
            "axes": {a.name: a.labels for a in self.spec.axes},
            "plot": {"x": self.spec.plot_x, "average": list(self.spec.plot_average)},
            "runs": [
                {"name": r.name, "labels": r.labels, "overrides": r.overrides, "run_dir": str(r.run_dir)}
                for r in self.runs
            ],
        }
        _write_json(self.out / "sweep.json", grid)

    def _event(self, event: str, run: RunSpec, **fields: Any) -> None:
        record = {"event": event, "run": run.name, "time": time.time(), **fields}
        with (self.out / "launches.jsonl").open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def _set(self, run: RunSpec, status: str) -> None:
        self.status[run.name] = status
        self._write_state()

    def _write_state(self) -> None:
        _write_json(
            self.out / "state.json",
            {
                "pid": os.getpid(),
                "updated": time.time(),
                "runs": {r.name: self.status.get(r.name, "pending") for r in self.runs},
            },
        )

    # ------------------------------------------------------------- modes
    def print_commands(self, stream: TextIO = sys.stdout) -> int:
        """Prints one cluster command per unfinished run; returns how many."""
        todo = [r for r in self.runs if not is_done(r.run_dir)]
        for run in todo:
            print(cluster_command(self.spec, run), file=stream)
        return len(todo)

    def run(self, *, env: dict[str, str] | None = None) -> int:
        """Launches every unfinished run in grid order.

        Returns:
            0 when every run is done, 1 when some failed (the others still ran), 128 + signal
            number when interrupted.
        """
        self.write_grid()
        for r in self.runs:
            self.status[r.name] = "done" if is_done(r.run_dir) else "pending"
        self._write_state()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            for s in previous:  # a second signal must not interrupt stopping the launch
                signal.signal(s, signal.SIG_IGN)
            raise Interrupted(signum)

        for s in previous:
            signal.signal(s, handler)
        try:
            for run in self.runs:
                if self.status[run.name] == "done":
                    self._event("skip", run, reason="done")
                    continue
                self._launch(run, env)
        except Interrupted as e:
            log.warning("sweep interrupted by %s", e)
            return 128 + e.signum
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        failed = [n for n, s in self.status.items() if s != "done"]
        if failed:
            log.error("%d run(s) failed: %s (see %s)", len(failed), ", ".join(failed), self.out / "logs")
        return 1 if failed else 0

    def _launch(self, run: RunSpec, env: dict[str, str] | None) -> None:
        cmd = local_command(self.spec, run)
        (self.out / "logs").mkdir(exist_ok=True)
        tag = resume_tag(run.run_dir)
        self._set(run, "running")
        self._event("start", run, resume_from=tag, command=cmd)
        log.info("run %s: %s%s", run.name, "resuming from " + tag + ": " if tag else "", " ".join(cmd))
        t0 = time.time()
        with (self.out / "logs" / f"{run.name}.log").open("a") as out:
            # own process group: a terminal's Ctrl-C reaches only the sweep, which stops the launch
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait()
            except Interrupted as e:
                self._stop(proc)
                self._set(run, "interrupted")
                self._event("interrupted", run, signal=str(e), seconds=time.time() - t0)
                raise
        ok = rc == 0 and is_done(run.run_dir)
        self._set(run, "done" if ok else "failed")
        self._event("end", run, rc=rc, seconds=time.time() - t0, done=ok)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGTERM to the launch's whole process group (launcher and ranks), SIGKILL to whatever is
        left after a grace period; returns once no process of the group is left."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline:
                proc.poll()  # reap the launcher itself
                try:
                    os.killpg(proc.pid, 0)  # the ranks may outlive the launcher by a moment
                except ProcessLookupError:
                    return
                time.sleep(0.1)
        proc.wait()
