"""Show what a checkpoint or adapter holds, as JSON:

    python tools/inspect_checkpoint.py PATH [--tag TAG] [--no-tensors]

PATH: a run directory or its checkpoints/ folder (latest tag), one checkpoint tag folder, one
DeepSpeed ``.pt`` file, or an adapter folder / adapter.safetensors. Reports keys, shapes,
parameter counts, partition statistics per MoSA layer and, for DeepSpeed checkpoints, the
optimizer steps in which each expert was active. Every file read is checked first against its
checkpoint's manifest (size, sha256) or adapter manifest; a refused one gives exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from mosa_scale.ckpt.inspect import inspect_path
from mosa_scale.ckpt.manifest import verify_member
from mosa_scale.ckpt.safe_load import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one checkpoints/latest names)")
    parser.add_argument(
        "--unverified",
        action="store_true",
        help="accept a checkpoint tag without manifest.json (written before manifests existed)",
    )
    parser.add_argument("--no-tensors", action="store_true", help="leave out the per-tensor table")
    args = parser.parse_args(argv)
    try:
        verify_member(args.path)  # one file of a tag: checked against the tag's manifest first
        report = inspect_path(args.path, tag=args.tag, unverified=args.unverified)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"inspect_checkpoint: {e}", file=sys.stderr)
        return 2
    if args.no_tensors:
        report.pop("tensors", None)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
