"""TopK SAE (arXiv 2406.04093, docs/method.md): keep the k largest ReLU pre-activations per token; the AuxK loss
(coefficient 1/32) reconstructs the residual from the top-k_aux dead latents; unit-norm decoder."""

from __future__ import annotations

import torch
from torch import Tensor

from sagsae.saes.base import LinearEncoderSAE, SAELoss, register, squared_error
from sagsae.saes.sparse_codes import dense_codes, pair_sums, row_top_pairs, selected_pre_activations


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

    def code_values(self, pre: Tensor) -> Tensor:
        """The code a latent takes where it is selected (TopK: ReLU(π))."""
        return torch.relu(pre)

    def rank_scores(self, values: Tensor) -> Tensor:
        """What ranks latents for selection (TopK: the values themselves)."""
        return values

    def values_and_scores(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        values = self.code_values(pre)
        return values, self.rank_scores(values)

    def selected_pairs(self, values: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the active codes, rows ascending: the k best-scored latents of each token."""
        return row_top_pairs(scores, self.k)

    def select(self, values: Tensor, scores: Tensor) -> Tensor:
        rows, cols = self.selected_pairs(values, scores)
        return dense_codes(values[rows, cols], rows, cols, values)

    def activation(self, pre: Tensor) -> Tensor:
        return self.select(*self.values_and_scores(pre))

    def coding_loss(self, x: Tensor, target: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> SAELoss:
        """recon + aux_coefficient · AuxK; `sparsity_coefficient` is unused (k sets the sparsity).

        π is computed once without a graph; the selected pairs' codes are read from it with a sparse backward
        (sagsae/saes/sparse_codes.py), and x̂ is decoded from those pairs only. `codes` (for the metrics) is detached; the
        firing counts come from the pairs too, 5× cheaper than counting the dense codes."""
        with torch.no_grad():
            pre = self.pre_activation(x)
            values, scores = self.values_and_scores(pre)
        centered = x - self.encoder_center()
        rows, cols = self.selected_pairs(values, scores)
        active = self.code_values(selected_pre_activations(centered, self.W_enc, self.b_enc, pre, rows, cols))
        x_hat, prefixes = self.decode_pair_levels(rows, cols, active, len(x))
        codes = dense_codes(active.detach(), rows, cols, values)
        firing = torch.bincount(cols, weights=(active.detach() != 0).float(), minlength=self.width)
        terms, prefix_errors = self.reconstruction_terms(target, x_hat, prefixes)
        if dead is not None and self.aux_coefficient > 0:
            terms["auxk"] = self.aux_coefficient * self.auxk(target - x_hat.detach(), centered, pre, scores, dead)
        return SAELoss(sum(terms.values()), terms, codes, x_hat, firing=firing, prefix_squared_errors=prefix_errors)

    def auxk(self, residual: Tensor, centered: Tensor, pre: Tensor, scores: Tensor, dead: Tensor) -> Tensor:
        """‖e − W_dec z_aux‖², z_aux = the top-k_aux dead latents' codes of each token (0 when no latent is dead),
        differentiated through those pairs only."""
        k_aux = min(self.aux_k, int(dead.sum()))
        if k_aux == 0:
            return residual.new_zeros(())
        rows, cols = row_top_pairs(scores.masked_fill(~dead, -torch.inf), k_aux)
        aux = self.code_values(selected_pre_activations(centered, self.W_enc, self.b_enc, pre, rows, cols))
        return squared_error(residual, pair_sums(self.W_dec.T, rows, cols, aux, len(residual)))
