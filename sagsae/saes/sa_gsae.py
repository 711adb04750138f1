"""Sign-Aware Gated SAE (SA-GSAE) with the Bi-Jump-ReLU activation — our formulation (docs/method.md).

One latent carries both signs of one decoder direction: a two-sided gate opens on π > θ⁺ or π < −θ⁻, and a
signed magnitude path (sharing W_gate, no ReLU) gives the code's value, so the sparsity penalty, which lives
on the gate path only, never shrinks it. The auxiliary reconstruction through the gate path keeps the gates
from collapsing.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sagsae.saes.base import check_init_quantile, register
from sagsae.saes.gated_paths import GatedPathsSAE
from sagsae.saes.straight_through import (bi_jump_relu, default_jump_scale, open_gate, two_sided_soft_threshold,
                                          two_sided_step)

GatePath = Literal["jump", "soft"]


def signed_magnitude_path(u: Tensor, pi: Tensor, r_pos: Tensor, r_neg: Tensor | None, b_mag: Tensor,
                          sign_consistency: bool) -> Tensor:
    """m = exp(r^{sign π}) u + b_mag (r_neg None: tied, one rescale), zero where m opposes the gate's polarity
    under `sign_consistency`. Shared with the SAELens plugin (sagsae.formats.saelens), so the two encodes agree."""
    rescale = r_pos.exp() if r_neg is None else torch.where(pi > 0, r_pos, r_neg).exp()
    magnitude = rescale * u + b_mag
    if sign_consistency:
        magnitude = torch.where((pi > 0) == (magnitude > 0), magnitude, 0)
    return magnitude


@register("sagsae")
class SignAwareGatedSAE(GatedPathsSAE):
    """SA-GSAE(H). Tied r⁺ = r⁻ and θ⁺ = θ⁻ by default (the paper's recommended symmetric variant).

    Ablations (docs/method.md): `one_sided_gate` (gate H(π − θ), codes ≥ 0: a Gated SAE with a learned jump
    threshold), `aux_weight: 0`, `tie_r: false`, `tie_theta: false`, and `signed_magnitude: false`, where the
    code is the gate path's own BiJump_θ(π), so the sparsity penalty shrinks it (no separate magnitude path).

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        tie_r: one magnitude rescale r for both polarities (the paper's default).
        tie_theta: one threshold θ for both polarities.
        sign_consistency: a code never fires against its gate's polarity.
        aux_weight: α_aux of the gate-path reconstruction (0 = the `aux: false` ablation).
        gate_path: the gate path's code, which the sparsity and aux terms see: "soft", sign(π)·ReLU(|π| − θ), whose
            θ gradient is an ordinary one from every open gate, as Gated's b_gate (the default: with "jump",
            BiJump_θ(π), θ learns only from the kernel's band and a run's L0 climbs for millions of tokens;
            docs/method.md, "The gate path").
        recon_trains_theta: let the main reconstruction reach θ through the pseudo-derivative.
        log_theta: store log θ instead of θ.
        theta_init: initial θ; None = 1e-3·√d.
        bandwidth: ε of the rectangle kernel; None = 1e-3·√d.
        theta_floor: thresholds are kept at or above this value.
        theta_init_quantile: start each θ at this quantile of its |π| on the first batch (None = theta_init).
        one_sided_gate: ablation: gate H(π − θ) and codes ≥ 0 (a Gated SAE with a learned jump threshold).
        signed_magnitude: false = ablation: the code is the gate path's BiJump_θ(π) (shrunk by the penalty).
        unit_norm_decoder: docs/method.md's decoder form (a) instead of the default form (b).
    """

    signed_codes = True
    SAELENS_SWITCHES = ("sign_consistency", "one_sided_gate", "signed_magnitude", "gate_path")

    def __init__(
        self,
        d_in: int,
        width: int,
        tie_r: bool = True,
        tie_theta: bool = True,
        sign_consistency: bool = True,
        aux_weight: float = 1.0,
        gate_path: GatePath = "soft",
        recon_trains_theta: bool = False,
        log_theta: bool = False,
        theta_init: float | None = None,
        bandwidth: float | None = None,
        theta_floor: float = 1e-6,
        theta_init_quantile: float | None = None,
        one_sided_gate: bool = False,
        signed_magnitude: bool = True,
        unit_norm_decoder: bool = False,
    ) -> None:
        super().__init__(d_in, width, aux_weight, unit_norm_decoder)
        if gate_path not in ("jump", "soft"):
            raise ValueError(f"gate_path must be 'jump' or 'soft', got {gate_path!r}")
        self.tie_r, self.log_theta = tie_r, log_theta
        self.tie_theta = tie_theta or one_sided_gate  # a one-sided gate has a single threshold
        self.one_sided_gate = one_sided_gate
        self.signed_codes = not one_sided_gate
        self.sign_consistency = sign_consistency
        self.signed_magnitude = signed_magnitude
        self.gate_path = gate_path
        self.recon_trains_theta = recon_trains_theta
        self.theta_init = default_jump_scale(d_in) if theta_init is None else theta_init
        self.bandwidth = default_jump_scale(d_in) if bandwidth is None else bandwidth
        self.theta_floor = theta_floor
        check_init_quantile("theta_init_quantile", theta_init_quantile)
        self.theta_init_quantile = theta_init_quantile
        if self.theta_init <= theta_floor:
            raise ValueError(f"theta_init ({self.theta_init}) must exceed theta_floor ({theta_floor})")
        for name in ("r",) if tie_r else ("r_pos", "r_neg"):
            self.register_parameter(name, nn.Parameter(torch.zeros(width)))
        stored_init = math.log(self.theta_init) if log_theta else self.theta_init
        for name in self._threshold_names():
            self.register_parameter(name, nn.Parameter(torch.full((width,), stored_init)))
        if not signed_magnitude:
            # The ablation never reads the magnitude path: r and b_mag stay frozen at their start, so that no
            # optimizer moves them and DDP's reducer does not wait for a gradient that never comes.
            for parameter in (*self.magnitude_rescales(), self.b_mag):
                parameter.requires_grad_(False)

    def _threshold_names(self) -> tuple[str, ...]:
        stem = "log_threshold" if self.log_theta else "threshold"
        return (stem,) if self.tie_theta else (f"{stem}_pos", f"{stem}_neg")

    def thresholds(self) -> tuple[Tensor, Tensor]:
        """(θ⁺, θ⁻); the same tensor twice when tied, so both sides' gradients add up on one parameter.
        A one-sided gate never opens on the negative side: θ⁻ = +∞."""
        stored = [getattr(self, name) for name in self._threshold_names()]
        values = [s.exp() for s in stored] if self.log_theta else stored
        if self.one_sided_gate:
            return values[0], torch.full_like(values[0], math.inf)
        return (values[0], values[0]) if self.tie_theta else (values[0], values[1])

    def magnitude_rescales(self) -> tuple[Tensor, Tensor]:
        """(r⁺, r⁻), the per-latent log-rescales of the magnitude path."""
        return (self.r, self.r) if self.tie_r else (self.r_pos, self.r_neg)

    def codes_from_paths(self, u: Tensor, pi: Tensor) -> Tensor:
        """f = g · m with m = exp(r^{sign π}) u + b_mag; zero where m opposes the gate's polarity.

        The gate passes no gradient to π; it reaches θ (rectangle kernel) only with `recon_trains_theta`.
        """
        if not self.signed_magnitude:
            return self.gate_activation(pi)
        r_pos, r_neg = self.magnitude_rescales()
        magnitude = signed_magnitude_path(u, pi, r_pos, None if self.tie_r else r_neg, self.b_mag,
                                          self.sign_consistency)
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

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        """b_dec = the batch mean; with `theta_init_quantile` q, each θ starts at the q-quantile of its |π| on
        this batch, so each gate opens on about 1 − q of tokens from the first step (instead of almost all of
        them at θ_init, which Adam then raises by about one learning rate per step)."""
        super().initialize_from_batch(x)
        if self.theta_init_quantile is None:
            return
        theta = self.column_quantile(self.paths(x)[1].abs(), self.theta_init_quantile).clamp(min=2 * self.theta_floor)
        for name in self._threshold_names():
            getattr(self, name).copy_(theta.log() if self.log_theta else theta)

    def fused_chain_arguments(self) -> dict[str, Any] | None:
        """The chain covers tied r, either gate path, a separate magnitude path, and no θ gradient from the main
        reconstruction."""
        if not (self.tie_r and self.signed_magnitude and not self.recon_trains_theta):
            return None
        theta_pos, theta_neg = self.thresholds()
        return {"log_rescale": self.r, "b_mag": self.b_mag, "theta_pos": theta_pos, "theta_neg": theta_neg,
                "bandwidth": self.bandwidth, "sign_consistency": self.sign_consistency,
                "soft": self.gate_path == "soft"}

    def to_saelens(self) -> tuple[dict[str, Tensor], dict]:
        """SAELens layout with both sides' rescales and thresholds written out (untied on load)."""
        tensors = {key: self.saelens_tensor(key, key) for key in ("b_gate", "b_mag", "W_dec", "b_dec")}
        tensors["W_enc"] = self.saelens_tensor("W_enc", "W_gate")
        for key, value in zip(("r_pos", "r_neg", "threshold_pos", "threshold_neg"),
                              (*self.magnitude_rescales(), *self.thresholds())):
            tensors[key] = value.detach().float().cpu().clone()
        return tensors, {"architecture": self.saelens_architecture} | {s: getattr(self, s) for s in self.SAELENS_SWITCHES}

    @classmethod
    def saelens_switches(cls, cfg: dict) -> dict:
        return {s: cfg[s] for s in cls.SAELENS_SWITCHES if s in cfg} | {"tie_r": False, "tie_theta": False}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.W_gate.copy_(tensors["W_enc"].T)
        self.W_dec.copy_(tensors["W_dec"].T)
        for key in ("b_gate", "b_mag", "r_pos", "r_neg", "b_dec"):
            getattr(self, key).copy_(tensors[key])
        for name, key in zip(self._threshold_names(), ("threshold_pos", "threshold_neg")):
            getattr(self, name).copy_(tensors[key])

    def threshold_values(self) -> Tensor:
        """θ (tied or one-sided), or θ⁺ then θ⁻ (untied)."""
        theta_pos, theta_neg = self.thresholds()
        single = self.tie_theta or self.one_sided_gate
        return (theta_pos if single else torch.cat([theta_pos, theta_neg])).detach()

    def threshold_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._threshold_names()]

    @torch.no_grad()
    def scale_diagnostics(self) -> dict[str, Tensor]:
        """Norms (GatedPathsSAE) and the magnitude path's median rescale exp(r)."""
        return super().scale_diagnostics() | {"rescale_q50": torch.cat(self.magnitude_rescales()).exp().median()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if not self.log_theta:
            for name in self._threshold_names():
                getattr(self, name).clamp_(min=self.theta_floor)

    @torch.no_grad()
    def reset_dead(self, dead: Tensor) -> None:
        """Dead-latent threshold reset (docs/method.md): a latent silent for a whole window gets θ_init back (the small
        fixed value, also after a quantile initialization: the point is to let it fire again). A masked fill, so
        that an all-False mask costs no host read."""
        stored_init = math.log(self.theta_init) if self.log_theta else self.theta_init
        for name in self._threshold_names():
            getattr(self, name).masked_fill_(dead, stored_init)
