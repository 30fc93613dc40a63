"""Streaming image data: webdataset shards in, fixed-size batches out.

- `build_loader`: the loader of one rank for one epoch (equal batch counts on every rank,
  counted skips of corrupt data, exact resume through `StreamLoader.state_dict()`).
- `make_shards`: write shards and index.json from a class folder, a CSV or a built-in set.
- `load_builtin`: scikit-learn digits and Debian's Fashion-MNIST, no download needed.

Names are imported lazily so that `tools/make_shards.py` does not pay for torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataSpec": "spec",
    "ShardSet": "spec",
    "resolve_shards": "spec",
    "IGNORE_INDEX": "pipeline",
    "StreamLoader": "pipeline",
    "build_loader": "pipeline",
    "make_shards": "shards",
    "open_source": "shards",
    "FASHION_MNIST_PACKAGE": "builtin",
    "MissingDatasetError": "builtin",
    "fashion_mnist_available": "builtin",
    "load_builtin": "builtin",
    "next_epoch": "state",
    "DataError": "errors",
    "prepare_data": "prepare",
    "SourceError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
