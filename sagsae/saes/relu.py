"""ReLU-L1, the standard SAE (docs/method.md): f = ReLU(W_enc (x − b_dec) + b_enc), decoder-norm-weighted L1."""

from __future__ import annotations

import torch
from torch import Tensor

from sagsae.saes.base import LinearEncoderSAE, SAELoss, register


@register("relu")
class ReLUSparseAutoencoder(LinearEncoderSAE):
    """ReLU-L1 SAE; exported as SAELens's "standard".

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        unit_norm_decoder: keep decoder columns at unit norm (plain L1) instead of weighting L1 by their norms.
    """

    saelens_architecture = "standard"
    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def coding_loss(self, x: Tensor, target: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> SAELoss:
        codes = self.encode(x)
        x_hat, prefixes = self.decode_levels(codes)
        reconstruction, prefix_errors = self.reconstruction_terms(target, x_hat, prefixes)
        terms = {**reconstruction, "sparsity": sparsity_coefficient * self.weighted_l1(codes)}
        return SAELoss(sum(terms.values()), terms, codes, x_hat, prefix_squared_errors=prefix_errors)
