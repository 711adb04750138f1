"""Spliced LM loss (SPEC §6): next-token CE with the hookpoint replaced by an SAE's reconstruction."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from datamodules.hooked_lm import HookedLanguageModel


@torch.no_grad()
def spliced_cross_entropy(lm: HookedLanguageModel, input_ids: Tensor,
                          reconstruct: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """CE on `input_ids` clean, with the trainable positions' activations replaced by `reconstruct(x)`, and by
    zeros there; CE recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean). Only real next tokens are scored."""
    input_ids = input_ids.to(lm.device)
    trainable = lm.trainable_positions(input_ids)
    targets = input_ids[:, 1:]
    scored = trainable[:, 1:]

    def cross_entropy(logits: Tensor) -> float:
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        return float(losses[scored].mean())

    def splice(make: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def replace(activations: Tensor) -> Tensor:
            replaced = activations.clone()
            replaced[trainable] = make(activations[trainable].float()).to(activations.dtype)
            return replaced
        return replace

    clean = cross_entropy(lm.logits(input_ids))
    spliced = cross_entropy(lm.logits_with_replacement(input_ids, splice(reconstruct)))
    zero = cross_entropy(lm.logits_with_replacement(input_ids, splice(torch.zeros_like)))
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero, "ce_recovered": recovered}
