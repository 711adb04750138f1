"""The training loop shared by every SAE: optimizer, LR and λ warmup, normalization, dead-latent tracking.

A subclass only names its architecture and lists which of its arguments configure it; the SAE itself (pure
torch, `sagsae.saes`) is built lazily in `configure_model`, once the datamodule knows the activation size.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.interrupt import rescue_checkpoint
from sagsae.saes import SparseAutoencoder, build_sae


class SAEModule(L.LightningModule):
    """Trains one SAE on normalized activations.

    Args:
        d_in: activation size; None = take it from the datamodule (a mismatch with the data is an error).
        width: number of latents H; None = 8 × d_in.
        sparsity_coefficient: λ, reached linearly over `sparsity_warmup_steps`.
        lr: Adam learning rate, reached linearly over `lr_warmup_steps`.
        betas: Adam betas.
        dead_window_tokens: a latent that has not fired in this many training tokens is dead (SPEC §6).
        reset_dead_latents: let the architecture react to dead latents (SA-GSAE: threshold reset).
    """

    architecture: str = ""  # registry name of the SAE in sagsae.saes
    architecture_args: tuple[str, ...] = ()  # the subclass's __init__ arguments that configure that SAE

    def __init__(
        self,
        d_in: int | None = None,
        width: int | None = None,
        sparsity_coefficient: float = 1.0,
        sparsity_warmup_steps: int = 200,
        lr: float = 1e-3,
        lr_warmup_steps: int = 50,
        betas: tuple[float, float] = (0.0, 0.999),
        dead_window_tokens: int = 1_000_000,
        reset_dead_latents: bool = True,
    ) -> None:
        super().__init__()
        for name, value in [("sparsity_coefficient", sparsity_coefficient), ("lr", lr)]:
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"model.{name} must be a finite non-negative number, got {value}")
        if dead_window_tokens <= 0:
            raise ValueError(f"model.dead_window_tokens must be positive, got {dead_window_tokens}")
        self.save_hyperparameters()  # the subclass's architecture switches included
        self.sae: SparseAutoencoder | None = None
        self.skipped_batches = 0
        if d_in is not None:
            self._build(d_in)

    # ----- construction -------------------------------------------------------------------------------
    def _build(self, d_in: int) -> None:
        width = self.hparams.width or 8 * d_in
        switches = {name: self.hparams[name] for name in self.architecture_args}
        self.sae = build_sae(self.architecture, d_in=d_in, width=width, **switches)
        self.sae.input_scale.fill_(math.nan)  # unset until estimated on the data (or restored)
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))
        self.register_buffer("firing_frequency", torch.zeros(width, dtype=torch.float64))  # EMA over ~W tokens
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("steps_trained", torch.tensor(0, dtype=torch.long))  # restored by validate/test too
        self.register_buffer("initialized", torch.tensor(False))

    def configure_model(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_d = getattr(datamodule, "d_model", None) if datamodule is not None else None
        if self.sae is None:
            if data_d is None:
                raise ValueError("model.d_in is not set and the datamodule does not report an activation size")
            self._build(data_d)
        elif data_d is not None and data_d != self.sae.d_in:
            raise ValueError(
                f"The SAE has d_in={self.sae.d_in} but the hookpoint's activations have size {data_d}: set "
                f"model.init_args.d_in to {data_d} (or leave it unset), or pick a matching model/hookpoint."
            )

    def _ensure_input_scale(self) -> None:
        if math.isnan(float(self.sae.input_scale)):
            scale = self.trainer.datamodule.estimate_input_scale()
            self.sae.input_scale.fill_(scale)
            self.print(f"Normalization: activations × {scale:.5g} so that E‖x‖² = d = {self.sae.d_in}")

    def on_fit_start(self) -> None:
        self._ensure_input_scale()

    def on_validation_start(self) -> None:
        self._ensure_input_scale()  # a no-op once estimated or restored

    def on_test_start(self) -> None:
        self._ensure_input_scale()

    # ----- schedules ----------------------------------------------------------------------------------
    def sparsity_coefficient(self) -> float:
        """λ on its linear warmup, by training steps taken (so a stand-alone validate uses the trained λ)."""
        warmup = self.hparams.sparsity_warmup_steps
        ramp = min(1.0, (int(self.steps_trained) + 1) / warmup) if warmup > 0 else 1.0
        return self.hparams.sparsity_coefficient * ramp

    def configure_optimizers(self):
        betas = tuple(float(beta) for beta in self.hparams.betas)
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr, betas=betas)
        warmup = self.hparams.lr_warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----- steps ----------------------------------------------------------------------------------------
    def _step(self, batch: Tensor, stage: str) -> dict[str, Tensor]:
        x = self.sae.normalize(batch)
        on_step = stage == "train"
        out = self.sae.loss(x, self.sparsity_coefficient(), dead=self.dead_mask() if on_step else None)
        self.log(f"{stage}/loss", out.total, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        for name, value in out.terms.items():
            self.log(f"{stage}/loss_{name}", value, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        result = {"loss": out.total, "x": x, "x_hat": out.reconstruction.detach(), "codes": out.codes.detach()}
        if out.gate_reconstruction is not None:
            result["gate_x_hat"] = out.gate_reconstruction.detach()
        return result

    def _any_rank(self, condition: bool) -> bool:
        """The same decision on every rank (a rank that skips alone would hang DDP)."""
        flag = torch.tensor(float(condition), device=self.device)
        return bool(self.trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor] | None:
        if self._any_rank(not bool(torch.isfinite(batch).all())):
            self.skipped_batches += 1
            self.log("train/skipped_nonfinite_batches", float(self.skipped_batches), on_step=True)
            rank_zero_warn(f"Skipped a batch with non-finite activations at step {self.global_step} "
                           f"({self.skipped_batches} so far)")
            return None
        if not self.initialized:
            self.sae.initialize_from_batch(self.trainer.strategy.reduce(self.sae.normalize(batch), reduce_op="mean"))
            self.initialized.fill_(True)
        result = self._step(batch, "train")
        if self._any_rank(not bool(torch.isfinite(result["loss"]))):
            path = rescue_checkpoint(self.trainer, f"nonfinite-step{self.global_step}.ckpt")
            raise FloatingPointError(
                f"Non-finite loss at step {self.global_step}: the weights before this step are saved in {path}. "
                f"Lower model.init_args.lr or the sparsity coefficient, or check the activations."
            )
        self.log("train/sparsity_coefficient", self.sparsity_coefficient(), on_step=True)
        self._track_firing(result["codes"])
        self.steps_trained += 1
        return result

    def validation_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "test")

    # ----- dead latents -----------------------------------------------------------------------------------
    def _track_firing(self, codes: Tensor) -> None:
        """Per-latent firing across all ranks (sums, so every rank holds the same state)."""
        counts = self.trainer.strategy.reduce((codes != 0).sum(0).double(), reduce_op="sum")
        tokens = len(codes) * self.trainer.world_size
        self.tokens_since_fired.add_(tokens).masked_fill_(counts > 0, 0)
        self.tokens_seen.add_(tokens)
        rate = min(1.0, tokens / self.hparams.dead_window_tokens)
        self.firing_frequency.lerp_(counts / tokens, rate)

    def dead_mask(self) -> Tensor:
        """Latents with no non-zero code in the last `dead_window_tokens` training tokens."""
        return self.tokens_since_fired >= self.hparams.dead_window_tokens

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What `sagsae export` needs to rebuild the SAE with torch alone, and the run's latest metrics."""
        checkpoint["sae"] = {"architecture": self.architecture, "d_in": self.sae.d_in, "width": self.sae.width,
                             "switches": {name: self.hparams[name] for name in self.architecture_args}}
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "describe"):
            checkpoint["activations"] = datamodule.describe()
        checkpoint["sae_metrics"] = {name: float(value) for name, value in self.trainer.callback_metrics.items()
                                     if name.startswith(("train/", "val/"))}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.before_optimizer_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.sae.after_optimizer_step()
        if self.hparams.reset_dead_latents:
            dead = self.dead_mask()
            if dead.any():
                self.sae.reset_dead(dead)
