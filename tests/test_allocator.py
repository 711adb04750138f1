"""sagsae/allocator.py: with glibc, a large tensor comes from the heap (kept after free) instead of its own mapping."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt's thresholds are glibc's (Linux)")

HEAP_GROWTH_FROM_A_LARGE_TENSOR = """
import torch
from sagsae.allocator import keep_freed_memory


def heap_bytes():
    total = 0
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            total += end - start
    return total


applied = keep_freed_memory()
before = heap_bytes()  # what importing torch left there (about 90 MB for the CPU wheel, 125 MB for the CUDA one)
block = torch.ones(25_000_000)  # 100 MB, above glibc's largest dynamic mmap threshold (32 MiB)
print(applied, heap_bytes() - before)
"""


def heap_growth_from_a_large_tensor(**env: str) -> tuple[bool, int]:
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith("MALLOC_") and name not in ("GLIBC_TUNABLES", "SAGSAE_KEEP_FREED_MEMORY")}
    out = subprocess.run([sys.executable, "-c", HEAP_GROWTH_FROM_A_LARGE_TENSOR], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_a_large_tensor_lives_on_the_heap_only_when_freed_memory_is_kept():
    applied, growth = heap_growth_from_a_large_tensor()
    assert applied and growth >= 90_000_000  # the heap may already hold a few MB free at its top
    for env in ({"SAGSAE_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}):
        applied, growth = heap_growth_from_a_large_tensor(**env)
        assert not applied and growth < 10_000_000, f"with {env} the system's malloc decides"
