"""`sagsae {fit,validate,test}`: a LightningCLI over `SAEModule` (any registered SAE) and any activation
datamodule."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from callbacks import (AtomicCheckpointIO, EvaluationReport, InterruptCheckpoint, RunInfo, SAEMetrics, SAETensorBoardLogger,
                       StepProgressBar, hide_logger_advertisements)
from lightning_modules import SAEModule
from sagsae.commands import COMMANDS, TRAIN
from sagsae.precision import accelerator_device_type, automatic_precision


class SAGSAECLI(LightningCLI):
    """Every run gets the metrics, the run record and the step progress bar, whatever the config says. The module configures its own Adam,
    so the CLI offers no optimizer or scheduler; `predict` is left out."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            SAEModule,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [SAEMetrics(), RunInfo(), StepProgressBar(), EvaluationReport(),
                                            InterruptCheckpoint()]},
            parser_kwargs={"prog": "sagsae", "description": "Train and evaluate sparse autoencoders.",
                           "exit_on_error": False},
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        """With `trainer.precision` unset, a run takes bf16-mixed where the hardware has fast bf16 and fp32 elsewhere
        (sagsae/precision.py), `validate` and `test` as `fit`, so that they repeat its numbers; the choice is
        printed and saved in the run's config.yaml."""
        if self.subcommand is None:
            return
        trainer = self.config[self.subcommand].trainer
        if trainer.precision is None:
            trainer.precision, reason = automatic_precision(accelerator_device_type(str(trainer.accelerator)))
            rank_zero_info(f"precision: {trainer.precision} ({reason}; --trainer.precision 32-true or bf16-mixed "
                           "to choose)")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's default logger (a config that leaves `trainer.logger` unset) becomes the SAE dashboard's
        TensorBoard logger, in the same folder (callbacks/dashboard.py), and its default checkpoint writer one that
        writes atomically (callbacks/checkpoint_io.py)."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        configured = self.config[self.subcommand].trainer.logger if self.subcommand else None
        if configured in (None, True) and type(trainer.logger) is TensorBoardLogger:
            default = trainer.logger
            trainer.loggers = [SAETensorBoardLogger(default.save_dir, name=default.name)]
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if COMMANDS.get(name, ("",))[0] == TRAIN}


def run(args: list[str] | None = None) -> None:
    """Run the CLI on `args`, or on the command line when None."""
    hide_logger_advertisements()  # the Trainer prints it before its default logger becomes ours
    # mixed precision keeps the weights in fp32, so the model summary's size, counted at 32 bits, is right
    warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
    SAGSAECLI(args=args)
