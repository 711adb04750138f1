"""Jump activations with straight-through pseudo-derivatives for their thresholds (docs/method.md).

A Heaviside step has zero gradient almost everywhere, so thresholds could never learn. As in JumpReLU
(arXiv 2407.14435) we replace dH(t)/dt by a rectangle kernel K(t) = 1[|t| < 1/2] of bandwidth ε, but only
for the threshold; the input's gradient stays the exact one (the gate itself, or zero for a bare step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_jump_scale(d_in: int) -> float:
    """JumpReLU's θ_init = ε = 1e-3 at E‖x‖² = 1 becomes 1e-3·√d at our E‖x‖² = d (docs/method.md)."""
    return 1e-3 * math.sqrt(d_in)


def open_gate(z: Tensor, theta_pos: Tensor, theta_neg: Tensor) -> Tensor:
    """Boolean two-sided gate: z > θ⁺ or z < −θ⁻."""
    return (z > theta_pos) | (z < -theta_neg)


def _band(z: Tensor, center: Tensor, bandwidth: float) -> Tensor:
    """Where the rectangle kernel is on: K((z − center)/ε) = 1[|z − center| < ε/2]."""
    half = bandwidth / 2
    return (z > center - half) & (z < center + half)


def _kernel_sum(z: Tensor, grad: Tensor, center: Tensor, bandwidth: float, side: Tensor | None = None) -> Tensor:
    """Σ_batch grad · K((z − center)/ε), K(t) = 1[|t| < ½], per latent (z is [..., H]); only where `side`."""
    band = _band(z, center, bandwidth)
    if side is not None:
        band &= side
    return torch.where(band, grad, 0).reshape(-1, z.shape[-1]).sum(0)


def _threshold_grad(grad: Tensor | None, like: Tensor) -> Tensor | None:
    """Per-latent gradient [H] (or a scalar threshold's sum); None where no gradient is needed.

    Thresholds that need none may be infinite (a one-sided gate), where θ/ε · 0 would give NaN."""
    if grad is None:
        return None
    return grad.reshape(like.shape) if like.dim() else grad.sum()


class _TwoSidedStep(torch.autograd.Function):
    """g = H(z − θ⁺) + H(−z − θ⁻); no gradient to z, rectangle-kernel gradient to θ±."""

    @staticmethod
    def forward(ctx, z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta_pos, theta_neg)
        ctx.bandwidth = bandwidth
        return open_gate(z, theta_pos, theta_neg).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta_pos, theta_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        # ∂H(z − θ⁺)/∂θ⁺ = −K((z − θ⁺)/ε)/ε;  ∂H(−z − θ⁻)/∂θ⁻ = −K((−z − θ⁻)/ε)/ε.
        grad_pos = -_kernel_sum(z, grad, theta_pos, eps) / eps if ctx.needs_input_grad[1] else None
        grad_neg = -_kernel_sum(z, grad, -theta_neg, eps) / eps if ctx.needs_input_grad[2] else None
        return None, _threshold_grad(grad_pos, theta_pos), _threshold_grad(grad_neg, theta_neg), None


