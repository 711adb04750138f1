"""Activations already in memory (synthetic benchmarks, small experiments) as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.activation_stream import IterableStream, held_out_loader, rank_and_world
from sagsae.measures import normalization_scales


class TensorActivationDataModule(L.LightningDataModule):
    """Shuffled [batch_size, d] batches drawn without replacement from `train`, reshuffled every pass; a `train`
    of (source, target) pairs [n, 2, d] trains a transcoder."""

    def __init__(self, train: Tensor, val: Tensor | None = None, batch_size: int = 4096,
                 normalization_tokens: int = 16_384, seed: int = 0) -> None:
        super().__init__()
        if train.dim() not in (2, 3) or (train.dim() == 3 and train.shape[1] != 2) or len(train) < batch_size:
            raise ValueError(f"train must be [n ≥ batch_size, d] (or pairs [n, 2, d]); got shape {tuple(train.shape)} "
                             f"and batch_size {batch_size}")
        self.train, self.val = train, val
        self.batch_size, self.normalization_tokens, self.seed = batch_size, normalization_tokens, seed

    @property
    def d_model(self) -> int:
        return self.train.shape[-1]

    @property
    def pairs(self) -> bool:
        return self.train.dim() == 3

    def estimate_scales(self) -> list[float]:
        sample = self.train[: self.normalization_tokens]
        return normalization_scales(sample[torch.isfinite(sample.flatten(1)).all(1)])  # as training skips them

    def batches(self) -> Iterator[Tensor]:
        """Every pass's shuffled batches (one permutation, the same on every rank), dealt to ranks in turn."""
        rank, world = rank_and_world(self.trainer)
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(len(self.train), generator=generator)
            starts = range(0, len(order) - self.batch_size + 1, self.batch_size)
            yield from (self.train[order[i : i + self.batch_size]] for i in starts[rank::world])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IterableStream(self.batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        held_out = self.val if self.val is not None else self.train[: self.batch_size]
        return held_out_loader(held_out, self.batch_size, self.trainer)
