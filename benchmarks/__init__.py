"""Benchmarks: each prints ratios against a baseline measured in the same process (docs/performance.md)."""

from __future__ import annotations

import time

import torch

from sagsae.allocator import keep_freed_memory

FREED_MEMORY_KEPT = keep_freed_memory()  # as every `sagsae` command does (sagsae/allocator.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # every benchmark runs here


def device_name() -> str:
    """The device, and on CPU whether freed memory is kept (SAGSAE_KEEP_FREED_MEMORY=0 measures without)."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return "cpu, freed memory kept" if FREED_MEMORY_KEPT else "cpu, system malloc"


def synchronize() -> None:
    """Wait for the GPU's queued kernels, so that a clock read after it has seen them run."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def clock() -> float:
    """perf_counter once the device is idle."""
    synchronize()
    return time.perf_counter()
