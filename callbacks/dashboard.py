"""A TensorBoard that opens on what matters: the SAE's curves, train and held-out together, and the final
metrics in the HPARAMS tab, with no single-point cards in front of them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams as hparams_summary

# The custom-scalars layout (TensorBoard's CUSTOM SCALARS tab): one chart per quantity, train and val together.
LAYOUT = {"SAE": {
    "L0": ["Multiline", ["train/l0", "val/l0"]],
    "R²": ["Multiline", ["train/r2", "val/r2"]],
    "dead fraction": ["Multiline", ["train/dead_fraction"]],
    "held-out silent fraction": ["Multiline", ["val/silent_fraction"]],
    "auxiliary R² (gate path)": ["Multiline", ["train/aux_r2", "val/aux_r2"]],
    "CE recovered": ["Multiline", ["val/ce_recovered"]],
    "ΔCE (nats)": ["Multiline", ["val/ce_delta"]],
    "tokens/s": ["Multiline", ["train/tokens_per_s"]],
    "thresholds moved (median, relative)": ["Multiline", ["train/threshold_rel_change"]],
}}


def flat_hyperparameters(params: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested hyperparameters as one level of `a/b` keys, values TensorBoard can show (others as text); keys
    that start with `_` (Lightning's `_instantiator`) are bookkeeping, not the researcher's settings."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in params.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flat_hyperparameters(value, f"{name}/")
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class WithoutLoggerAdvertisements(logging.Filter):
    """Drops Lightning's tip to install a cloud logger (litlogger, litmodels), printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and "litmodels" not in message


WITHOUT_ADVERTISEMENTS = WithoutLoggerAdvertisements()


def hide_logger_advertisements() -> None:
    """Filter Lightning's cloud-logger tip out of its log: our runs log to TensorBoard."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(WITHOUT_ADVERTISEMENTS)


class SAETensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without the cards that hide the curves: no `epoch` series (the activation
    stream is one endless epoch), no placeholder `hp_metric`. `log_final_metrics` puts the final values in the
    HPARAMS tab by naming the curves' own tags (the tab shows each tag's last point), instead of writing a
    single-point `final/…` series per metric. A run that has it needs no tip to install another logger."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)
        hide_logger_advertisements()  # before the Trainer that gets this logger prints the tip

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)

    @rank_zero_only
    def write_layout(self) -> None:
        self.experiment.add_custom_scalars(LAYOUT)

    @rank_zero_only
    def log_final_metrics(self, params: Mapping[str, Any], tags: list[str]) -> None:
        """The run's hyperparameters beside `tags`, already logged as curves, in the HPARAMS tab."""
        self.log_hyperparams(dict(params))  # hparams.yaml
        for summary in hparams_summary(flat_hyperparameters(params), {tag: 0.0 for tag in tags}):
            self.experiment.file_writer.add_summary(summary)
        self.experiment.flush()
