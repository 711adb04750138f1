"""AbsTopK SAE (arXiv 2510.00404, SPEC §4), the closest prior signed SAE: keep the k pre-activations of
largest |π|, with their signs, no ReLU."""

from __future__ import annotations

from torch import Tensor

from sagsae.saes.base import register
from sagsae.saes.topk import TopKSparseAutoencoder


@register("abstopk")
class AbsTopKSparseAutoencoder(TopKSparseAutoencoder):
    """Signed TopK: the k pre-activations of largest |π|, with their signs.

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        k: active latents per token.
        aux_k: dead latents used by AuxK; None = d/2.
        aux_coefficient: AuxK weight (1/32).
        unit_norm_decoder: unit-norm decoder columns.
    """

    signed_codes = True

    def values_and_scores(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return pre, pre.abs()
