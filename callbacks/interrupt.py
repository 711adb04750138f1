"""Nothing already trained is lost: Ctrl-C or SIGTERM saves a resumable checkpoint before the run exits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


def rescue_checkpoint(trainer: L.Trainer, name: str) -> Path:
    """Save `name` in the run's checkpoint folder (or its root folder) and return its path."""
    callback = trainer.checkpoint_callback
    folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
    path = folder / name
    trainer.save_checkpoint(path)
    return path


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C (KeyboardInterrupt) or SIGTERM during `fit`, write interrupted.ckpt; resume it with
    `fit --ckpt_path …/interrupted.ckpt`."""

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING  # also when the signal lands in fit's validation
        if fitting and isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            path = rescue_checkpoint(trainer, "interrupted.ckpt")
            if trainer.is_global_zero:
                print(f"\nInterrupted at step {trainer.global_step}: saved {path} (resume with --ckpt_path {path})")
