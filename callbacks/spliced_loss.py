"""Spliced LM loss (docs/results.md) at every validation and test: does the LM still work on the SAE's output?"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


class SplicedLMLoss(L.Callback):
    """Logs {val,test}/ce_clean, ce_sae, ce_zero and ce_recovered = (CE_zero − CE_sae)/(CE_zero − CE_clean) on
    `contexts` held-out contexts. Needs a datamodule that runs the LM (cached activations have none: skipped)."""

    def __init__(self, contexts: int = 16, every: int = 1) -> None:
        """`every`: during a fit, only at every `every`-th validation and at the last step, since the LM's forwards
        are most of a small run's validation time; `validate` and `test` always evaluate."""
        super().__init__()
        if contexts <= 0 or every <= 0:
            raise ValueError(f"SplicedLMLoss: contexts and every must be positive, got {contexts} and {every}")
        self.contexts, self.every = contexts, every

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        last = 0 < trainer.max_steps <= trainer.global_step
        return last or (trainer.global_step // trainer.val_check_batch) % self.every == 0

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
        if self._due(trainer):
            self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module, "test")
