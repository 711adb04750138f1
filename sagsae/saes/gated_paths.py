"""The shared machinery of Gated-style SAEs (Gated, SA-GSAE): one matrix feeding a gate path and a magnitude path,
and the loss whose sparsity and auxiliary terms act on the gate path (docs/method.md, "Loss and gradients")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sagsae.saes.base import SAELoss, SparseAutoencoder, centered_projection, squared_error
from sagsae.saes.gated_chain import gated_chain


class GatedPathsSAE(SparseAutoencoder):
    """Gated-style architectures: one matrix W_gate (= W_decᵀ at init) feeds the gate π = u + b_gate and the
    magnitude path (u = W_gate (x − b_dec)); the sparsity and auxiliary terms act on the gate path.

    Decoder forms (docs/method.md): (b), the default, weights the sparsity by decoder norms and keeps the decoder
    live in the auxiliary term; (a), `unit_norm_decoder`, uses plain L1 and a frozen decoder copy there.
    """

    def __init__(self, d_in: int, width: int, aux_weight: float = 1.0, unit_norm_decoder: bool = False) -> None:
        super().__init__(d_in, width, unit_norm_decoder)
        self.aux_weight = aux_weight
        self.W_gate = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_gate = nn.Parameter(torch.zeros(width))
        self.b_mag = nn.Parameter(torch.zeros(width))

    def projection(self, x: Tensor) -> Tensor:
        """u = W_gate (x − c), c = `encoder_center()` (b_dec for an autoencoder), which both paths share."""
        self.check_input(x)
        return centered_projection(x, self.encoder_center(), self.W_gate)

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u = W_gate (x − b_dec) and π = u + b_gate."""
        u = self.projection(x)
        return u, u + self.b_gate

    @torch.no_grad()
    def scale_diagnostics(self) -> dict[str, Tensor]:
        """The decoder's, and the gate encoder rows' median norms."""
        return super().scale_diagnostics() | {"encoder_norm_q50": self.W_gate.norm(dim=1).median()}

    def codes_from_paths(self, u: Tensor, pi: Tensor) -> Tensor:
        """The code f from u and π (the magnitude where the gate is open)."""
        raise NotImplementedError

    def gate_activation(self, pi: Tensor) -> Tensor:
        """The gate path's code, which the sparsity and auxiliary terms see."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.codes_from_paths(*self.paths(x))

    def fused_chain_arguments(self) -> dict[str, Any] | None:
        """`gated_chain`'s arguments past u and b_gate for this SAE's form; None where the chain does not cover it."""
        raise NotImplementedError

    def coding_loss(self, x: Tensor, target: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> SAELoss:
        chain = self.fused_chain_arguments() if self.use_fused_chain else None
        if chain is not None:
            codes, gate_codes, gate_l1 = gated_chain(self.projection(x), self.b_gate, **chain)
            return self.gated_loss(target, codes, gate_codes, sparsity_coefficient, gate_l1)
        u, pi = self.paths(x)
        return self.gated_loss(target, self.codes_from_paths(u, pi), self.gate_activation(pi), sparsity_coefficient)

    def gated_loss(self, target: Tensor, codes: Tensor, gate_codes: Tensor, sparsity_coefficient: float,
                   gate_l1: Tensor | None = None) -> SAELoss:
        """recon + λ·(weighted) L1 of the gate path + α_aux · gate-path reconstruction. `gate_l1`: the gate codes'
        per-latent L1 Σ_b |f_bi| where the caller has it (the gated chain), else computed here."""
        x_hat, prefixes = self.decode_levels(codes)
        if self.unit_norm_decoder:
            gate_x_hat = gate_codes @ self.W_dec.detach().T + self.b_dec.detach()
        else:
            gate_x_hat = self.decode(gate_codes)
        gate_error = squared_error(target, gate_x_hat)
        reconstruction, prefix_errors = self.reconstruction_terms(target, x_hat, prefixes)
        terms = {
            **reconstruction,
            "sparsity": sparsity_coefficient * (self.weighted_l1(gate_codes) if gate_l1 is None
                                                else self.weighted_latent_l1(gate_l1, len(gate_codes))),
            "aux": self.aux_weight * gate_error,
        }
        return SAELoss(sum(terms.values()), terms, codes, x_hat, gate_squared_error=gate_error.detach(),
                       prefix_squared_errors=prefix_errors)
