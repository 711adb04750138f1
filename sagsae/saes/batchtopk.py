"""BatchTopK SAE (docs/method.md): keep the k·B largest ReLU pre-activations of the whole batch in training; at
inference a learned scalar threshold (running mean of the smallest kept value) replaces the batch rule."""

from __future__ import annotations

import torch
from torch import Tensor

from sagsae.saes.base import register
from sagsae.saes.topk import TopKSparseAutoencoder


@register("batchtopk")
class BatchTopKSparseAutoencoder(TopKSparseAutoencoder):
    """TopK over the whole batch (k·B codes), with a learned inference threshold; exported as SAELens's
    "jumprelu" with that threshold on every latent (its inference rule).

    Args:
        d_in: activation size (taken from the data in training).
        width: number of latents H.
        k: mean active latents per token (k·B per batch).
        aux_k: dead latents used by AuxK; None = d/2.
        aux_coefficient: AuxK weight (1/32).
        threshold_momentum: momentum of the running inference threshold.
        unit_norm_decoder: unit-norm decoder columns.
    """

    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, width: int, k: int = 32, aux_k: int | None = None,
                 aux_coefficient: float = 1 / 32, threshold_momentum: float = 0.99,
                 unit_norm_decoder: bool = True) -> None:
        super().__init__(d_in, width, k, aux_k, aux_coefficient, unit_norm_decoder)
        self.threshold_momentum = threshold_momentum
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def to_saelens(self) -> tuple[dict[str, Tensor], dict]:
        tensors, _ = super().to_saelens()
        tensors["threshold"] = torch.full((self.width,), float(self.threshold.clamp(min=0)))
        return tensors, {"architecture": self.saelens_architecture}

    def selected_pairs(self, values: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Training: the k·B best-scored (token, latent) pairs of the batch, which also move the running
        threshold; inference: every value above that threshold."""
        if not self.training:
            return (values > self.threshold.clamp(min=0)).nonzero(as_tuple=True)
        flat = scores.reshape(-1).topk(self.k * len(values)).indices.sort().values
        rows, cols = flat // values.shape[-1], flat % values.shape[-1]
        self.update_threshold(values[rows, cols])
        return rows, cols

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """Move the running threshold toward the smallest positive kept value. Under DDP that value is averaged
        over the ranks that have one, so that every rank (and so the checkpoint) holds the same threshold. Written
        without a host read (no boolean indexing, no `if` on a tensor), so a GPU step never waits on it."""
        kept = kept.to(self.threshold.dtype)  # the buffer's dtype, also under bf16 autocast
        positive = (kept > 0) & kept.isfinite()  # NaN/inf (rows of a batch the step skips) never enter it
        has_positive = positive.any().to(kept.dtype)
        smallest = torch.where(positive, kept, torch.inf).min().nan_to_num(posinf=0.0) * has_positive
        sums = torch.stack([smallest, has_positive])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        smallest = sums[0] / sums[1].clamp(min=1)
        moved = torch.where(self.threshold < 0, smallest, self.threshold.lerp(smallest, 1 - self.threshold_momentum))
        self.threshold.copy_(torch.where(sums[1] > 0, moved, self.threshold))
