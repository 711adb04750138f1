"""Nothing already trained is lost: Ctrl-C or SIGTERM saves a resumable checkpoint before the run exits."""

from __future__ import annotations

import signal
import threading

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.checkpointing import rescue_checkpoint


LOGGING_COUNTER = "_batches_that_stepped"  # the step Lightning's logger writes, in its training-epoch loop's state


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C (KeyboardInterrupt) or SIGTERM during `fit`, write interrupted.ckpt and say how to resume it
    (`resume_hint`; by default `fit --ckpt_path …/interrupted.ckpt`).

    Lightning installs its own SIGTERM handler only just before the first batch; a SIGTERM that lands between
    `setup` and then (model summary, hyperparameter logging) would otherwise kill the process with nothing
    saved. This callback remembers such a signal and stops the run after its first step instead.

    It also keeps the logged step equal to the optimizer step after a resume. Lightning 2.6 restores its logging
    counter one ahead when a SIGTERM lands after a validation (the counter was already advanced when the checkpoint
    was written), which would shift every resumed TensorBoard point by one step."""

    def __init__(self, resume_hint: str = "resume with --ckpt_path {path}") -> None:
        self.resume_hint = resume_hint  # how to continue, with {path}: a sweep resumes by itself
        self._early_sigterm = False
        self._previous_handler = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._remember_sigterm)

    def _remember_sigterm(self, signum, frame) -> None:
        self._early_sigterm = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop  # its logging counter, set through the loop's own restore hook
        state = epoch_loop.on_save_checkpoint()
        if state.get(LOGGING_COUNTER) != trainer.global_step:  # one optimizer: the counter is the optimizer step
            epoch_loop.on_load_checkpoint({**state, LOGGING_COUNTER: trainer.global_step})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._early_sigterm:
            self._early_sigterm = False
            raise SIGTERMException()

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING  # also when the signal lands in fit's validation
        if fitting and isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            path = rescue_checkpoint(trainer, "interrupted.ckpt")
            if trainer.is_global_zero:
                print(f"\nInterrupted at step {trainer.global_step}: saved {path} ({self.resume_hint.format(path=path)})")
