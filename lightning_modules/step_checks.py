"""What `fit`'s module and a sweep do alike around a training step under a Trainer: read the data's shape, see
every rank's first batch, reduce a step's counts over ranks, and skip or stop on non-finite values."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.checkpointing import rescue_checkpoint
from sagsae.training import TrainingSettings


def data_shape(trainer: L.Trainer, settings: TrainingSettings) -> tuple[int | None, bool | None]:
    """(activation size, whether batches are transcoder pairs) as the datamodule reports them (None where there
    is no datamodule or it does not say); refuses a skip connection on data without pairs."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None, None
    pairs = bool(getattr(datamodule, "pairs", False))
    if settings.skip_connection and not pairs:
        raise ValueError("model.skip_connection is for transcoders: give the data a target hookpoint "
                         "(data.init_args.target_hookpoint, e.g. mlp_out on hookpoint mlp_in), or drop it")
    return getattr(datamodule, "d_model", None), pairs


def every_rank_batch(trainer: L.Trainer, batch: Tensor) -> Tensor:
    """Every rank's `batch`, concatenated in rank order: the data-driven starts (b_dec, quantile thresholds) then
    see the tokens that one process given all ranks' batches would see, and every rank starts alike. (An
    element-wise mean over ranks would shrink the spread that the quantiles measure.)"""
    if trainer.world_size == 1:
        return batch
    return trainer.strategy.all_gather(batch).flatten(0, 1)


def reduce_step(trainer: L.Trainer, firing: Tensor, tokens: int, loss: Tensor) -> tuple[Tensor, int, Tensor]:
    """(per-latent firing counts summed over ranks, tokens over ranks, the loss's mean over ranks), in one
    reduction, so that every rank's training state records the same step."""
    totals = trainer.strategy.reduce(torch.cat([firing.double(), loss.detach().double().reshape(1)]), reduce_op="sum")
    return totals[:-1], tokens * trainer.world_size, (totals[-1] / trainer.world_size).float()


class NonFiniteGuard:
    """Both finiteness checks of a training step in one reduction and one host read. A batch with NaN/inf on any
    rank is skipped by every rank (a rank that skipped alone would hang DDP), with a warning and a count. A
    non-finite loss on finite data saves the weights before the step and stops the run."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, trainer: L.Trainer, batch: Tensor, losses: Sequence[Tensor] = ()) -> bool:
        """True when the step must be skipped."""
        flags = torch.stack([torch.isfinite(batch).all().logical_not(),
                             *(torch.isfinite(loss.detach()).logical_not() for loss in losses)]).float()
        bad_batch, *bad_losses = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if bad_batch:
            self.skipped += 1
            rank_zero_warn(f"Skipped a batch with non-finite activations at step {trainer.global_step} "
                           f"({self.skipped} so far)")
            return True
        if any(bad_losses):
            path = rescue_checkpoint(trainer, f"nonfinite-step{trainer.global_step}.ckpt")
            raise FloatingPointError(
                f"Non-finite loss at step {trainer.global_step}: the weights before this step are saved in {path}. "
                f"Lower model.lr or model.sparsity_coefficient, or check the activations.")
        return False
