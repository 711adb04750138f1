"""The gated chain as a C++/OpenMP kernel for CPU (native_chain.cpp): one pass over [B, H] forward, one backward.

The eager chain (sagsae/saes/gated_chain.py) keeps π, both codes and two masks and makes several passes each way;
this one keeps only u and recomputes the rest, so it moves what the chain must move and little more
(benchmarks/chain_floor.py). Same values and gradients as the eager chain (tests/test_native_chain.py).

The kernel compiles on first use (about 40 s, cached by torch under ~/.cache/torch_extensions). Where it cannot
build (no C++ compiler or ninja), `native_module` warns once, and the eager chain runs instead.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_chain.cpp")
DTYPES = (torch.float32, torch.bfloat16)  # what the kernel stores; fp16 runs the eager chain


@functools.cache
def native_module() -> ModuleType | None:
    """The compiled kernel, or None (with one warning that says why) where it does not build."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()  # the cache's name carries it: no stale build elsewhere
    vector_flags = ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []
    try:
        return cpp_extension.load_inline(
            name=f"sagsae_native_chain_{capability.lower()}", cpp_sources=[SOURCE.read_text()],
            functions=["chain_forward", "chain_backward"],
            extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp", *vector_flags], extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler or ninja surfaces as several exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"The C++ gated chain did not build ({first_line}); the gated SAEs run the eager chain, "
                      f"5-11x slower in that part of the step (benchmarks/chain_floor.py). Install a C++ "
                      f"compiler and ninja to use it.", stacklevel=2)
        return None


def native_chain_available() -> bool:
    return native_module() is not None


def native_chain_applies(u: Tensor) -> bool:
    """Whether `native_gated_chain` takes this u: a [B, H] batch on CPU, in fp32 or bf16, where the kernel built."""
    return u.device.type == "cpu" and u.dim() == 2 and u.dtype in DTYPES and native_chain_available()


def per_latent(value: Tensor, width: int) -> Tensor:
    """A per-latent parameter (or a scalar threshold) as the contiguous fp32 [H] the kernel reads."""
    return value.detach().float().expand(width).contiguous()


class _NativeGatedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                theta_neg: Tensor, bandwidth: float, sign_consistency: bool,
                soft: bool) -> tuple[Tensor, Tensor, Tensor]:
        width = u.shape[-1]
        rows = u.contiguous()
        parameters = [per_latent(b_gate, width), per_latent(log_rescale, width).exp(), per_latent(b_mag, width),
                      per_latent(theta_pos, width), per_latent(theta_neg, width)]
        codes, gate_codes, gate_l1 = native_module().chain_forward(rows, *parameters, sign_consistency, soft)
        ctx.save_for_backward(rows, *parameters)
        ctx.threshold_shapes = theta_pos.shape, theta_neg.shape
        ctx.bandwidth, ctx.sign_consistency, ctx.soft = bandwidth, sign_consistency, soft
        return codes, gate_codes, gate_l1

    @staticmethod
    def backward(ctx, grad_codes: Tensor, grad_gate_codes: Tensor, grad_gate_l1: Tensor):
        rows, b_gate, rescale, b_mag, theta_pos, theta_neg = ctx.saved_tensors

        def as_rows(grad: Tensor) -> Tensor:
            return grad.to(rows.dtype).contiguous()

        grad_u, grad_b_gate, grad_b_mag, rescaled, pos_sum, neg_sum = native_module().chain_backward(
            as_rows(grad_codes), as_rows(grad_gate_codes), grad_gate_l1.float().contiguous(), rows, b_gate, rescale,
            b_mag, theta_pos, theta_neg, ctx.bandwidth, ctx.sign_consistency, ctx.soft)
        # ∂/∂r = Σ_b g · exp(r) u = Σ_b g · (m − b_mag) over kept entries, where m is the code itself.
        grad_log_rescale = rescaled - b_mag * grad_b_mag
        needs_pos, needs_neg = ctx.needs_input_grad[4:6]
        if ctx.soft:  # ∂(π − θ⁺)/∂θ⁺ = −1 where open above, ∂(π + θ⁻)/∂θ⁻ = +1 where open below
            grad_pos, grad_neg = -pos_sum, neg_sum
        else:  # BiJump's rectangle kernel: −(θ⁺/ε) Σ_band g and +(θ⁻/ε) Σ_band g (docs/method.md)
            grad_pos, grad_neg = -theta_pos / ctx.bandwidth * pos_sum, theta_neg / ctx.bandwidth * neg_sum
        shape_pos, shape_neg = ctx.threshold_shapes
        return (grad_u, grad_b_gate, grad_log_rescale, grad_b_mag,
                _shaped(grad_pos, shape_pos, needs_pos), _shaped(grad_neg, shape_neg, needs_neg),
                None, None, None)


def _shaped(grad: Tensor, shape: torch.Size, needed: bool) -> Tensor | None:
    """A threshold's per-latent gradient in its own shape (a scalar takes the sum); None where not needed (an
    unused side's θ may be infinite, where θ/ε · 0 is NaN)."""
    if not needed:
        return None
    return grad.reshape(shape) if len(shape) else grad.sum()


def native_gated_chain(u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                       theta_neg: Tensor, bandwidth: float, sign_consistency: bool = True,
                       soft: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`gated_chain`'s (codes, gate codes, per-latent L1 of the gate codes) from the C++ kernel; u a [B, H] batch in
    fp32 or bf16 on CPU (`native_chain_applies`)."""
    return _NativeGatedChain.apply(u, b_gate, log_rescale, b_mag, theta_pos, theta_neg, bandwidth,
                                   sign_consistency, soft)
