"""Benchmarks: each prints ratios against a baseline measured in the same process (docs/performance.md)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


def alternating_medians(calls: dict[str, Callable[[], object]], rounds: int,
                        autocast: bool = False) -> dict[str, float]:
    """Median seconds of each call, the calls taken in turn round after round (after one warm-up each), so that the
    machine's drift and a stray slow call reach every figure alike; optionally under bf16 autocast."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        for call in calls.values():
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = clock()
                call()
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def add_step_shape_arguments(parser, repeats: str = "rounds") -> None:
    """--d_in, --width and --batch of one SAE step at the default config's shape, how many timed calls, and --json."""
    from pathlib import Path

    parser.add_argument("--d_in", type=int, default=576)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument(f"--{repeats}", type=int, default=8 if repeats == "rounds" else 5)
    parser.add_argument("--json", type=Path)
