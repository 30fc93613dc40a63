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


def main() -> int:
    d, s = StudyGrid(), StudySettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True, help="study folder (rows, tower, report); rerun to resume")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the rows and stop")
    for flag, kind, default, what in (
            ("tasks", str, d.tasks, "tasks"), ("methods", str, d.methods, "methods"),
            ("lrs", float, d.lrs, "phase A rates"),
            ("final-steps", int, d.final_steps, "phase C schedules"), ("seeds", int, d.final_seeds, "phase C seeds"),
            ("experts", int, d.experts, "phase B: N"), ("shares", str, d.shares, "phase B: MoSA shares"),
            ("lora-shares", str, d.lora_shares, "phase B: MoSA-LoRA shares"),
            ("consistency", on_off, d.consistency, "phase B: consistency")):
        shown = ",".join({True: "on", False: "off"}.get(v, str(v)) if isinstance(v, bool) else str(v) for v in default)
        ap.add_argument(f"--{flag}", type=csv(kind), default=tuple(default), help=f"{what} (default {shown})")
    ap.add_argument("--select-steps", type=int, default=d.select_steps, help="steps of phases A and B")
    for name in ("batch", "bottleneck", "labelled", "pretrain_epochs", "pretrain_samples"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(s, name))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mosa_scale.study").setLevel(logging.INFO)  # progress; not every model build
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.report_only:
        print("\n".join(map(str, report_only(args.out_dir))))
        return 0
    grid = StudyGrid(tasks=args.tasks, methods=args.methods, lrs=args.lrs, select_steps=args.select_steps,
                     final_steps=args.final_steps, final_seeds=args.seeds, experts=args.experts, shares=args.shares,
                     lora_shares=args.lora_shares, consistency=args.consistency)
    settings = StudySettings(batch=args.batch, bottleneck=args.bottleneck, labelled=args.labelled,
                             pretrain_epochs=args.pretrain_epochs, pretrain_samples=args.pretrain_samples)
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
