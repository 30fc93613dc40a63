"""Training objectives."""

from mosa_scale.loss.consistency import HiddenCapture, consistency_loss, symmetric_kl

__all__ = ["HiddenCapture", "consistency_loss", "symmetric_kl"]
