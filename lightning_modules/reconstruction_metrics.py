"""Held-out and logged-step metric machinery that both the training modules and the callbacks use: window sums
that reduce across DDP ranks, and which training steps Lightning writes."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric

from sagsae.measures import window_summary


class ReconstructionMetrics(Metric):
    """Window sums for R² = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², MSE, L0, and each latent's firings by sign."""

    full_state_update = False

    def __init__(self, d_in: int, width: int, prefix_widths: Sequence[int] = ()) -> None:
        super().__init__()
        self.prefix_widths = tuple(prefix_widths)  # a Matryoshka SAE's prefixes below the width: R² for each
        self.add_state("squared_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_squares", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("active", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("positive", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("negative", torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gate_squared_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skip_squared_error", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prefix_squared_error", torch.zeros(len(self.prefix_widths), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor, gate_squared_error: Tensor | None = None,
               skip_squared_error: Tensor | None = None, prefix_squared_errors: Tensor | None = None) -> None:
        """`x` is what x̂ reproduces (a transcoder's target). `gate_squared_error`: the gate path's ‖x − x̂_gate‖²
        averaged over this batch, for SAEs that have one; `skip_squared_error` the same for a skip-transcoder's
        skip path alone, ‖x − (W_skip x_source + b_dec)‖²; `prefix_squared_errors` each prefix's [L − 1]."""
        if prefix_squared_errors is not None:
            self.prefix_squared_error += prefix_squared_errors.double() * len(x)
        if gate_squared_error is not None:
            self.gate_squared_error += gate_squared_error.double() * len(x)
        if skip_squared_error is not None:
            self.skip_squared_error += skip_squared_error.double() * len(x)
        x, x_hat = x.double(), x_hat.double()
        self.squared_error += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_squares += x.pow(2).sum()
        self.active += (codes != 0).sum()
        self.tokens += len(x)
        self.positive += (codes > 0).sum(0)
        self.negative += (codes < 0).sum(0)

    def compute(self) -> dict[str, Tensor]:
        return window_summary(self.squared_error, self.sum_x, self.sum_squares, self.active, self.tokens,
                              self.positive, self.negative, self.gate_squared_error, self.skip_squared_error,
                              dict(zip(self.prefix_widths, self.prefix_squared_error)))


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training batch's step metrics (every `log_every_n_steps` batches, counted as
    its logger connector counts them, and at the stop): training metrics computed on the other batches are never
    written, and each computation costs a device read, and under DDP a synchronisation."""
    every = trainer.log_every_n_steps
    batches = trainer.fit_loop.epoch_loop.batch_progress.total.processed  # this batch included
    return every > 0 and (batches % every == 0 or trainer.should_stop)
