"""JumpReLU SAE (arXiv 2407.14435, docs/method.md): f = π ⊙ H(π − θ), an L0 penalty λ Σ H(π − θ), both learning θ
through the rectangle-kernel pseudo-derivative; unit-norm decoder as in the paper."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sagsae.saes.base import LinearEncoderSAE, SAELoss, check_init_quantile, register
from sagsae.saes.straight_through import bi_jump_relu, default_jump_scale, jump_relu_with_counts, two_sided_step


@register("jumprelu")
class JumpReLUSparseAutoencoder(LinearEncoderSAE):
    """JumpReLU SAE; λ is the L0 coefficient.

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        theta_init: initial threshold; None = 1e-3·√d.
        bandwidth: ε of the rectangle kernel; None = 1e-3·√d.
        theta_floor: thresholds are kept at or above this value.
        unit_norm_decoder: unit-norm decoder columns (the paper's choice).
        theta_init_quantile: start each θ at this quantile of its pre-activation on the first batch
            (None = theta_init).
    """

    saelens_tensors = {"W_enc": "W_enc", "b_enc": "b_enc", "threshold": "threshold", "W_dec": "W_dec",
                       "b_dec": "b_dec"}

    def __init__(self, d_in: int, width: int, theta_init: float | None = None, bandwidth: float | None = None,
                 theta_floor: float = 1e-6, unit_norm_decoder: bool = True,
                 theta_init_quantile: float | None = None) -> None:
        super().__init__(d_in, width, unit_norm_decoder)
        check_init_quantile("theta_init_quantile", theta_init_quantile)
        self.theta_init_quantile = theta_init_quantile
        self.theta_init = default_jump_scale(d_in) if theta_init is None else theta_init
        self.bandwidth = default_jump_scale(d_in) if bandwidth is None else bandwidth
        self.theta_floor = theta_floor
        self.threshold = nn.Parameter(torch.full((width,), self.theta_init))

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        """b_dec = the batch mean; with `theta_init_quantile` q, each θ starts at the q-quantile of its
        pre-activation, so each latent fires on about 1 − q of the first batch. θ moves about one learning
        rate per Adam step, so from the small default start a short run cannot reach a sparse code (SA-GSAE's
        θ start, docs/method.md)."""
        super().initialize_from_batch(x)
        if self.theta_init_quantile is not None:
            quantile = self.column_quantile(self.pre_activation(x), self.theta_init_quantile)
            self.threshold.copy_(quantile.clamp(min=2 * self.theta_floor))

    def _never(self) -> Tensor:
        """θ⁻ = +∞: the one-sided jump is the two-sided one that never opens below zero."""
        return torch.full_like(self.threshold, math.inf)

    def activation(self, pre: Tensor) -> Tensor:
        return bi_jump_relu(pre, self.threshold, self._never(), self.bandwidth)

    def coding_loss(self, x: Tensor, target: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> SAELoss:
        pre = self.pre_activation(x)
        if self.use_fused_chain:
            codes, firing = jump_relu_with_counts(pre, self.threshold, self.bandwidth)
        else:
            codes = self.activation(pre)
            firing = two_sided_step(pre, self.threshold, self._never(), self.bandwidth).sum(0)
        x_hat, prefixes = self.decode_levels(codes)
        reconstruction, prefix_errors = self.reconstruction_terms(target, x_hat, prefixes)
        terms = {**reconstruction, "sparsity": sparsity_coefficient * firing.sum() / len(x)}
        return SAELoss(sum(terms.values()), terms, codes, x_hat, firing=firing.detach(),
                       prefix_squared_errors=prefix_errors)

    def threshold_values(self) -> Tensor:
        return self.threshold.detach()

    def threshold_parameters(self) -> list[nn.Parameter]:
        return [self.threshold]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=self.theta_floor)
