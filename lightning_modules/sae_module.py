"""The LightningModule that trains any registered SAE: Lightning glue around one `TrainingState`
(sagsae/training/state.py), which holds the SAE, its λ controller, dead-latent tracker and loss-spike detector. The
SAE (pure torch, `sagsae.saes`) is given as a class to build: in a config, `sae: {class_path, init_args}` without
d_in, which is built in `configure_model` once the datamodule knows the activation size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.step_checks import NonFiniteGuard, data_shape, every_rank_batch, reduce_step
from sagsae.saes import SparseAutoencoder
from sagsae.training import TrainingPlan, TrainingSettings, TrainingState
from sagsae.training.migrations import CHECKPOINT_VERSION, VERSION_KEY, migrate_checkpoint
from sagsae.training.state import SAEFactory


class SAEModule(L.LightningModule):
    """Trains one SAE on normalized activations.

    Args:
        sae: the architecture and its switches, e.g. `{class_path: sagsae.saes.SignAwareGatedSAE, init_args:
            {width: 4608}}` (`--model.sae.help CLASS` lists a class's switches).
        d_in: activation size; None = take it from the datamodule (a mismatch with the data is an error).
        sparsity_coefficient: λ, reached linearly over `sparsity_warmup_steps` (unused by k-sparse SAEs).
        lr: Adam learning rate, reached linearly over `lr_warmup_steps`.
        lr_decay_fraction: decay the LR linearly to zero over this last share of `trainer.max_steps` (0 = none).
        betas: Adam betas; None = the architecture's own (TopK family (0.9, 0.999), others (0, 0.999)).
        threshold_lr_scale: the thresholds' learning rate (SA-GSAE and JumpReLU θ, Gated b_gate) as a multiple
            of `lr`: Adam moves a parameter about one learning rate per step whatever its gradient, so thresholds
            of order 1 travel at most lr·steps (docs/method.md, "Thresholds").
        dead_window_tokens: a latent that has not fired in this many training tokens is dead; so is one that the
            dead-latent reset revived within that many tokens (`train/dead_fraction`).
        reset_dead_latents: let the architecture react to dead latents (SA-GSAE: threshold reset).
        target_l0: steer λ so that training settles at this L0 (None: λ stays at `sparsity_coefficient`), with
            the controller of docs/method.md, "Asking for an L0" (`TargetL0Controller`). Not for k-sparse SAEs,
            whose k sets L0.
        target_l0_rate: the controller's gain: log λ grows by this times log(L0 / target) a step.
        init_seed: seed of the SAE's initial weights alone (None = the global generator), so that a sweep
            member and a stand-alone run with the same seed start from the same weights.
        sparse_decode_below: decode from the non-zero codes alone when at most this share of them is non-zero
            (the same values and gradients, fewer operations at low density; `SparseAutoencoder.decode`); None
            decodes densely; auto takes 0.05 for fp32 codes on CPU, where that is measured faster, and decodes
            densely otherwise. The TopK family always decodes its k pairs sparsely.
        compile_chain: run the gated SAEs' fused elementwise chain through torch.compile (`compile_gated_chain`;
            the first step compiles), for GPUs. A switch for the whole process. Off, a CPU runs the chain's C++
            kernel (sagsae/saes/native_chain.py), within 1.2x of its memory floor in fp32.
        skip_connection: for a transcoder (data that pairs a source hookpoint with a target one, e.g.
            `data.target_hookpoint: mlp_out` on `hookpoint: mlp_in`), add a learned linear map W_skip x of the
            source to the decode (a skip-transcoder). The SAE becomes a transcoder whenever the data are pairs.
        skip_start: where W_skip starts: "zeros", or "least_squares", the ridge least-squares map from the first
            batch's source to its target (b_dec then starts at that map's bias), so that the codes start on what
            no linear map explains (docs/method.md, "Transcoders").
        matryoshka_widths: make every prefix of the latents reconstruct on its own (a Matryoshka SAE): the
            increasing prefix sizes, ending at the width, e.g. [512, 2048, 4608] (docs/method.md, "Matryoshka SAEs").
        matryoshka_weights: the loss weight of each prefix below the full width (default 1 each; the full
            width's reconstruction keeps weight 1).
        matryoshka_random: draw new prefix sizes every training step (as many as the fixed ones), as in
            Nabeshima's original; validation reads the fixed ones.
    """

    def __init__(
        self,
        sae: SAEFactory,
        d_in: int | None = None,
        sparsity_coefficient: float = 1.0,
        sparsity_warmup_steps: int = 200,
        lr: float = 1e-3,
        lr_warmup_steps: int = 50,
        lr_decay_fraction: float = 0.0,
        betas: tuple[float, float] | None = None,
        threshold_lr_scale: float = 1.0,
        dead_window_tokens: int = 1_000_000,
        reset_dead_latents: bool = True,
        target_l0: float | None = None,
        target_l0_rate: float = 0.003,
        init_seed: int | None = None,
        sparse_decode_below: float | Literal["auto"] | None = "auto",
        compile_chain: bool = False,
        skip_connection: bool = False,
        skip_start: str = "zeros",
        matryoshka_widths: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        matryoshka_random: bool = False,
    ) -> None:
        super().__init__()
        settings = TrainingSettings(
            sparsity_coefficient=sparsity_coefficient, sparsity_warmup_steps=sparsity_warmup_steps, lr=lr,
            lr_warmup_steps=lr_warmup_steps, lr_decay_fraction=lr_decay_fraction,
            betas=None if betas is None else tuple(betas), threshold_lr_scale=threshold_lr_scale,
            dead_window_tokens=dead_window_tokens, reset_dead_latents=reset_dead_latents, target_l0=target_l0,
            target_l0_rate=target_l0_rate, init_seed=init_seed, sparse_decode_below=sparse_decode_below,
            compile_chain=compile_chain, skip_connection=skip_connection, skip_start=skip_start,
            matryoshka_widths=None if matryoshka_widths is None else tuple(matryoshka_widths),
            matryoshka_weights=None if matryoshka_weights is None else tuple(matryoshka_weights),
            matryoshka_random=matryoshka_random)
        self.save_hyperparameters()
        self.plan = TrainingPlan(sae, settings)
        self.state: TrainingState | None = None
        self.nonfinite = NonFiniteGuard()
        if d_in is not None:
            self.state = self.plan.build(d_in, transcoder=skip_connection)
        else:  # the SAE's own checks now, not after the LM has loaded
            self.plan.check()

    @classmethod
    def from_plan(cls, plan: TrainingPlan, d_in: int | None = None) -> SAEModule:
        """The module that trains `plan` alone, as a sweep would train it as a member."""
        module = cls(sae=plan.make_sae, d_in=d_in, **plan.settings.as_dict())
        record = plan.sae_record()  # as the CLI records it, plain data: checkpoints open with weights_only=True
        if record is not None:
            module.hparams["sae"] = record
        return module

    @classmethod
    def from_arguments(cls, sae: str | type[SparseAutoencoder], d_in: int | None = None, **arguments: Any) -> SAEModule:
        """A module from one flat set of arguments (`TrainingPlan.from_arguments`): the settings train, the rest
        configure the SAE, given by registry name or class."""
        return cls.from_plan(TrainingPlan.from_arguments(sae, **arguments), d_in)

    @property
    def sae(self) -> SparseAutoencoder | None:
        return None if self.state is None else self.state.sae

    def configure_model(self) -> None:
        d_in, pairs = data_shape(self.trainer, self.plan.settings)
        if self.state is None:
            if d_in is None:
                raise ValueError("model.d_in is not set and the datamodule does not report an activation size")
            self.state = self.plan.build(d_in, transcoder=pairs)
        elif pairs is not None and pairs != self.sae.is_transcoder:
            raise ValueError(f"The SAE was built as {'a transcoder' if self.sae.is_transcoder else 'an autoencoder'} "
                             f"but the data {'are' if pairs else 'are not'} (source, target) pairs: leave model.d_in "
                             f"unset so that the data decide")
        elif d_in is not None and d_in != self.sae.d_in:
            raise ValueError(
                f"The SAE has d_in={self.sae.d_in} but the hookpoint's activations have size {d_in}: set "
                f"model.d_in to {d_in} (or leave it unset), or pick a matching model/hookpoint.")

    # ----- normalization ------------------------------------------------------------------------------
    def apply_scales(self, scales: Sequence[float]) -> None:
        """Set the scalars that `estimate_scales` of the datamodule measured (one per side of the data)."""
        self.sae.set_scales(scales)
        sides = ("activations",) if len(scales) == 1 else ("source", "target")
        self.print("Normalization: " + ", ".join(f"{side} × {scale:.5g}" for side, scale in zip(sides, scales))
                   + f" so that E‖x‖² = d = {self.sae.d_in}")

    def _ensure_input_scale(self) -> None:
        if self.state.needs_scales():
            self.apply_scales(self.trainer.datamodule.estimate_scales())

    def on_fit_start(self) -> None:
        self._ensure_input_scale()

    def on_validation_start(self) -> None:
        self._ensure_input_scale()  # a no-op once estimated or restored

    def on_test_start(self) -> None:
        self._ensure_input_scale()

    # ----- optimization -------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        return self.state.lr_factor(step, self.trainer.max_steps)

    def configure_optimizers(self):
        groups = self.state.optimizer_groups()
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [self.lr_factor] * len(groups))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.state.before_optimizer_step()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Projections and dead-latent resets inside the step: callbacks that run after it (a checkpoint every N
        # steps) then see, and save, the parameters the next step starts from.
        self.state.after_optimizer_step()

    # ----- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor] | None:
        if not self.state.data_initialized():
            if self.nonfinite(self.trainer, batch):  # the first batch sets the starts: checked before them
                return self._log_skipped()
            self.state.initialize(every_rank_batch(self.trainer, batch))
        result = self.state.evaluate_batch(batch, train=True)
        if self.nonfinite(self.trainer, batch, [result["loss"]]):
            return self._log_skipped()
        counts, tokens, loss = reduce_step(self.trainer, result["firing"], len(batch), result["loss"])
        self.state.record_step(counts, tokens, loss)
        message = self.state.controller_message()
        if message is not None:
            rank_zero_warn(message)
        for name, value in result.items():
            if name.startswith("loss"):
                self.log(f"train/{name}", value, on_step=True, on_epoch=False)
        self.log("train/sparsity_coefficient", self.state.sparsity_coefficient(), on_step=True)
        return result

    def _log_skipped(self) -> None:
        """Count a skipped batch in the logs (training_step then returns None: no backward, no step)."""
        self.log("train/skipped_nonfinite_batches", float(self.nonfinite.skipped), on_step=True)

    def validation_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def _evaluate(self, batch: Tensor, stage: str) -> dict[str, Tensor]:
        result = self.state.evaluate_batch(batch)
        for name, value in result.items():
            if name.startswith("loss"):
                self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, sync_dist=True)
        return result

    # ----- checkpoints --------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        migrate_checkpoint(checkpoint)  # before Lightning loads its state_dict
        self.state.forget_known_buffers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What `sagsae export` needs to rebuild the SAE with torch alone, and the run's latest metrics."""
        checkpoint[VERSION_KEY] = CHECKPOINT_VERSION
        checkpoint["sae"] = self.state.spec()
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "describe"):
            checkpoint["activations"] = datamodule.describe()
        checkpoint["sae_metrics"] = {name: float(value) for name, value in self.trainer.callback_metrics.items()
                                     if name.startswith(("train/", "val/"))}
