"""Gated SAE (arXiv 2404.16014, docs/method.md): a Heaviside gate on π = W_gate x̃ + b_gate, a rescaled magnitude
path exp(r_mag) ⊙ W_gate x̃ + b_mag, and an auxiliary reconstruction through ReLU(π)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sagsae.saes.base import check_init_quantile, register
from sagsae.saes.gated_paths import GatedPathsSAE


@register("gated")
class GatedSparseAutoencoder(GatedPathsSAE):
    """Gated SAE.

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        aux_weight: weight of the gate path's auxiliary reconstruction.
        unit_norm_decoder: decoder form (a) of docs/method.md: unit-norm decoder, plain L1, frozen decoder in the
            aux term; the default form (b) weights L1 by decoder norms with the decoder live in the aux term.
        gate_init_quantile: start b_gate at minus this quantile of each u on the first batch (None = 0).
    """

    OPEN_ABOVE_ZERO, NEVER_BELOW = torch.tensor(0.0), torch.tensor(math.inf)  # the gate π > 0 as (θ⁺, θ⁻)
    saelens_tensors = {"W_enc": "W_gate", "b_gate": "b_gate", "r_mag": "r_mag", "b_mag": "b_mag",
                       "W_dec": "W_dec", "b_dec": "b_dec"}

    def __init__(self, d_in: int, width: int, aux_weight: float = 1.0, unit_norm_decoder: bool = False,
                 gate_init_quantile: float | None = None) -> None:
        super().__init__(d_in, width, aux_weight, unit_norm_decoder)
        check_init_quantile("gate_init_quantile", gate_init_quantile)
        self.gate_init_quantile = gate_init_quantile
        self.r_mag = nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        """b_dec = the batch mean; with `gate_init_quantile` q, b_gate = −(the q-quantile of each u), so each gate
        opens on about 1 − q of the first batch: SA-GSAE's `theta_init_quantile` for a one-sided gate, so that
        the two can be compared with the same start."""
        super().initialize_from_batch(x)
        if self.gate_init_quantile is not None:
            self.b_gate.copy_(-self.column_quantile(self.paths(x)[0], self.gate_init_quantile))

    def threshold_values(self) -> Tensor:
        """The gate opens where u > −b_gate: −b_gate is its threshold on u."""
        return -self.b_gate.detach()

    def threshold_parameters(self) -> list[nn.Parameter]:
        return [self.b_gate]

    def codes_from_paths(self, u: Tensor, pi: Tensor) -> Tensor:
        """H(π) ⊙ ReLU(exp(r_mag) u + b_mag); the gate passes no gradient."""
        return torch.where(pi > 0, torch.relu(self.r_mag.exp() * u + self.b_mag), 0)

    def gate_activation(self, pi: Tensor) -> Tensor:
        return torch.relu(pi)

    def fused_chain_arguments(self) -> dict[str, Any]:
        """The gate π > 0 is the two-sided gate with θ⁺ = 0 and θ⁻ = ∞, and ReLU on the magnitude is the chain's
        sign-consistency rule on it."""
        return {"log_rescale": self.r_mag, "b_mag": self.b_mag, "theta_pos": self.OPEN_ABOVE_ZERO,
                "theta_neg": self.NEVER_BELOW, "bandwidth": 0.0, "sign_consistency": True}
