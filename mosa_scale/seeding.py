"""The one seed derivation: a seed from a few parts, identical in every process and on every machine.

Python's ``hash`` is salted per process for strings, so a cryptographic hash of the parts is used.
Two encodings exist and both are frozen, because saved artifacts depend on the exact numbers:

- ``model`` (sha256 of the parts' ``str`` joined by ``\\x1f``, 63 bits): MoSA partitions, adapter
  init and routing plans. Partitions are saved in every checkpoint and adapter file and are
  recomputed and compared when a checkpoint is consolidated.
- ``data`` (blake2b-64 of the parts' ``repr``): shard order, resampling, the shuffle buffer and
  augmentation. A data resume state records the run seed, not the numbers drawn from it, so other
  numbers would resume a saved run into another sample order without any error.
"""

from __future__ import annotations

import hashlib
from typing import Literal

__all__ = ["derive_seed"]


def derive_seed(*parts: object, stream: Literal["model", "data"] = "model") -> int:
    """A non-negative seed from ``parts`` (e.g. a purpose tag, the run seed, a name, a step).

    Args:
        *parts: Values that define the seed; the first is by convention a tag naming the purpose
            (``"partition"``, ``"shards"`` ...), so two purposes never share a stream.
        stream: ``model`` (below 2**63) or ``data`` (below 2**64); see the module docstring.

    Returns:
        The seed.

    Raises:
        ValueError: on an unknown ``stream``.
    """
    if stream == "model":
        digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    if stream == "data":
        return int.from_bytes(hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest(), "little")
    raise ValueError(f"stream: got {stream!r}; allowed values are ['model', 'data']")
