"""Jump activations with straight-through pseudo-derivatives for their thresholds (SPEC §3).

A Heaviside step has zero gradient almost everywhere, so thresholds could never learn. As in JumpReLU
(arXiv 2407.14435) we replace dH(t)/dt by a rectangle kernel K(t) = 1[|t| < 1/2] of bandwidth ε, but only
for the threshold; the input's gradient stays the exact one (the gate itself, or zero for a bare step).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rectangle_kernel(t: Tensor) -> Tensor:
    """K(t) = 1[|t| < 1/2], the JumpReLU pseudo-derivative kernel."""
    return (t.abs() < 0.5).to(t.dtype)


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to a per-latent parameter's shape."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


class _TwoSidedStep(torch.autograd.Function):
    """g = H(z − θ⁺) + H(−z − θ⁻); no gradient to z, rectangle-kernel gradient to θ±."""

    @staticmethod
    def forward(ctx, z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta_pos, theta_neg)
        ctx.bandwidth = bandwidth
        return ((z > theta_pos) | (-z > theta_neg)).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta_pos, theta_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pos = -grad * rectangle_kernel((z - theta_pos) / eps) / eps
        grad_neg = -grad * rectangle_kernel((-z - theta_neg) / eps) / eps
        return None, _sum_to_shape(grad_pos, theta_pos.shape), _sum_to_shape(grad_neg, theta_neg.shape), None


class _BiJumpReLU(torch.autograd.Function):
    """BiJump_θ(z) = z · [H(z − θ⁺) + H(−z − θ⁻)] with the pseudo-derivatives of SPEC §3."""

    @staticmethod
    def forward(ctx, z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
        gate = ((z > theta_pos) | (-z > theta_neg)).to(z.dtype)
        ctx.save_for_backward(z, theta_pos, theta_neg, gate)
        ctx.bandwidth = bandwidth
        return z * gate

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta_pos, theta_neg, gate = ctx.saved_tensors
        eps = ctx.bandwidth
        # z > 0: ∂/∂θ⁺ = −(θ⁺/ε) K((z − θ⁺)/ε);  z < 0: ∂/∂θ⁻ = +(θ⁻/ε) K((−z − θ⁻)/ε).
        grad_pos = -grad * (z > 0) * theta_pos / eps * rectangle_kernel((z - theta_pos) / eps)
        grad_neg = grad * (z < 0) * theta_neg / eps * rectangle_kernel((-z - theta_neg) / eps)
        return grad * gate, _sum_to_shape(grad_pos, theta_pos.shape), _sum_to_shape(grad_neg, theta_neg.shape), None


def two_sided_step(z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
    """Two-sided gate H(z − θ⁺) + H(−z − θ⁻) (0 or 1: θ± > 0 makes the two sides disjoint)."""
    return _TwoSidedStep.apply(z, theta_pos, theta_neg, bandwidth)


def bi_jump_relu(z: Tensor, theta_pos: Tensor, theta_neg: Tensor, bandwidth: float) -> Tensor:
    """Bi-Jump-ReLU: keeps z where z > θ⁺ or z < −θ⁻, zero in between."""
    return _BiJumpReLU.apply(z, theta_pos, theta_neg, bandwidth)


def two_sided_soft_threshold(z: Tensor, theta_pos: Tensor, theta_neg: Tensor) -> Tensor:
    """sign(z)·ReLU(|z| − θ^sign(z)): the soft-threshold gate path, whose θ gradient is an ordinary one."""
    return torch.relu(z - theta_pos) - torch.relu(-z - theta_neg)
