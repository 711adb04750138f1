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

bf16 in, bf16 out: given u in bf16 (an autocast matmul's output), the codes and gate codes come out in bf16, the
dtype the decode's matmul takes, and are kept in bf16 for the backward, with the same values as an fp32 chain whose
outputs autocast rounds. π, the gate, the thresholds' kernel band and every per-latent sum stay in fp32, so the
thresholds' gradients are the fp32 chain's, bit for bit (tests/test_gated_chain.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sagsae.saes.native_chain import native_chain_applies, native_gated_chain
from sagsae.saes.straight_through import bi_jump_threshold_grads, open_gate


def chain_forward(u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                  theta_neg: Tensor, sign_consistency: bool, soft: bool) -> tuple[Tensor, ...]:
    """The chain's values: (codes, gate codes, gate L1, π, the kept mask, the gate), the last three for backward.
    The codes are in u's dtype, computed in fp32 (the parameters') and rounded once; π and the L1 in fp32."""
    pi = u + b_gate  # fp32: b_gate is
    gate = open_gate(pi, theta_pos, theta_neg)
    codes = torch.addcmul(b_mag, u, log_rescale.exp())  # the magnitude, masked below
    keep = gate & ((pi > 0) == (codes > 0)) if sign_consistency else gate
    codes = codes.mul_(keep).to(u.dtype)
    # A closed side's θ may be infinite (Gated's θ⁻): `where` keeps π − (−∞) out of the closed entries.
    gate_codes = torch.where(gate, pi - torch.where(pi > 0, theta_pos, -theta_neg), 0) if soft else pi * gate
    gate_l1 = gate_codes.abs().sum(0)
    return codes, gate_codes.to(u.dtype), gate_l1, pi, keep, gate


def chain_backward(grad_codes: Tensor, grad_gate_codes: Tensor, grad_gate_l1: Tensor, pi: Tensor, codes: Tensor,
                   gate_codes: Tensor, keep: Tensor, gate: Tensor, log_rescale: Tensor, b_mag: Tensor,
                   theta_pos: Tensor, theta_neg: Tensor, bandwidth: float, soft: bool,
                   needs_pos: bool, needs_neg: bool) -> tuple[Tensor, ...]:
    """The chain's gradients for (u, b_gate, r, b_mag, θ⁺, θ⁻); a θ's gradient is per latent [H], None where not
    needed. u's gradient comes out in the codes' dtype; everything else is computed in fp32, as autocast would
    give an fp32 chain: incoming gradients widened, the one for u rounded at the end."""
    # The gate codes' whole gradient: the L1's part is sign(f)·g, zero where the gate is closed (f = 0, where |f|'s
    # subgradient is 0); the thresholds' kernels read the sum where the gate is closed too, as BiJump's backward
    # does, so the L1 reaches θ from the band's open side only (docs/method.md, "Loss and gradients").
    gate_grad = torch.addcmul(grad_gate_codes.float(), gate_codes.sgn(), grad_gate_l1)
    grad_u = gate_grad * gate
    grad_b_gate = grad_u.sum(0)
    kept_grad = grad_codes.float() * keep
    grad_u.addcmul_(kept_grad, log_rescale.exp())
    grad_b_mag = kept_grad.sum(0)
    # ∂/∂r = Σ_b g · exp(r) u = Σ_b g · (m − b_mag) over kept entries, where m is the code itself.
    grad_log_rescale = kept_grad.mul_(codes).sum(0) - b_mag * grad_b_mag
    grad_u = grad_u.to(codes.dtype)
    if soft:  # ∂(π − θ⁺)/∂θ⁺ = −1 where open above, ∂(π + θ⁻)/∂θ⁻ = +1 where open below
        grad_pos = -torch.where(gate & (pi > 0), gate_grad, 0).sum(0) if needs_pos else None
        grad_neg = torch.where(gate & (pi < 0), gate_grad, 0).sum(0) if needs_neg else None
    else:
        grad_pos, grad_neg = bi_jump_threshold_grads(pi, gate_grad, theta_pos, theta_neg, bandwidth,
                                                     needs_pos, needs_neg)
    return grad_u, grad_b_gate, grad_log_rescale, grad_b_mag, grad_pos, grad_neg


def traceable_chain(u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                    theta_neg: Tensor, bandwidth: float, sign_consistency: bool = True,
                    soft: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`gated_chain` as plain differentiable ops, for torch.compile to fuse forward and backward into a few loops
    (no autograd function for it to trace). BiJump's pseudo-derivatives for θ± are terms of value exactly zero,
    c · (θ − θ̄) with θ̄ = θ detached and c = −(θ̄/ε) K((π − θ̄)/ε) (the kernel band), so autograd derives them; the
    L1 then reaches θ from the band's open side only, as in `chain_backward`. Same values and gradients as the
    fused chain (tests/test_gated_chain.py)."""
    dtype = u.dtype if u.dtype in (torch.bfloat16, torch.float16) else torch.float32
    u = u.float()
    pi = u + b_gate.float()
    theta_pos, theta_neg = theta_pos.float(), theta_neg.float()
    gate = (pi > theta_pos) | (pi < -theta_neg)
    magnitude = torch.addcmul(b_mag.float(), u, log_rescale.float().exp())
    keep = gate & ((pi > 0) == (magnitude > 0)) if sign_consistency else gate
    codes = torch.where(keep, magnitude, 0)
    if soft:
        gate_codes = torch.where(gate, pi - torch.where(pi > 0, theta_pos, -theta_neg), 0)
    else:
        half = bandwidth / 2
        fixed_pos, fixed_neg = theta_pos.detach(), theta_neg.detach()
        band_pos = (pi > 0) & (pi > fixed_pos - half) & (pi < fixed_pos + half)
        band_neg = (pi < 0) & (-pi > fixed_neg - half) & (-pi < fixed_neg + half)
        # zero in value; ∂/∂θ⁺ = −(θ⁺/ε) K on the positive band, ∂/∂θ⁻ = +(θ⁻/ε) K on the negative one (a closed
        # side's θ is infinite and its band empty: `where` keeps ∞ − ∞ out of the sum)
        jump_pos = torch.where(band_pos, -fixed_pos / bandwidth * (theta_pos - fixed_pos), 0)
        jump_neg = torch.where(band_neg, fixed_neg / bandwidth * (theta_neg - fixed_neg), 0)
        gate_codes = torch.where(gate, pi, 0) + jump_pos + jump_neg
    gate_l1 = gate_codes.abs().sum(0)
    return codes.to(dtype), gate_codes.to(dtype), gate_l1


EAGER_BODIES = {"forward": chain_forward, "backward": chain_backward}
CHAIN_BODIES = dict(EAGER_BODIES)  # the bodies the autograd function runs: eager, or compiled by the switch below


def compiled_bodies() -> dict:
    """The chain's forward and backward bodies through `torch.compile` (inductor fuses each into a few kernels;
    the first call of each shape compiles, seconds to a minute)."""
    return {name: torch.compile(body, dynamic=False) for name, body in EAGER_BODIES.items()}


def compile_gated_chain(enabled: bool = True) -> None:
    """Run the chain compiled, or eagerly again with `enabled=False`: a switch for every Gated and SA-GSAE in the
    process."""
    CHAIN_BODIES.update(compiled_bodies() if enabled else EAGER_BODIES)


class _GatedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                theta_neg: Tensor, bandwidth: float, sign_consistency: bool,
                soft: bool) -> tuple[Tensor, Tensor, Tensor]:
        codes, gate_codes, gate_l1, pi, keep, gate = CHAIN_BODIES["forward"](
            u, b_gate, log_rescale, b_mag, theta_pos, theta_neg, sign_consistency, soft)
        ctx.save_for_backward(pi, codes, gate_codes, keep, gate, log_rescale, b_mag, theta_pos, theta_neg)
        ctx.bandwidth, ctx.soft = bandwidth, soft
        return codes, gate_codes, gate_l1

    @staticmethod
    def backward(ctx, grad_codes: Tensor, grad_gate_codes: Tensor, grad_gate_l1: Tensor):
        pi, codes, gate_codes, keep, gate, log_rescale, b_mag, theta_pos, theta_neg = ctx.saved_tensors
        needs_pos, needs_neg = ctx.needs_input_grad[4:6]
        grad_u, grad_b_gate, grad_log_rescale, grad_b_mag, grad_pos, grad_neg = CHAIN_BODIES["backward"](
            grad_codes, grad_gate_codes, grad_gate_l1, pi, codes, gate_codes, keep, gate, log_rescale, b_mag,
            theta_pos, theta_neg, ctx.bandwidth, ctx.soft, needs_pos, needs_neg)
        if ctx.soft:  # a scalar threshold takes the per-latent gradients' sum
            grad_pos, grad_neg = _sum_to(grad_pos, theta_pos, needs_pos), _sum_to(grad_neg, theta_neg, needs_neg)
        return grad_u, grad_b_gate, grad_log_rescale, grad_b_mag, grad_pos, grad_neg, None, None, None


def _sum_to(grad: Tensor | None, like: Tensor, needed: bool) -> Tensor | None:
    """A per-latent gradient [H] in `like`'s shape (a scalar threshold takes the sum); None where not needed."""
    if not needed:
        return None
    return grad if like.dim() else grad.sum()


def chain_input(u: Tensor) -> Tensor:
    """u as the chain takes it: bf16 and fp16 as they are (autocast's matmul output), anything else as fp32."""
    return u if u.dtype in (torch.bfloat16, torch.float16) else u.float()


def eager_gated_chain(u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                      theta_neg: Tensor, bandwidth: float, sign_consistency: bool = True,
                      soft: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`gated_chain` through the torch-op bodies above (eager, or compiled by `compile_gated_chain`), on any
    device and dtype."""
    return _GatedChain.apply(chain_input(u), b_gate.float(), log_rescale.float(), b_mag.float(), theta_pos.float(),
                             theta_neg.float(), bandwidth, sign_consistency, soft)


def gated_chain(u: Tensor, b_gate: Tensor, log_rescale: Tensor, b_mag: Tensor, theta_pos: Tensor,
                theta_neg: Tensor, bandwidth: float, sign_consistency: bool = True,
                soft: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, gate codes, gate codes' per-latent L1) of the chain above. The codes come out in u's dtype if that is
    bf16 or fp16 (else fp32); π, the thresholds' kernel band and the L1 are fp32 whatever u's dtype, as BiJump's
    (sagsae/saes/straight_through.py): the thresholds' kernel sums would be coarse in bf16. On CPU in fp32 or bf16
    the C++ kernel runs it (sagsae/saes/native_chain.py), unless `compile_gated_chain` asked for the compiled
    bodies; elsewhere the torch-op bodies."""
    u = chain_input(u)
    native = CHAIN_BODIES["forward"] is chain_forward and native_chain_applies(u)
    chain = native_gated_chain if native else eager_gated_chain
    return chain(u, b_gate.float(), log_rescale.float(), b_mag.float(), theta_pos.float(), theta_neg.float(),
                 bandwidth, sign_consistency, soft)
