"""Gated SAE (arXiv 2404.16014) on the shared loop."""

from __future__ import annotations

from lightning_modules.base import SAEModule


class GatedSAE(SAEModule):
    """Args:
        aux_weight: weight of the gate path's auxiliary reconstruction.
        unit_norm_decoder: SPEC §3 form (a) — unit-norm decoder, plain L1, frozen decoder in the aux term;
            the default form (b) weights L1 by decoder norms with the decoder live in the aux term.
        gate_init_quantile: start b_gate at minus this quantile of each u on the first batch (None = 0).
        **kwargs: the shared training arguments of `SAEModule`.
    """

    architecture = "gated"
    architecture_args = ("aux_weight", "unit_norm_decoder", "gate_init_quantile")

    def __init__(self, aux_weight: float = 1.0, unit_norm_decoder: bool = False,
                 gate_init_quantile: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
