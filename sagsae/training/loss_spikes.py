"""Loss spikes: a step whose training loss jumps far above its recent average (docs/method.md, "The gate path")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

SPIKE_RATIO = 2.0  # a loss this many times its recent average is a spike
AVERAGE_STEPS = 100  # the recent average: an EMA over about this many steps


class LossSpikeDetector(nn.Module):
    """Counts spikes without host reads, once per spike however many steps the loss stays above the line. While
    λ warms up the loss may rise by design, so steps before `warmup_steps` are not judged."""

    def __init__(self, warmup_steps: int = 0) -> None:
        super().__init__()
        self.warmup_steps = warmup_steps
        self.register_buffer("average", torch.tensor(0.0))  # 0: no step yet
        self.register_buffer("spikes", torch.tensor(0, dtype=torch.long))
        self.register_buffer("spiking", torch.tensor(False))  # whether the latest step was in a spike

    def record(self, loss: Tensor, step: int) -> None:
        """The loss of the step after `step` steps trained (averaged over ranks)."""
        if step >= self.warmup_steps:
            spiking = (self.average > 0) & (loss > SPIKE_RATIO * self.average)
            self.spikes += (spiking & ~self.spiking).long()
            self.spiking.copy_(spiking)
        self.average.copy_(torch.where(self.average == 0, loss, self.average.lerp(loss, 1 / AVERAGE_STEPS)))
