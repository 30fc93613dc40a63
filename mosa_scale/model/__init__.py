"""The trained model: frozen tower + adapters + head (:mod:`.assembly`), and its FLOPs (:mod:`.flops`).

Below ``ckpt/``, ``eval/``, ``loop/``, ``plan/`` and ``sweep/``, which all build the same model.
"""

from mosa_scale.model.assembly import AdaptedClassifier, build_model
from mosa_scale.model.flops import PEAK_FLOPS, peak_flops, step_flops, throughput_metrics

__all__ = ["PEAK_FLOPS", "AdaptedClassifier", "build_model", "peak_flops", "step_flops", "throughput_metrics"]
