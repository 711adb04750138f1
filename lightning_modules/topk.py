"""TopK (arXiv 2406.04093), BatchTopK and AbsTopK (arXiv 2510.00404) on the shared loop."""

from __future__ import annotations

from lightning_modules.base import SAEModule


class TopKSAE(SAEModule):
    """Args:
        k: active latents per token.
        aux_k: dead latents used by AuxK; None = d/2.
        aux_coefficient: AuxK weight (1/32).
        betas: Adam betas ((0.9, 0.999) for the TopK family).
        **kwargs: the shared training arguments of `SAEModule` (the sparsity coefficient is unused).
    """

    architecture = "topk"
    architecture_args = ("k", "aux_k", "aux_coefficient")

    def __init__(self, k: int = 32, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                 betas: tuple[float, float] = (0.9, 0.999), **kwargs) -> None:
        kwargs.setdefault("sparsity_warmup_steps", 0)
        super().__init__(betas=betas, **kwargs)


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch (k·B codes), with a learned inference threshold."""

    architecture = "batchtopk"


class AbsTopKSAE(TopKSAE):
    """Signed TopK: the k pre-activations of largest |π|, with their signs."""

    architecture = "abstopk"
