"""Spliced LM loss (docs/results.md) at every validation and test: does the LM still work on the SAE's output?"""

from __future__ import annotations

import lightning as L


class SplicedLMLoss(L.Callback):
    """Logs {val,test}/ce_clean, ce_sae, ce_zero and ce_recovered = (CE_zero − CE_sae)/(CE_zero − CE_clean) on
    `contexts` held-out contexts. Needs a datamodule that runs the LM (cached activations have none: skipped)."""

    def __init__(self, contexts: int = 16) -> None:
        super().__init__()
        if contexts <= 0:
            raise ValueError("SplicedLMLoss: contexts must be positive")
        self.contexts = contexts

    def _evaluate(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "spliced_cross_entropy") or trainer.sanity_checking:
            return
        sae = pl_module.sae
        was_training = sae.training
        sae.eval()
        try:
            values = datamodule.spliced_cross_entropy(sae.reconstruct_raw, self.contexts)
        except NotImplementedError:
            return
        finally:
            sae.train(was_training)
        for name, value in values.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, "test")
