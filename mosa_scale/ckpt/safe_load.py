"""Reading torch checkpoint files without running any code from them.

Every ``.pt`` file mosa_scale reads (DeepSpeed's model and optimizer states, the per-rank state
of a resume checkpoint, single files given to the inspector) is read with torch's weights-only
unpickler: it rebuilds tensors and plain containers (dict, list, tuple, str, numbers) and refuses
every other pickled global before anything is called. DeepSpeed's optimizer-states files hold
three DeepSpeed types besides (the loss scaler, the ZeRO-stage enum, ZeRO-1/2's fragment
addresses); :data:`DEEPSPEED_TYPES` is the explicit allow-list of their names. Offline they are
read as the inert stand-ins of :data:`DEEPSPEED_STAND_INS` (no DeepSpeed code runs and
``deepspeed`` is not imported); on resume the engine allows the real classes under the same
names (``mosa_scale.engine.checkpoint``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, truncated, altered or not in a format mosa_scale reads."""


class DeepSpeedObject:
    """Inert stand-in for a DeepSpeed object in a checkpoint: keeps its pickled state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> DeepSpeedObject:
        obj = super().__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"DeepSpeedObject({self.state!r})"


def _enum_value(value: int) -> int:
    """Stand-in for ``ZeroStageEnum(value)``: the plain stage number."""
    return int(value)


# the only pickled globals besides tensors and plain containers that a checkpoint may hold
DEEPSPEED_TYPES: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO-1/2/3 "loss_scaler"
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same, fp16 runs
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 and bf16 slice maps
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO-1/2/3 "zero_stage"
)

# (stand-in, the pickled global it replaces), one per allowed DeepSpeed type
DEEPSPEED_STAND_INS: list[tuple[Any, str]] = [
    (_enum_value if name.endswith("ZeroStageEnum") else DeepSpeedObject, name) for name in DEEPSPEED_TYPES
]

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def refusal_message(path: str | Path, error: pickle.UnpicklingError) -> str:
    """The message for a file torch's weights-only unpickler refused, naming the offending global."""
    found = _GLOBAL.search(str(error))
    if found:
        what = (
            f"it holds the pickled global {found.group(1)!r}, which is not a tensor, a plain container or one "
            f"of the allowed DeepSpeed types ({', '.join(n.rsplit('.', 1)[1] for n in DEEPSPEED_TYPES)})"
        )
    else:
        line = next((s.strip() for s in str(error).splitlines() if "error" in s.lower()), str(error).strip())
        what = f"the weights-only unpickler refused it ({line[:300]})"
    return (
        f"{path}: refused without running anything from it: {what}. Files written by mosa_scale never hold "
        "one: this file was altered or comes from elsewhere; use another checkpoint tag"
    )


def load_weights_only(path: str | Path, *, stand_ins: bool = True, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, DeepSpeed's allowed types read as inert stand-ins.

    Args:
        path: A ``.pt`` file.
        stand_ins: Allow the DeepSpeed types of :data:`DEEPSPEED_TYPES` (as stand-ins); False
            allows tensors and plain containers only.
        mmap: Map the tensor data instead of reading it (checks the pickle without the cost of
            loading the tensors; needs torch's zip format).

    Raises:
        CheckpointError: naming the file, when it is truncated or damaged, or holds a pickled
            object that weights-only loading refuses (naming that object).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(DEEPSPEED_STAND_INS if stand_ins else []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(refusal_message(path, e)) from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: cannot be read ({type(e).__name__}: {str(e)[:200]}); the file is truncated "
            "or damaged: copy it again, or use an earlier checkpoint tag"
        ) from e


def check_loadable(path: str | Path) -> None:
    """Reads ``path`` as :func:`load_weights_only` does (tensor data mapped, not read) and discards it:
    the check that nothing but tensors, plain containers and the allowed DeepSpeed types is in it.

    Raises:
        CheckpointError: as :func:`load_weights_only`.
    """
    load_weights_only(path, mmap=True)