class _BiJumpReLU(torch.autograd.Function):
    """BiJump_θ(z) = z · [H(z − θ⁺) + H(−z − θ⁻)] with the pseudo-derivatives of docs/method.md."""

    @staticmethod
    def forward(ctx, z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
        gate = open_gate(z, theta_pos, theta_neg)
        ctx.save_for_backward(z, theta_pos, theta_neg, gate)
        ctx.bandwidth = bandwidth
        return torch.where(gate, z, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta_pos, theta_neg, gate = ctx.saved_tensors
        grad_pos, grad_neg = bi_jump_threshold_grads(z, grad, theta_pos, theta_neg, ctx.bandwidth,
                                                     *ctx.needs_input_grad[1:3])
        return torch.where(gate, grad, 0), grad_pos, grad_neg, None


def bi_jump_threshold_grads(z: Tensor, grad: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float,
                            needs_pos: bool = True, needs_neg: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """BiJump_θ(z)'s pseudo-derivatives for θ±, given the gradient `grad` of its output (also where the gate is
    closed): z > 0: ∂/∂θ⁺ = −(θ⁺/ε) K((z − θ⁺)/ε); z < 0: ∂/∂θ⁻ = +(θ⁻/ε) K((−z − θ⁻)/ε). θ/ε is per latent, so it
    multiplies after the batch sum. None for a side whose gradient is not needed. Shared with the fused gated
    chain (sagsae/saes/gated_chain.py)."""
    eps = bandwidth
    grad_pos = -theta_pos / eps * _kernel_sum(z, grad, theta_pos, eps, side=z > 0) if needs_pos else None
    grad_neg = theta_neg / eps * _kernel_sum(z, grad, -theta_neg, eps, side=z < 0) if needs_neg else None
    return _threshold_grad(grad_pos, theta_pos), _threshold_grad(grad_neg, theta_neg)


class _JumpReLUWithCounts(torch.autograd.Function):
    """JumpReLU_θ(z) = z · H(z − θ) and each latent's firing count Σ_batch H(z − θ), from one gate: JumpReLU's
    codes and its L0 penalty. Composed, `bi_jump_relu` and `two_sided_step` each build the gate, and each
    backward scans the kernel's band again; here the band is found once for both pseudo-derivatives,
    ∂/∂θ = −(θ/ε) Σ_{z > 0} g K((z − θ)/ε) for the codes and −(1/ε) Σ K((z − θ)/ε) per count."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        gate = z > theta
        ctx.save_for_backward(z, theta, gate)
        ctx.bandwidth = bandwidth
        counts = gate.reshape(-1, z.shape[-1]).sum(0, dtype=z.dtype)
        return torch.where(gate, z, 0), counts

    @staticmethod
    def backward(ctx, grad_codes: Tensor, grad_counts: Tensor):
        z, theta, gate = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            eps = ctx.bandwidth
            band = _band(z, theta, eps)
            band_count = band.reshape(-1, z.shape[-1]).sum(0, dtype=z.dtype)
            band_grad = torch.where(band & (z > 0), grad_codes, 0).reshape(-1, z.shape[-1]).sum(0)
            grad_theta = _threshold_grad(-(theta * band_grad + grad_counts * band_count) / eps, theta)
        return torch.where(gate, grad_codes, 0), grad_theta, None


def jump_relu_with_counts(z: Tensor, theta: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """(JumpReLU_θ(z), per-latent firing counts [H]) in one pass, with BiJump's one-sided pseudo-derivatives: the
    same values and gradients as `bi_jump_relu(z, θ, ∞, ε)` and `two_sided_step(z, θ, ∞, ε).sum(0)`
    (tests/test_sagsae_math.py). In fp32 whatever z's dtype, as those."""
    return _JumpReLUWithCounts.apply(z.float(), theta.float(), bandwidth)


def two_sided_step(z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
    """Two-sided gate H(z − θ⁺) + H(−z − θ⁻) (0 or 1: θ± > 0 makes the two sides disjoint). In fp32 whatever z's
    dtype (bf16 under mixed precision): the band of width ε and the threshold's kernel sum over the batch would
    be coarse in bf16."""
    return _TwoSidedStep.apply(z.float(), theta_pos.float(), theta_neg.float(), bandwidth)


def bi_jump_relu(z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
    """Bi-Jump-ReLU: keeps z where z > θ⁺ or z < −θ⁻, zero in between; in fp32, as `two_sided_step`."""
    return _BiJumpReLU.apply(z.float(), theta_pos.float(), theta_neg.float(), bandwidth)


def two_sided_soft_threshold(z: Tensor, theta_pos: Tensor, theta_neg: Tensor) -> Tensor:
    """sign(z)·ReLU(|z| − θ^sign(z)): the soft-threshold gate path, whose θ gradient is an ordinary one."""
    return torch.relu(z - theta_pos) - torch.relu(-z - theta_neg)
