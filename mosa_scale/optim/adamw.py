"""AdamW that trains MoSA slices exactly like the N-copies reference (MOSA_SPEC section 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mosa_scale.sparse.linear import SparseExpertLinear
from mosa_scale.sparse.routing import Router


class MoSAAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that leaves a slice untouched when no rank used it this step.

    A slice group whose ``mosa_key`` is not in ``router.active_slices()`` is hidden from the
    step: its values, moments and step count stay bit-identical, so bias correction counts the
    steps a slice was active, as the reference's per-copy AdamW does. When an active weight slice
    is stepped with weight decay, its layer's factor ``s_k`` is multiplied by ``1 - lr * wd``:
    that is what the reference's decoupled decay does to the off-mask entries of the active copy.

    Works as DeepSpeed's client optimizer under ZeRO 0-3, which steps one group (or one ZeRO-3
    sub-group) at a time with the group dicts kept (needs ``zero_allow_untested_optimizer``).

    Args:
        params: Groups from :func:`~mosa_scale.optim.groups.build_param_groups`.
        router: The routing of the current step; None steps every group (dense training).
        layers: MoSA layers by route id, whose ``decay`` buffers are updated.
        **kwargs: ``torch.optim.AdamW`` arguments.
    """

    def __init__(self, params: Any, *, router: Router | None = None,
                 layers: dict[int, SparseExpertLinear] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.router = router
        self.layers = layers or {}
        self.skip_all = False  # set for a step whose loss was not finite: nothing changes
        self._decayed: set[tuple[int, int]] = set()
        self._decay_window: int | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        active = self.router.active_slices() if self.router is not None else None
        groups = self.param_groups
        live = [] if self.skip_all else [
            g for g in groups if active is None or g.get("mosa_key") is None or tuple(g["mosa_key"]) in active]
        self.param_groups = live
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        self._decay_off_mask(live)
        return loss

    def _decay_off_mask(self, stepped: list[dict[str, Any]]) -> None:
        window = self.router.window.step if self.router is not None and self.router.window is not None else None
        if window != self._decay_window:  # a new optimizer step: each slice decays once in it
            self._decayed.clear()
            self._decay_window = window
        for g in stepped:
            key = g.get("mosa_key")
            if key is None or not g.get("mosa_decay") or not g["params"] or g["weight_decay"] == 0:
                continue
            key = tuple(key)
            if key in self._decayed:  # ZeRO-3 may step one group in several sub-groups
                continue
            self._decayed.add(key)
            layer = self.layers[key[0]]
            layer.decay[key[1]] *= 1 - float(g["lr"]) * float(g["weight_decay"])

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, router: Router | None, weight_decay: float,
                  **kwargs: Any) -> MoSAAdamW:
        """Builds the groups of ``model`` and the optimizer over them."""
        from mosa_scale.optim.groups import build_param_groups, sparse_layers

        layers = {m.route_id: m for m in sparse_layers(model).values()}
        return cls(build_param_groups(model, weight_decay=weight_decay), router=router, layers=layers,
                   weight_decay=weight_decay, **kwargs)
