"""`python -m sagsae {fit,validate,test}`: a LightningCLI over any SAE module and activation datamodule."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from callbacks import EvaluationReport, InterruptCheckpoint, RunInfo, SAEMetrics, StepProgressBar
from lightning_modules import SAEModule


class SAGSAECLI(LightningCLI):
    """Every run gets the metrics, the run record and the step progress bar, whatever the config says."""

    def __init__(self, args: list[str] | None = None) -> None:
        super().__init__(
            SAEModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [SAEMetrics(), RunInfo(), StepProgressBar(), EvaluationReport(),
                                            InterruptCheckpoint()]},
            args=args,
        )


def run(args: list[str] | None = None) -> None:
    """Run the CLI on `args`, or on the command line when None."""
    SAGSAECLI(args=args)
