"""AbsTopK SAE (arXiv 2510.00404, docs/method.md), the closest prior signed SAE: keep the k pre-activations of
largest |π|, with their signs, no ReLU."""

from __future__ import annotations

from torch import Tensor

from sagsae.saes.base import register
from sagsae.saes.topk import TopKSparseAutoencoder


@register("abstopk")
class AbsTopKSparseAutoencoder(TopKSparseAutoencoder):
    """Signed TopK: the k pre-activations of largest |π|, with their signs (switches: TopK's)."""

    signed_codes = True

    def code_values(self, pre: Tensor) -> Tensor:
        return pre

    def rank_scores(self, values: Tensor) -> Tensor:
        return values.abs()
