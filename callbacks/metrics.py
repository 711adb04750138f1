"""L0, R², MSE and dead fractions, logged under train/… and val/….

R² sums squared errors and variances over the whole window before dividing (never a mean of per-batch
ratios); the states are sums, so torchmetrics' synchronization makes them exact under DDP too.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L

from lightning_modules.reconstruction_metrics import ReconstructionMetrics, is_logging_step


class SAEMetrics(L.Callback):
    """Logs train/{mse,l0,r2,dead_fraction,reset_latents,aux_r2,tokens_per_s}, the training state's diagnostics
    (revived latents, θ quartiles) and, for SAEs with thresholds, train/threshold_{abs,rel}_change at every
    logging step (is_logging_step), and val/… over the held-out set: the row a sweep records too
    (`TrainingState.held_out_row`).

    dead_fraction is the share of latents silent for the last `dead_window_tokens` training tokens;
    val/silent_fraction the share that never fired on the held-out tokens.
    """

    def __init__(self, throughput_window: int = 20) -> None:
        super().__init__()
        self._eval: ReconstructionMetrics | None = None
        self._step_times: deque[tuple[float, int]] = deque(maxlen=throughput_window + 1)

    def _metric(self, existing: ReconstructionMetrics | None, pl_module) -> ReconstructionMetrics:
        if existing is None:
            existing = ReconstructionMetrics(pl_module.sae.d_in, pl_module.sae.width,
                                             pl_module.state.prefix_widths()).to(pl_module.device)
        return existing

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs: dict[str, Any], batch, batch_idx) -> None:
        if not outputs or "target" not in outputs:  # a skipped (non-finite) batch
            return
        # Averaged over the last steps: the shuffle buffer refills in bursts, so single steps mislead.
        self._step_times.append((time.perf_counter(), len(outputs["target"]) * trainer.world_size))
        if not is_logging_step(trainer):
            return
        values = outputs["summary"]
        log = dict(sync_dist=False, on_step=True, on_epoch=False)
        pl_module.log("train/mse", values["mse"].float(), **log)
        pl_module.log("train/l0", values["l0"].float(), prog_bar=True, **log)
        pl_module.log("train/r2", values["r2"].float(), prog_bar=True, **log)
        state = pl_module.state
        pl_module.log("train/dead_fraction", state.dead_fraction(), prog_bar=True, **log)
        pl_module.log("train/reset_latents", state.dead_latents.reset_latents.float(), **log)
        for name, value in (state.threshold_movement() | state.training_diagnostics()).items():
            pl_module.log(f"train/{name}", value.float(), **log)
        for name in sorted(name for name in values if name == "aux_r2" or name.startswith("r2_prefix_")):
            pl_module.log(f"train/{name}", values[name].float(), **log)
        if len(self._step_times) > 1:
            elapsed = self._step_times[-1][0] - self._step_times[0][0]
            tokens = sum(n for _, n in list(self._step_times)[1:])
            pl_module.log("train/tokens_per_s", tokens / elapsed, prog_bar=True, **log)

    def _evaluation_batch_end(self, pl_module, outputs: dict[str, Any]) -> None:
        self._eval = self._metric(self._eval, pl_module)
        self._eval.update(outputs["target"], outputs["x_hat"], outputs["codes"], outputs.get("gate_squared_error"),
                          outputs.get("skip_squared_error"), outputs.get("prefix_squared_errors"))

    def _evaluation_epoch_end(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self._eval is None:
            return
        values = self._eval.compute()
        self._eval.reset()
        for name, value in pl_module.state.held_out_row(values).items():
            pl_module.log(f"{stage}/{name}", value.float(), sync_dist=False, prog_bar=(name == "r2"))
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            density = values["firing_density"].clamp(min=1e-10).log10().float().cpu()
            experiment.add_histogram(f"{stage}/log10_firing_density", density, trainer.global_step)
            changes = pl_module.state.threshold_changes()  # how far each latent's threshold moved from its start
            if changes is not None and len(changes[1]):
                experiment.add_histogram("train/threshold_rel_change", changes[1].float().cpu(), trainer.global_step)
        self._step_times.clear()  # validation time is not training throughput

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._evaluation_batch_end(pl_module, outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._evaluation_epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._evaluation_epoch_end(trainer, pl_module, "test")
