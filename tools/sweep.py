"""Run a sweep: ``python tools/sweep.py SWEEP.yaml [--out-dir D] [--print | --collect] [key=value ...]``.

Launches every unfinished run of the grid locally (one ``deepspeed`` launch at a time), skips
finished ones, resumes interrupted ones from their checkpoints, then writes ``results.csv`` and
PNG plots into the sweep's ``out_dir``. ``--print`` prints the cluster commands instead;
``--collect`` only rebuilds the CSV and plots. Extra ``key=value`` overrides apply to every run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mosa_scale.config import ConfigError
from mosa_scale.sweep import SweepRunner, check_runs, load_sweep, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep", help="sweep YAML (see mosa_scale/sweep/spec.py)")
    parser.add_argument("--out-dir", default=None, help="overrides the file's out_dir")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the cluster commands of unfinished runs")
    mode.add_argument("--collect", action="store_true", help="only collect results.csv and plots")
    parser.add_argument("overrides", nargs="*", help="dotted run-config overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mosa_scale.sweep").setLevel(logging.INFO)
    try:  # every run's config is checked before anything is launched
        spec = load_sweep(args.sweep, out_dir=args.out_dir, extra=args.overrides)
        check_runs(spec)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    runner = SweepRunner(spec)
    if args.print:
        runner.print_commands()
        return 0
    rc = 0 if args.collect else runner.run()
    if rc in (0, 1):
        csv_path, plots = report(spec)
        print(f"wrote {csv_path} and {', '.join(p.name for p in plots)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
