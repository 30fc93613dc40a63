"""The transfer study: where MoSA wins (one command, resumable; logic in ``mosa_scale.study``).

Pretrains a small ViT (width 128, 6 blocks, 28 px, patch 7) on Fashion-MNIST classes 0-4 once, then
adapts it with 1000 labels to Fashion-MNIST 5-9 and to digits: dense adapter, LoRA, linear probe,
MoSA and MoSA-LoRA in both update semantics (``skip``, ``coast``). Phase A chooses each method's
learning rate, phase B each sparse method's variant (N, share, consistency), both on a validation
split of the labels; phase C trains the chosen configurations on all labels at every schedule and
seed and reads the test split once each. Rows go to ``OUT/rows.jsonl`` as runs finish; rerunning
the command continues where it stopped; ``--report-only`` rebuilds ``report.md``,
``summary.json`` and the plots from the rows.

    python bench/transfer.py --out-dir OUT [--report-only] [grid options]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from mosa_scale.study import Study, StudyGrid, StudySettings, report_only


def csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"got {text!r}; use on or off")
    return text == "on"


LISTS = {
    "tasks": str,
    "methods": str,
    "lrs": float,
    "final_steps": int,
    "final_seeds": int,
    "long_methods": str,
    "experts": int,
    "shares": str,
    "lora_shares": str,
    "consistency": on_off,
}  # StudyGrid fields, comma-separated
GRID_INTS = ("select_steps", "extend_lrs")
SETTINGS = ("batch", "bottleneck", "labelled", "pretrain_epochs", "pretrain_samples")


def main() -> int:
    grid0, settings0 = StudyGrid(), StudySettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True, help="study folder (rows, tower, report); rerun to resume")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the rows and stop")
    for name, kind in LISTS.items():
        default = getattr(grid0, name)
        shown = ",".join(("on" if v else "off") if isinstance(v, bool) else str(v) for v in default)
        ap.add_argument("--" + name.replace("_", "-"), type=csv(kind), default=default, help=f"default {shown}")
    for source, names in ((grid0, GRID_INTS), (settings0, SETTINGS)):
        for name in names:
            ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(source, name))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mosa_scale.study").setLevel(logging.INFO)  # progress; not every model build
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.report_only:
        print("\n".join(map(str, report_only(args.out_dir))))
        return 0
    grid = StudyGrid(**{k: getattr(args, k) for k in (*LISTS, *GRID_INTS)})
    settings = StudySettings(**{k: getattr(args, k) for k in SETTINGS})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    try:
        files = Study(args.out_dir, grid, settings).run()
    except KeyboardInterrupt:
        logging.warning("interrupted: the run in progress is lost; rerun the same command to continue")
        return 130
    print("\n".join(map(str, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
