"""Gate-collapse warning (docs/method.md): the gates shut and reconstruction falls back on the bias.

Three signs, any of which warns once (with the step, the numbers and what to try):
- the share of alive latents falls by half within `window_steps` steps;
- after the sparsity warmup, the gate path's auxiliary R² stays below 0 for `smoothing` steps;
- the reconstruction R² (averaged over `smoothing` steps) falls below half of its best value, once that best
  exceeded 0.2: our addition, because a collapse can happen during the λ warmup, before the other two signs
  can show (measured on Protocol A without the auxiliary loss at λ 16, docs/method.md).
"""

from __future__ import annotations

import warnings
from collections import deque

import lightning as L
import torch

from callbacks.metrics import is_logging_step

ADVICE = ("keep the auxiliary loss on (aux_weight > 0), lower the sparsity coefficient, lengthen "
          "sparsity_warmup_steps, or lower the learning rate")


class GateCollapseMonitor(L.Callback):
    def __init__(self, window_steps: int = 200, smoothing: int = 20, stop_training: bool = False) -> None:
        super().__init__()
        if window_steps <= 0 or smoothing <= 0:
            raise ValueError("GateCollapseMonitor: window_steps and smoothing must be positive")
        self.window_steps, self.smoothing, self.stop_training = window_steps, smoothing, stop_training
        self._aux_r2: deque[torch.Tensor] = deque(maxlen=smoothing)
        self._r2: deque[torch.Tensor] = deque(maxlen=smoothing)
        self._alive: deque[torch.Tensor] = deque(maxlen=window_steps + 1)
        self.best_r2 = float("-inf")
        self.collapsed_at: int | None = None

    def _reasons(self, pl_module, alive: list[float], r2: list[float], aux_r2: list[float]) -> list[str]:
        reasons = []
        if len(alive) > self.window_steps and alive[-1] < 0.5 * alive[0]:
            reasons.append(f"alive latents fell from {alive[0]:.1%} to {alive[-1]:.1%} within {self.window_steps} steps")
        warmed_up = pl_module.global_step >= pl_module.hparams.sparsity_warmup_steps
        if warmed_up and len(aux_r2) == self.smoothing and max(aux_r2) < 0:
            reasons.append(f"the gate path's auxiliary R² stayed below 0 for {self.smoothing} steps "
                           f"(latest {aux_r2[-1]:.3f})")
        if len(r2) == self.smoothing:
            mean_r2 = sum(r2) / self.smoothing
            self.best_r2 = max(self.best_r2, mean_r2)
            if self.best_r2 > 0.2 and mean_r2 < 0.5 * self.best_r2:
                reasons.append(f"R² fell to {mean_r2:.3f} from a best of {self.best_r2:.3f}")
        return reasons

    def _read(self) -> tuple[list[float], list[float], list[float]]:
        """The three histories as numbers, in one host read."""
        histories = (self._alive, self._r2, self._aux_r2)
        values = torch.stack([value for history in histories for value in history]).tolist()
        sizes = [len(history) for history in histories]
        return values[:sizes[0]], values[sizes[0]:sizes[0] + sizes[1]], values[sizes[0] + sizes[1]:]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Every step adds to the histories on the device; they are read and judged at logging steps only
        (is_logging_step), so a GPU step does not wait on them, and a collapse is seen within one log interval."""
        if not outputs or "target" not in outputs:  # a skipped (non-finite) batch
            return
        self._alive.append(1.0 - pl_module.state.dead_latents.dead_mask().float().mean())
        summary = outputs["summary"]
        self._r2.append(summary["r2"].float())
        if "aux_r2" in summary:
            self._aux_r2.append(summary["aux_r2"].float())
        if self.collapsed_at is not None or not is_logging_step(trainer):
            return
        reasons = self._reasons(pl_module, *self._read())
        if reasons:
            where = f" (seen on rank {trainer.global_rank})" if trainer.world_size > 1 else ""
            warnings.warn(f"SA-GSAE gate collapse at step {pl_module.global_step}{where}: {'; '.join(reasons)}. "
                          f"Try: {ADVICE}.", stacklevel=1)
        # One decision for all ranks: a rank that stopped alone would leave the others waiting for it forever.
        if trainer.strategy.reduce_boolean_decision(bool(reasons), all=False):
            self.collapsed_at = pl_module.global_step
            pl_module.log("train/gate_collapse", 1.0)
            if self.stop_training:
                trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"collapsed_at": self.collapsed_at, "best_r2": self.best_r2}

    def load_state_dict(self, state_dict: dict) -> None:
        self.collapsed_at = state_dict.get("collapsed_at")
        self.best_r2 = state_dict.get("best_r2", float("-inf"))
