"""Evaluate a merged adapter on webdataset shards, one process, no DeepSpeed:

    python launchers/eval.py --adapter OUT_DIR --data SHARDS [--split val] [--device cuda]

Prints {"top1", "samples", "per_class": {class: {"top1", "samples"}}, ...} as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from mosa_scale.eval import evaluate_adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="merged adapter folder (adapter.safetensors + json)")
    parser.add_argument("--data", required=True, help="shards: a folder with index.json, a brace pattern, pipe:...")
    parser.add_argument("--split", default=None, help="split of a folder with index.json, e.g. val")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="reader processes (0: read in this process)")
    parser.add_argument("--pretrained", default=None, help="backbone weights here (default: the adapter's config)")
    parser.add_argument("--max-batches", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    try:
        result = evaluate_adapter(
            args.adapter,
            args.data,
            split=args.split,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            pretrained=args.pretrained,
            max_batches=args.max_batches,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
