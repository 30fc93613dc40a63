"""Freed host memory goes back to the system once ``return_freed_memory`` ran (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mosa_scale.host_memory import ENV, return_freed_memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator"
)

# Frees 40 blocks of 8 MiB that sat between long-lived 64 KiB tensors (as gathered tower
# parameters sit between activations and optimizer state), and prints how much stayed resident.
CHILD = r"""
import sys, torch
from mosa_scale.host_memory import return_freed_memory
if sys.argv[1] == "1":
    assert return_freed_memory()
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
t = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
del t  # glibc raises its mapping threshold to 8 MiB here unless it was fixed
base = anon()
big, small = [], []
for _ in range(40):
    big.append(torch.empty(8 << 20, dtype=torch.uint8).fill_(1))
    small.append(torch.empty(64 << 10, dtype=torch.uint8).fill_(1))
del big
print(anon() - base)
"""


def _retained(apply: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if apply else "0"], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_freed_blocks_are_returned():
    held = 40 * (64 << 10)
    # without the setting the heap keeps most of the 320 MiB freed between the small tensors
    assert _retained(apply=False) > 200 << 20
    # with it only the small tensors (2.5 MiB) and the allocator's bookkeeping stay
    assert _retained(apply=True) < held + (16 << 20)


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv(ENV, "65536")
    assert return_freed_memory() is False


# Which allocations get a mapping of their own: glibc's count of mapped bytes (mallinfo2) around
# eight 512 KiB tensors (the first may still fit in the heap's free top), after the threshold
# init_distributed sets and the tower construction of a run at ZeRO stage argv[1].
SIZES = r"""
import ctypes, sys
import torch
from mosa_scale.engine.deepspeed_engine import tower_shard
from mosa_scale.host_memory import return_freed_memory

class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
return_freed_memory()
shard = tower_shard({"zero_optimization": {"stage": int(sys.argv[1])}})
before = libc.mallinfo2().hblkhd
kept = [torch.empty(512 << 10, dtype=torch.uint8) for _ in range(8)]
mapped = libc.mallinfo2().hblkhd - before
print(shard is not None, mapped >= 6 * (512 << 10), mapped == 0)
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_a_sharded_tower_maps_smaller_tensors(stage):
    """1 MiB and up get their own mapping in every run; under ZeRO-3, where the tower is sharded
    because memory is short, from 128 KiB (a small batch's activations no longer stay on the heap)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run([sys.executable, "-c", SIZES, str(stage)], env=env, capture_output=True, text=True, check=True)
    sharded = stage == 3
    assert out.stdout.strip().splitlines()[-1].split() == [str(sharded), str(sharded), str(not sharded)]
