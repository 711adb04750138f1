"""Keep large freed CPU blocks in the process, so that each new [batch, width] tensor is not faulted in afresh.

A CPU training step allocates tens of [B, H] tensors (75 MB each at 4096 × 4608). glibc's malloc serves every
block above its mmap threshold (32 MiB at most, by its own rule) with a fresh mapping and unmaps it on free, so
the kernel zero-fills its pages again at first touch: on this project's machines an out-of-place product of two
such tensors took 32 ms, against 8 ms once the memory is reused and 3 ms in place. With the threshold at 1 GiB
(and the trim threshold at 2 GiB, so that free memory at the heap's top is kept too) such blocks come from the
heap and are reused. docs/performance.md ("The CPU allocator") has the steps measured both ways.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OFF_SWITCH = "SAGSAE_KEEP_FREED_MEMORY"  # "0": leave malloc as it is
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (<malloc.h>)
MMAP_THRESHOLD_BYTES = 2**30
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether it did. Not on other C libraries or
    systems, not with SAGSAE_KEEP_FREED_MEMORY=0, and not where the environment sets glibc's own MALLOC_*_
    variables or malloc tunables (someone chose the allocator's behaviour: benchmarks/memory.py does, to read live memory)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or os.environ.get(OFF_SWITCH) == "0":
        return False
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ) or \
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
