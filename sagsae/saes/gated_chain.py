"""The gated SAEs' elementwise chain as one autograd function (issue "Speed", item 3; docs/performance.md).

From u = W_gate x̃ to both paths' codes, Gated and SA-GSAE run the same chain: π = u + b_gate; a gate opens
where π > θ⁺ or π < −θ⁻ (Gated: θ⁺ = 0, θ⁻ = ∞); the magnitude m = exp(r) u + b_mag is kept where the gate is
open and m has π's sign (Gated's ReLU is that rule on its one-sided gate); the gate path's code is π where the
gate is open (BiJump_θ(π)) or, with `soft`, its excess over the threshold, sign(π)·(|π| − θ^sign(π)) (SA-GSAE's
default gate path; Gated's ReLU(π) is either form at θ⁺ = 0). Composed of separate torch ops, autograd keeps each
intermediate and its backward passes over [B, H] about a dozen times; this function keeps π, the codes and two
masks, and its backward makes four passes plus the threshold kernels. It also returns the gate codes' per-latent
L1 Σ_b |π_b| (open gates), from which the sparsity term is a product with the decoder norms, so that term costs
no [B, H] pass of its own in either direction.

Exactly the composed form's values and gradients (tests/test_gated_chain.py), including the thresholds'
rectangle-kernel pseudo-derivatives of BiJump (sagsae/saes/straight_through.py), or the soft path's ordinary ones. It
needs r tied across the two signs and a gate path that does not train θ through the main reconstruction; the SAEs
use the composed form otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sagsae.saes.straight_through import bi_jump_threshold_grads, open_gate


class _GatedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                theta_neg: Tensor, bandwidth: float, sign_consistency: bool,
                soft: bool) -> tuple[Tensor, Tensor, Tensor]:
        pi = u + b_gate
        gate = open_gate(pi, theta_pos, theta_neg)
        codes = torch.addcmul(b_mag, u, log_rescale.exp())  # the magnitude, masked in place below
        keep = gate & ((pi > 0) == (codes > 0)) if sign_consistency else gate
        codes.mul_(keep)
        # A closed side's θ may be infinite (Gated's θ⁻): `where` keeps π − (−∞) out of the closed entries.
        gate_codes = torch.where(gate, pi - torch.where(pi > 0, theta_pos, -theta_neg), 0) if soft else pi * gate
        gate_l1 = gate_codes.abs().sum(0)
        ctx.save_for_backward(pi, codes, gate_codes, keep, gate, log_rescale, b_mag, theta_pos, theta_neg)
        ctx.bandwidth, ctx.soft = bandwidth, soft
        return codes, gate_codes, gate_l1

    @staticmethod
    def backward(ctx, grad_codes: Tensor, grad_gate_codes: Tensor, grad_gate_l1: Tensor):
        pi, codes, gate_codes, keep, gate, log_rescale, b_mag, theta_pos, theta_neg = ctx.saved_tensors
        # The gate codes' whole gradient: the L1's part is sign(f)·g, zero where the gate is closed (f = 0, where
        # |f|'s subgradient is 0); the thresholds' kernels read the sum where the gate is closed too, as BiJump's
        # backward does, so the L1 reaches θ from the band's open side only (docs/method.md, "Loss and gradients").
        gate_grad = torch.addcmul(grad_gate_codes, gate_codes.sgn(), grad_gate_l1)
        grad_u = gate_grad * gate
        grad_b_gate = grad_u.sum(0)
        kept_grad = grad_codes * keep
        grad_u.addcmul_(kept_grad, log_rescale.exp())
        grad_b_mag = kept_grad.sum(0)
        # ∂/∂r = Σ_b g · exp(r) u = Σ_b g · (m − b_mag) over kept entries, where m is the code itself.
        grad_log_rescale = kept_grad.mul_(codes).sum(0) - b_mag * grad_b_mag
        if ctx.soft:  # ∂(π − θ⁺)/∂θ⁺ = −1 where open above, ∂(π + θ⁻)/∂θ⁻ = +1 where open below
            grad_pos = _sum_to(-torch.where(gate & (pi > 0), gate_grad, 0).sum(0), theta_pos, ctx.needs_input_grad[4])
            grad_neg = _sum_to(torch.where(gate & (pi < 0), gate_grad, 0).sum(0), theta_neg, ctx.needs_input_grad[5])
        else:
            grad_pos, grad_neg = bi_jump_threshold_grads(pi, gate_grad, theta_pos, theta_neg, ctx.bandwidth,
                                                         *ctx.needs_input_grad[4:6])
        return grad_u, grad_b_gate, grad_log_rescale, grad_b_mag, grad_pos, grad_neg, None, None, None


def _sum_to(grad: Tensor, like: Tensor, needed: bool) -> Tensor | None:
    """A per-latent gradient [H] in `like`'s shape (a scalar threshold takes the sum); None where not needed."""
    if not needed:
        return None
    return grad if like.dim() else grad.sum()


def gated_chain(u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                theta_neg: Tensor, bandwidth: float, sign_consistency: bool = True,
                soft: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, gate codes, gate codes' per-latent L1) of the chain above; in fp32 whatever u's dtype, as BiJump
    (sagsae/saes/straight_through.py): the thresholds' kernel sums would be coarse in bf16."""
    return _GatedChain.apply(u.float(), b_gate.float(), log_rescale.float(), b_mag.float(), theta_pos.float(),
                             theta_neg.float(), bandwidth, sign_consistency, soft)
