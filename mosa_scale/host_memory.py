"""Host memory that is freed goes back to the system (glibc's allocator otherwise keeps it), and
file pages read once are handed back.

Under ZeRO-3 every frozen tower parameter is gathered into a fresh buffer before its module runs
and freed after; construction and loading do the same one module at a time. glibc serves a
request from an ``mmap`` of its own only above a threshold that it raises to the size of each
such block freed (up to 32 MiB), so after the first few gathers every buffer below that comes
from the heap, and the heap keeps what is freed in its middle. Measured on 2 CPU ranks, one
step of EVA02-L-14 under ZeRO-3: 1.1 GB resident above the rank's share afterwards, none of it
live. A fixed threshold turns the adjustment off: large buffers are mapped and unmapped, and the
resident size follows what is live.

The threshold is 1 MiB, and 128 KiB (glibc's own starting value) in a run whose tower is
sharded (ZeRO-3, :data:`SHARDED_THRESHOLD`), where memory is what is short. At 1 MiB the
activations of a small batch (a few hundred KiB each) and the freed pieces between them stay on
the heap: in two training steps of EVA02-E-14 on 2 CPU ranks (micro-batch 1, 56 px) the heap held
0.29-0.38 GB freed at the step's peak (the resident size grew 0.31 GB in a step while the heap's
live bytes stayed flat), and 0.05-0.10 GB at 128 KiB, which took 0.15 GB off the step's peak and
0.17 GB off construction's. Mapping every tensor of 128 KiB-1 MiB costs time, though: the
replicated default job (ZeRO-2, ViT-B on digits, 2 CPU ranks) took 100-106 s for 100 steps at
128 KiB against 70-87 s at 1 MiB, measured alternately.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: a tower parameter is larger, small tensors stay on the heap
SHARDED_THRESHOLD = 128 << 10  # glibc's starting value: also a small batch's activations are mapped
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own setting: when it is set, the user chose; leave it
MADV_DONTNEED = 4  # madvise advice (sys/mman.h)


@functools.cache
def libc() -> Any:
    """The C library, loaded once (``find_library`` runs a subprocess); None where it is missing."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Makes every allocation of at least ``threshold`` bytes a mapping of its own, returned to the
    system when freed (glibc only; elsewhere, or when ``MALLOC_MMAP_THRESHOLD_`` is set, nothing
    changes).

    Returns:
        Whether the setting was applied.
    """
    if os.environ.get(ENV):
        return False
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if ok:
        log.debug("allocations of %d bytes and more are mapped and returned when freed", threshold)
    return ok


def drop_file_pages(t: torch.Tensor) -> None:
    """Lets the kernel take back the pages of a read-only file mapping that ``t`` was read from (they
    stay in the page cache and fault in again if touched); a no-op where ``madvise`` is missing."""
    madvise = getattr(libc(), "madvise", None)
    if t.numel() == 0 or madvise is None:
        return
    page = mmap.PAGESIZE
    begin = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
    madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_DONTNEED)
