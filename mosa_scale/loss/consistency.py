"""Consistency regularisation (MOSA_SPEC section 6): two passes with different experts agree."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def symmetric_kl(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """``0.5 * [KL(sg(p2) || p1) + KL(sg(p1) || p2)]``, averaged over the batch.

    Each direction treats the other pass's probabilities as a fixed target, so each pass is
    pulled towards the other.
    """
    logp1, logp2 = F.log_softmax(logits1.float(), -1), F.log_softmax(logits2.float(), -1)  # (B, C)
    kl_12 = F.kl_div(logp1, logp2.detach(), log_target=True, reduction="batchmean")  # KL(sg(p2) || p1)
    kl_21 = F.kl_div(logp2, logp1.detach(), log_target=True, reduction="batchmean")  # KL(sg(p1) || p2)
    return 0.5 * (kl_12 + kl_21)


def consistency_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    weight: float = 1.0,
    hidden1: Sequence[torch.Tensor] = (),
    hidden2: Sequence[torch.Tensor] = (),
    hidden_weight: float = 0.0,
    second_ce: bool = False,
) -> dict[str, torch.Tensor]:
    """The extra loss terms of the second pass.

    Args:
        logits1: First pass logits ``(B, C)``.
        logits2: Second pass logits (fresh experts and dropout) ``(B, C)``.
        labels: Needed when ``second_ce``.
        weight: lambda on the symmetric KL.
        hidden1: Hidden states of the first K blocks in pass 1.
        hidden2: The same in pass 2.
        hidden_weight: Weight of their mean squared difference (0 switches it off).
        second_ce: Add cross-entropy on the second pass.

    Returns:
        ``{"kl", "hidden_mse", "ce2", "total"}`` (unused terms are zero).
    """
    zero = logits1.new_zeros((), dtype=torch.float32)
    kl = symmetric_kl(logits1, logits2)
    mse = zero
    if hidden_weight > 0 and hidden1:
        mse = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(hidden1, hidden2)]).mean()
    ce2 = zero
    if second_ce:
        if labels is None:
            raise ValueError("second_ce needs labels")
        ce2 = F.cross_entropy(logits2.float(), labels)
    return {"kl": kl, "hidden_mse": mse, "ce2": ce2, "total": weight * kl + hidden_weight * mse + ce2}


class HiddenCapture:
    """Records the outputs of the given modules during forwards (for the hidden-state MSE)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: tuple, output: object) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
