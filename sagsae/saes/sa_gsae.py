"""Sign-Aware Gated SAE (SA-GSAE) with the Bi-Jump-ReLU activation — our formulation, SPEC §2–3.

One latent carries both signs of one decoder direction: a two-sided gate opens on π > θ⁺ or π < −θ⁻, and a
signed magnitude path (sharing W_gate, no ReLU) gives the code's value, so the sparsity penalty, which lives
on the gate path only, never shrinks it. The auxiliary reconstruction through the gate path (form (b):
decoder live, decoder-norm-weighted sparsity) keeps the gates from collapsing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from sagsae.saes.base import SAELoss, SparseAutoencoder, register, squared_error
from sagsae.straight_through import bi_jump_relu, open_gate, two_sided_soft_threshold, two_sided_step

GatePath = Literal["jump", "soft"]


def default_jump_scale(d_in: int) -> float:
    """JumpReLU's θ_init = ε = 1e-3 at E‖x‖² = 1 becomes 1e-3·√d at our E‖x‖² = d (SPEC §3)."""
    return 1e-3 * math.sqrt(d_in)


@register("sagsae")
class SignAwareGatedSAE(SparseAutoencoder):
    """SA-GSAE(H). Tied r⁺ = r⁻ and θ⁺ = θ⁻ by default (the paper's recommended symmetric variant)."""

    def __init__(
        self,
        d_in: int,
        width: int,
        tie_r: bool = True,
        tie_theta: bool = True,
        sign_consistency: bool = True,
        aux_weight: float = 1.0,
        gate_path: GatePath = "jump",
        recon_trains_theta: bool = False,
        log_theta: bool = False,
        theta_init: float | None = None,
        bandwidth: float | None = None,
        theta_floor: float = 1e-6,
    ) -> None:
        super().__init__(d_in, width)
        if gate_path not in ("jump", "soft"):
            raise ValueError(f"gate_path must be 'jump' or 'soft', got {gate_path!r}")
        self.tie_r, self.tie_theta, self.log_theta = tie_r, tie_theta, log_theta
        self.sign_consistency = sign_consistency
        self.aux_weight = aux_weight
        self.gate_path = gate_path
        self.recon_trains_theta = recon_trains_theta
        self.theta_init = default_jump_scale(d_in) if theta_init is None else theta_init
        self.bandwidth = default_jump_scale(d_in) if bandwidth is None else bandwidth
        self.theta_floor = theta_floor
        if self.theta_init <= theta_floor:
            raise ValueError(f"theta_init ({self.theta_init}) must exceed theta_floor ({theta_floor})")

        decoder = torch.randn(d_in, width)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_gate = nn.Parameter(decoder.T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.b_gate = nn.Parameter(torch.zeros(width))
        self.b_mag = nn.Parameter(torch.zeros(width))
        for name in ("r",) if tie_r else ("r_pos", "r_neg"):
            self.register_parameter(name, nn.Parameter(torch.zeros(width)))
        stored_init = math.log(self.theta_init) if log_theta else self.theta_init
        for name in self._threshold_names():
            self.register_parameter(name, nn.Parameter(torch.full((width,), stored_init)))

    def _threshold_names(self) -> tuple[str, ...]:
        stem = "log_threshold" if self.log_theta else "threshold"
        return (stem,) if self.tie_theta else (f"{stem}_pos", f"{stem}_neg")

    def thresholds(self) -> tuple[Tensor, Tensor]:
        """(θ⁺, θ⁻); the same tensor twice when tied, so both sides' gradients add up on one parameter."""
        stored = [getattr(self, name) for name in self._threshold_names()]
        values = [s.exp() for s in stored] if self.log_theta else stored
        return (values[0], values[0]) if self.tie_theta else (values[0], values[1])

    def magnitude_rescales(self) -> tuple[Tensor, Tensor]:
        """(r⁺, r⁻), the per-latent log-rescales of the magnitude path."""
        return (self.r, self.r) if self.tie_r else (self.r_pos, self.r_neg)

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u = W_gate (x − b_dec) and π = u + b_gate."""
        u = (x - self.b_dec) @ self.W_gate.T
        return u, u + self.b_gate

    def _code(self, u: Tensor, pi: Tensor) -> Tensor:
        """f = g · m with m = exp(r^{sign π}) u + b_mag; zero where m opposes the gate's polarity.

        The gate passes no gradient to π; it reaches θ (rectangle kernel) only with `recon_trains_theta`.
        """
        r_pos, r_neg = self.magnitude_rescales()
        rescale = r_pos.exp() if self.tie_r else torch.where(pi > 0, r_pos, r_neg).exp()
        magnitude = rescale * u + self.b_mag
        if self.sign_consistency:
            magnitude = torch.where((pi > 0) == (magnitude > 0), magnitude, 0)
        theta_pos, theta_neg = self.thresholds()
        if self.recon_trains_theta:  # the gate's θ pseudo-derivative sees the magnitude it switches
            return magnitude * two_sided_step(pi, theta_pos, theta_neg, self.bandwidth)
        return torch.where(open_gate(pi, theta_pos.detach(), theta_neg.detach()), magnitude, 0)

    def gate_activation(self, pi: Tensor) -> Tensor:
        """The gate path's code, BiJump_θ(π) (or the soft-threshold switch), used by sparsity and aux terms."""
        theta_pos, theta_neg = self.thresholds()
        if self.gate_path == "soft":
            return two_sided_soft_threshold(pi, theta_pos, theta_neg)
        return bi_jump_relu(pi, theta_pos, theta_neg, self.bandwidth)

    def encode(self, x: Tensor) -> Tensor:
        self.check_input(x)
        u, pi = self._paths(x)
        return self._code(u, pi)

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec.T + self.b_dec

    def loss(self, x: Tensor, sparsity_coefficient: float) -> SAELoss:
        self.check_input(x)
        u, pi = self._paths(x)
        codes = self._code(u, pi)
        x_hat = self.decode(codes)
        gate_codes = self.gate_activation(pi)
        gate_x_hat = self.decode(gate_codes)
        decoder_norms = self.W_dec.norm(dim=0)
        sparsity = (gate_codes.abs() @ decoder_norms).mean()
        terms = {
            "recon": squared_error(x, x_hat),
            "sparsity": sparsity_coefficient * sparsity,
            "aux": self.aux_weight * squared_error(x, gate_x_hat),
        }
        return SAELoss(sum(terms.values()), terms, codes, x_hat, gate_reconstruction=gate_x_hat)

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        self.b_dec.copy_(x.mean(0))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.log_theta:
            for name in self._threshold_names():
                getattr(self, name).clamp_(min=self.theta_floor)

    @torch.no_grad()
    def reset_dead(self, dead: Tensor) -> None:
        """Dead-latent threshold reset (SPEC §3): a latent silent for a whole window gets θ_init back."""
        stored_init = math.log(self.theta_init) if self.log_theta else self.theta_init
        for name in self._threshold_names():
            getattr(self, name)[dead] = stored_init
