"""Train MoSA adapters: ``deepspeed [--num_gpus K] launchers/train.py --config FILE.yaml [key=value ...]``.

Also runs under torchrun, or as plain ``python`` for one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mosa_scale.config import ConfigError
from mosa_scale.config.run import load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="run config YAML (default: built-in defaults)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 adapter.share=up")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s")
    try:  # validated before any process group or model exists
        cfg = load_run_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from mosa_scale.loop.trainer import Trainer

    result = Trainer(cfg).run()
    if rank == 0:
        print(json.dumps({"final_eval": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
