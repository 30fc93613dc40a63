"""One-process evaluation of merged adapters (no DeepSpeed)."""

from mosa_scale.eval.evaluate import EvalResult, evaluate, evaluate_adapter, load_merged_classifier

__all__ = ["EvalResult", "evaluate", "evaluate_adapter", "load_merged_classifier"]
