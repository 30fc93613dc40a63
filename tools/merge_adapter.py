"""Merge a DeepSpeed checkpoint into one portable adapter, offline on one CPU process.

    python tools/merge_adapter.py RUN_DIR|RUN_DIR/checkpoints[/TAG] --out OUT_DIR [--config FILE.yaml]
        [--tag TAG] [--unmerged] [--unverified] [--peft PEFT_DIR]

Reads any ZeRO stage and world size, checks the checkpoint against the run config (structure,
routing, seeded partition), merges (MOSA_SPEC section 5) and writes OUT_DIR/adapter.safetensors
+ adapter_config.json; --unmerged also writes the trained MoSA state to OUT_DIR/unmerged/,
--peft exports a (MoSA-)LoRA on an HF backbone in PEFT's format. Exit status 2 on a refused
checkpoint (manifest, sizes, sha256, weights-only read, config, finite merged values), with
nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mosa_scale.ckpt import CheckpointError, CheckpointMismatch, consolidate
from mosa_scale.ckpt.adapter_file import AdapterFileError
from mosa_scale.ckpt.export import export_peft
from mosa_scale.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or one checkpoint tag folder")
    parser.add_argument("--out", required=True, help="output folder for adapter.safetensors + adapter_config.json")
    parser.add_argument("--config", default=None, help="run config it must match (default: RUN/config.yaml)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one checkpoints/latest names)")
    parser.add_argument("--unmerged", action="store_true", help="also write the unmerged trained state to OUT/unmerged")
    parser.add_argument(
        "--unverified",
        action="store_true",
        help="accept a checkpoint tag without manifest.json (written before manifests existed); "
        "a tag with one is always verified",
    )
    parser.add_argument("--peft", default=None, metavar="DIR", help="also export a merged (MoSA-)LoRA in PEFT's format")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = consolidate(
            args.checkpoint,
            args.out,
            config=args.config,
            tag=args.tag,
            unmerged=args.unmerged,
            unverified=args.unverified,
        )
    except (CheckpointError, CheckpointMismatch, ConfigError, AdapterFileError) as e:
        print(f"merge_adapter: refused, nothing written: {e}", file=sys.stderr)
        return 2
    out = {
        "merged": str(result.merged_dir),
        "unmerged": str(result.unmerged_dir) if result.unmerged_dir else None,
        "zero_stage": result.checkpoint.stage,
        "world_size": result.checkpoint.world_size,
        "step": result.checkpoint.step,
        "structure_checked": result.skeleton_checked,
    }
    if args.peft:
        try:
            out["peft"] = str(export_peft(result.merged_dir, args.peft))
        except ValueError as e:  # not a LoRA on an HF backbone: the merged adapter stands
            print(
                f"merge_adapter: merged adapter written to {result.merged_dir}; PEFT export refused: {e}",
                file=sys.stderr,
            )
            return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
