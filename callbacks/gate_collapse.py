"""Gate-collapse warning (SPEC §6): the gates shut and reconstruction falls back on the bias.

Fires when, after the sparsity warmup, either the gate path's auxiliary R² stays below 0 over `smoothing`
steps, or the share of alive latents falls by half within `window_steps` steps.
"""

from __future__ import annotations

from collections import deque

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.metrics import explained_variance

ADVICE = ("keep the auxiliary loss on (aux_weight > 0), lower the sparsity coefficient, lengthen "
          "sparsity_warmup_steps, or lower the learning rate")


class GateCollapseMonitor(L.Callback):
    def __init__(self, window_steps: int = 200, smoothing: int = 20, stop_training: bool = False) -> None:
        super().__init__()
        if window_steps <= 0 or smoothing <= 0:
            raise ValueError("GateCollapseMonitor: window_steps and smoothing must be positive")
        self.window_steps, self.smoothing, self.stop_training = window_steps, smoothing, stop_training
        self._aux_r2: deque[float] = deque(maxlen=smoothing)
        self._alive: deque[float] = deque(maxlen=window_steps + 1)
        self.collapsed_at: int | None = None

    def _armed(self, pl_module) -> bool:
        return pl_module.global_step >= pl_module.hparams.sparsity_warmup_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._alive.append(1.0 - float(pl_module.dead_mask().float().mean()))
        if "gate_x_hat" in outputs:
            self._aux_r2.append(float(explained_variance(outputs["x"], outputs["gate_x_hat"])))
        if self.collapsed_at is not None or not self._armed(pl_module):
            return
        reasons = []
        if len(self._aux_r2) == self.smoothing and max(self._aux_r2) < 0:
            reasons.append(f"the gate path's auxiliary R² stayed below 0 for {self.smoothing} steps "
                           f"(latest {self._aux_r2[-1]:.3f})")
        if len(self._alive) > self.window_steps and self._alive[-1] < 0.5 * self._alive[0]:
            reasons.append(f"alive latents fell from {self._alive[0]:.1%} to {self._alive[-1]:.1%} "
                           f"within {self.window_steps} steps")
        if reasons:
            self.collapsed_at = pl_module.global_step
            pl_module.log("train/gate_collapse", 1.0)
            rank_zero_warn(f"SA-GSAE gate collapse at step {pl_module.global_step}: {'; '.join(reasons)}. Try: {ADVICE}.")
            if self.stop_training:
                trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"collapsed_at": self.collapsed_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.collapsed_at = state_dict.get("collapsed_at")
