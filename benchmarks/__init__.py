"""Benchmarks: each prints ratios against a baseline measured in the same process (docs/performance.md)."""

from __future__ import annotations

import time

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # every benchmark runs here


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def synchronize() -> None:
    """Wait for the GPU's queued kernels, so that a clock read after it has seen them run."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def clock() -> float:
    """perf_counter once the device is idle."""
    synchronize()
    return time.perf_counter()
