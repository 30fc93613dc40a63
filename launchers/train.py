"""Train MoSA adapters: ``deepspeed [--num_gpus K] launchers/train.py --config FILE.yaml [key=value ...]``.

Also runs under torchrun, or as plain ``python`` for one process. Exit status 2, with the reason
and no traceback, for a bad config, a run directory in use, a refused checkpoint or unusable data.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mosa_scale.ckpt.adapter_file import AdapterFileError
from mosa_scale.ckpt.safe_load import CheckpointError
from mosa_scale.config import ConfigError
from mosa_scale.config.run import load_run_config
from mosa_scale.data import DataError
from mosa_scale.engine.deepspeed_engine import world_from_env
from mosa_scale.loop.rundir import RunDirError
from mosa_scale.loop.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="run config YAML (default: built-in defaults)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 adapter.share=up")
    args = parser.parse_args(argv)
    rank, world, _ = world_from_env()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s"
    )
    try:  # validated before any process group or model exists
        cfg = load_run_config(args.config, args.overrides, world_size=world)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        result = Trainer(cfg).run()
    except (CheckpointError, RunDirError, DataError, AdapterFileError) as e:  # every rank stops with the same reason
        print(f"[rank{rank}] train: stopped: {e}", file=sys.stderr)
        return 2  # the process group ends at exit (engine.deepspeed_engine.end_process_group)
    if rank == 0:
        print(json.dumps({"final_eval": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
