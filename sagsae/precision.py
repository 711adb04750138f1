"""The training precision `fit` takes when a config leaves `trainer.precision` unset: bf16-mixed where the hardware
runs bf16 matmuls fast, fp32 elsewhere (docs/performance.md, "Mixed precision"). torch alone, no Lightning."""

from __future__ import annotations

import torch

# CPU features with bf16 matmul instructions, and torch's probe for each (absent probes count as absent features)
CPU_BF16_FEATURES = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
# NVIDIA GPUs with bf16 tensor cores: Ampere (compute capability 8.0) and later
CUDA_BF16_CAPABILITY = (8, 0)


def accelerator_device_type(accelerator: str) -> str:
    """The device type that Lightning's `accelerator` setting trains on: "cuda", "mps" or "cpu"."""
    if accelerator in ("cuda", "gpu"):
        return "mps" if not torch.cuda.is_available() and torch.backends.mps.is_available() else "cuda"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return accelerator


def fast_bf16(device_type: str) -> str | None:
    """What makes bf16 fast on this device type (for the message), or None where it would be emulated or slow."""
    if device_type == "cuda" and torch.cuda.is_available():
        if torch.cuda.get_device_capability() >= CUDA_BF16_CAPABILITY:
            return f"{torch.cuda.get_device_name()} has bf16 tensor cores"
        return None
    if device_type == "cpu":
        features = [name for name, probe in CPU_BF16_FEATURES if getattr(torch.cpu, probe, lambda: False)()]
        return f"this CPU has {' and '.join(features)}" if features else None
    return None


def automatic_precision(device_type: str) -> tuple[str, str]:
    """Lightning's precision for an unset `trainer.precision`, and why."""
    reason = fast_bf16(device_type)
    if reason:
        return "bf16-mixed", reason
    return "32-true", f"no fast bf16 on {device_type}"
