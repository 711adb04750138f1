"""TopK SAE (arXiv 2406.04093, SPEC §4): keep the k largest ReLU pre-activations per token; the AuxK loss
(coefficient 1/32) reconstructs the residual from the top-k_aux dead latents; unit-norm decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sagsae.saes.base import LinearEncoderSAE, SAELoss, register, squared_error


def keep_top(values: Tensor, scores: Tensor, k: int) -> Tensor:
    """values where scores are among the k largest of their row, zero elsewhere."""
    indices = scores.topk(k, dim=-1).indices
    return torch.zeros_like(values).scatter(-1, indices, values.gather(-1, indices))


@register("topk")
class TopKSparseAutoencoder(LinearEncoderSAE):
    """TopK SAE with AuxK over dead latents (the sparsity coefficient λ is unused: k sets the sparsity).

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        k: active latents per token.
        aux_k: dead latents used by AuxK; None = d/2.
        aux_coefficient: AuxK weight (1/32).
        unit_norm_decoder: unit-norm decoder columns (the paper's choice).
    """

    k_sparse = True
    adam_betas = (0.9, 0.999)

    def __init__(self, d_in: int, width: int, k: int = 32, aux_k: int | None = None,
                 aux_coefficient: float = 1 / 32, unit_norm_decoder: bool = True) -> None:
        super().__init__(d_in, width, unit_norm_decoder)
        if not 0 < k <= width:
            raise ValueError(f"k must be in 1..width ({width}), got {k}")
        self.k = k
        self.aux_k = d_in // 2 if aux_k is None else aux_k
        self.aux_coefficient = aux_coefficient

    @classmethod
    def parameter_count(cls, d_in: int, width: int, **switches) -> int:
        """k changes no count: build with k = 1 unless given, so that any width can be counted."""
        return super().parameter_count(d_in, width, **({"k": 1} | switches))

    def saelens_config(self) -> dict:
        return {"k": self.k}

    @classmethod
    def saelens_switches(cls, cfg: dict) -> dict:
        return {"k": int(cfg["k"])}

    def values_and_scores(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The code values a latent would take, and the scores that rank latents (TopK: ReLU(π) both)."""
        values = torch.relu(pre)
        return values, values

    def select(self, values: Tensor, scores: Tensor) -> Tensor:
        return keep_top(values, scores, self.k)

    def activation(self, pre: Tensor) -> Tensor:
        return self.select(*self.values_and_scores(pre))

    def codes_and_reconstruction(self, values: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Training's codes (detached, dense, for the metrics) and x̂, decoded from the k active latents only:
        k·d multiply-adds per token instead of H·d, and a decoder gradient on those k columns."""
        indices = scores.topk(self.k, dim=-1).indices
        active = values.gather(-1, indices)
        x_hat = F.embedding_bag(indices, self.W_dec.T, per_sample_weights=active, mode="sum") + self.b_dec
        codes = torch.zeros_like(values).scatter_(-1, indices, active.detach())
        return codes, x_hat

    def loss(self, x: Tensor, sparsity_coefficient: float, dead: Tensor | None = None) -> SAELoss:
        """recon + aux_coefficient · AuxK; `sparsity_coefficient` is unused (k sets the sparsity)."""
        values, scores = self.values_and_scores(self.pre_activation(x))
        codes, x_hat = self.codes_and_reconstruction(values, scores)
        terms = {"recon": squared_error(x, x_hat)}
        if dead is not None and self.aux_coefficient > 0:
            terms["auxk"] = self.aux_coefficient * self.auxk(x - x_hat.detach(), values, scores, dead)
        return SAELoss(sum(terms.values()), terms, codes, x_hat)

    def auxk(self, residual: Tensor, values: Tensor, scores: Tensor, dead: Tensor) -> Tensor:
        """‖e − W_dec z_aux‖², z_aux = the top-k_aux dead latents' values (0 when no latent is dead)."""
        k_aux = min(self.aux_k, int(dead.sum()))
        if k_aux == 0:
            return residual.new_zeros(())
        dead_scores = scores.masked_fill(~dead, -torch.inf)
        aux_codes = keep_top(values.masked_fill(~dead, 0), dead_scores, k_aux)
        return squared_error(residual, aux_codes @ self.W_dec.T)
