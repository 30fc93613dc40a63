"""Write webdataset shards and index.json from an image folder, a CSV or a built-in set.

    python tools/make_shards.py SOURCE --out DIR [--samples-per-shard K] [--max-shard-bytes B]
        [--split train=0.8,val=0.2] [--seed S] [--overwrite] [--limit N] [--quiet]

SOURCE: a folder with one sub-folder per class, a `.csv` of path,label rows, `digits`
(scikit-learn) or `fashion-mnist` (Debian package dataset-fashion-mnist). On an error (status 2,
naming a bad source file) or an interrupt (status 130) every file it wrote is removed again.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from mosa_scale.data.builtin import MissingDatasetError
from mosa_scale.data.shards import make_shards, parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "source", metavar="SOURCE", help="class folder, .csv of path,label, 'digits' or 'fashion-mnist'"
    )
    parser.add_argument("--out", required=True, help="output folder (DIR/<split>-%%06d.tar)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="K")
    parser.add_argument(
        "--max-shard-bytes",
        type=parse_size,
        default="1G",
        metavar="B",
        help="bytes per shard file, e.g. 500M (default 1G)",
    )
    parser.add_argument("--split", default="train=1", help="e.g. train=0.8,val=0.2")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--overwrite", action="store_true", help="replace shards in DIR")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="seeded random subset of N samples")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill cleans up like Ctrl-C
    try:
        index = make_shards(
            args.source,
            args.out,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            splits=args.split,
            seed=args.seed,
            overwrite=args.overwrite,
            limit=args.limit,
            progress=not args.quiet,
        )
    except (FileNotFoundError, FileExistsError, MissingDatasetError, ValueError) as exn:
        parser.exit(2, f"make_shards: error: {exn}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"make_shards: interrupted; the files it had written to {args.out} were removed\n")
    for name, split in index["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['shards'])} shards")
    print(f"index: {args.out}/index.json ({index['num_classes']} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
