"""The transfer study: where MoSA wins against the dense adapter, LoRA and a linear probe on a
small pretrained ViT, with learning rate and variant chosen on validation data, in both update
semantics, resumable, with its report (``bench/transfer.py`` is its command)."""

from mosa_scale.study.grid import FinalConfig, StudyGrid
from mosa_scale.study.report import summarize, write_report
from mosa_scale.study.rows import RowStore
from mosa_scale.study.run import DENSE, METHODS, RunSpec, Variant, train_and_evaluate
from mosa_scale.study.study import Study, StudyError, StudySettings, report_only
from mosa_scale.study.tasks import TASKS, Split, Task, load_tasks

__all__ = [
    "DENSE",
    "METHODS",
    "TASKS",
    "FinalConfig",
    "RowStore",
    "RunSpec",
    "Split",
    "Study",
    "StudyError",
    "StudyGrid",
    "StudySettings",
    "Task",
    "Variant",
    "load_tasks",
    "report_only",
    "summarize",
    "train_and_evaluate",
    "write_report",
]
