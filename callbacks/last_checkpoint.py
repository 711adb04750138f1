"""`last.ckpt` that holds the run's final step.

Lightning's ModelCheckpoint writes `last.ckpt` at the end of training only if it never wrote one: a run that saves
every 100 steps and ends at step 101 (a resumed run, or `max_steps` that is not a multiple of 100) keeps the
step-100 file, so the run's last step is lost and a resume from it repeats a step. This subclass writes it once
more at the end whenever the final step was not the last one saved."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (save_last on by default) whose `last.ckpt` ends at the final training step."""

    def __init__(self, save_last: bool = True, **kwargs: Any) -> None:
        super().__init__(save_last=save_last, **kwargs)
        self.step_saved: int | None = None  # the step of the newest checkpoint written in this run

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Runs on every save. Outside an exception (whose rescue file ends the run) only ModelCheckpoints save
        during `fit`, and with save_last each of their saves writes last.ckpt too."""
        self.step_saved = checkpoint["global_step"]

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > 0 and self.step_saved != trainer.global_step:
            self.last_model_path = self.format_checkpoint_name({}, filename=self.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(self.last_model_path)
