"""The one LightningModule that trains any registered SAE: optimizer, LR and λ warmup, normalization, dead-latent
tracking. The SAE (pure torch, `sagsae.saes`) is given as a class to build: in a config, `sae: {class_path,
init_args}` without d_in, which is built in `configure_model` once the datamodule knows the activation size.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_modules.checkpointing import rescue_checkpoint
from sagsae.measures import deciles, step_summary
from sagsae.saes import SparseAutoencoder, sae_class
from sagsae.saes.base import squared_error
from sagsae.saes.gated_chain import compile_gated_chain

SAEFactory = Callable[[int], SparseAutoencoder]  # d_in → the SAE, its other arguments already bound
PROBE_D_IN = 64  # an activation size for checking an SAE's arguments before the data gives the real one


SKIP_STARTS = ("zeros", "least_squares")  # `skip_start`'s choices
FIRING_ROWS = 1024  # rows per block of `firing_counts`
LOSS_SPIKE_RATIO = 2.0  # a training loss this many times its recent average is a spike (docs/method.md, "The gate path")


def split_pairs(batch: Tensor) -> tuple[Tensor, Tensor | None]:
    """(source, target) of a transcoder's batch of pairs [B, 2, d]; (batch, None) for an autoencoder's [B, d]."""
    return (batch[:, 0], batch[:, 1]) if batch.dim() == 3 else (batch, None)


def firing_counts(codes: Tensor) -> Tensor:
    """How many tokens of a batch each latent fired on ([B, H] → [H], float). Summed as floats over blocks of
    rows: an integer sum over a [B, H] mask is an unvectorized loop on CPU, and a float copy of the whole batch is
    a fresh allocation every step (at 4096 × 4608 on one core, 169 ms against 51 ms for the blocks)."""
    counts = codes.new_zeros(codes.shape[-1], dtype=torch.float32)
    for block in codes.split(FIRING_ROWS):
        counts += (block != 0).float().sum(0)
    return counts


# Bookkeeping buffers newer than some checkpoints: a checkpoint without them resumes with their fresh values.
LATER_BUFFERS = ("revivals", "loss_average", "loss_spikes", "spiking", "lambda_scale", "l0_average", "l0_trend_base",
                 "lambda_drift")


def keep_fresh_bookkeeping(module: L.LightningModule, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """A load_state_dict pre-hook: fill in the LATER_BUFFERS a checkpoint lacks with the module's own values."""
    for name in LATER_BUFFERS:
        state_dict.setdefault(prefix + name, getattr(module, name).clone())


def linear_warmup(step: int, warmup_steps: int) -> float:
    """The share of a warmed-up quantity (λ, the learning rate) at 0-based `step`: (step + 1) / warmup_steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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
        dead_window_tokens: a latent that has not fired in this many training tokens is dead (SPEC §6); so is
            one that the dead-latent reset revived within that many tokens (`dead_fraction`).
        reset_dead_latents: let the architecture react to dead latents (SA-GSAE: threshold reset).
        target_l0: steer λ so that training settles at this L0 (None: λ stays at `sparsity_coefficient`). λ warms
            up toward `sparsity_coefficient` while the training L0 is heading above the target within ~200
            steps, and an integral controller on log λ (`steer_sparsity`) follows the training L0 over all ranks (the
            idea of SAELens's and Gemma Scope 2's target L0). Not for k-sparse SAEs, whose k sets L0.
        target_l0_rate: the controller's gain: log λ grows by this times log(L0 / target) a step.
        init_seed: seed of the SAE's initial weights alone (None = the global generator), so that a sweep
            member and a stand-alone run with the same seed start from the same weights.
        sparse_decode_below: decode from the non-zero codes alone when at most this share of them is non-zero
            (the same values and gradients, fewer operations at low density; `SparseAutoencoder.decode`); None
            decodes densely. The TopK family always decodes its k pairs sparsely.
        compile_chain: run the gated SAEs' fused elementwise chain through torch.compile (`compile_gated_chain`;
            the first step compiles). A switch for the whole process.
        skip_connection: for a transcoder (data that pairs a source hookpoint with a target one, e.g.
            `data.target_hookpoint: mlp_out` on `hookpoint: mlp_in`), add a learned linear map W_skip x of the
            source to the decode (a skip-transcoder). The SAE becomes a transcoder whenever the data are pairs.
        skip_start: where W_skip starts: "zeros", or "least_squares", the ridge least-squares map from the first
            batch's source to its target (b_dec then starts at that map's bias), so that the codes start on what
            no linear map explains (docs/method.md, "Transcoders").
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
        sparse_decode_below: float | None = None,
        compile_chain: bool = False,
        skip_connection: bool = False,
        skip_start: str = "zeros",
    ) -> None:
        super().__init__()
        for name, value in [("sparsity_coefficient", sparsity_coefficient), ("lr", lr),
                            ("threshold_lr_scale", threshold_lr_scale)]:
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"model.{name} must be a finite non-negative number, got {value}")
        if not 0 <= lr_decay_fraction <= 1:
            raise ValueError(f"model.lr_decay_fraction must lie in [0, 1], got {lr_decay_fraction}")
        if dead_window_tokens <= 0:
            raise ValueError(f"model.dead_window_tokens must be positive, got {dead_window_tokens}")
        if target_l0 is not None and not (target_l0 > 0 and math.isfinite(target_l0)):
            raise ValueError(f"model.target_l0 must be a positive number of latents per token (or null), "
                             f"got {target_l0}")
        if sparse_decode_below is not None and not 0 <= sparse_decode_below <= 1:
            raise ValueError(f"model.sparse_decode_below must lie in [0, 1] (or null), got {sparse_decode_below}")
        if not (target_l0_rate > 0 and math.isfinite(target_l0_rate)):
            raise ValueError(f"model.target_l0_rate must be a positive number, got {target_l0_rate}")
        if skip_start not in SKIP_STARTS:
            raise ValueError(f"model.skip_start must be one of {', '.join(SKIP_STARTS)}, got {skip_start!r}")
        if skip_start != "zeros" and not skip_connection:
            raise ValueError(f"model.skip_start {skip_start!r} starts a skip connection: set model.skip_connection "
                             f"true, or drop skip_start")
        self.save_hyperparameters()
        self.make_sae = sae
        self.sae: SparseAutoencoder | None = None
        self.skipped_batches = 0
        self._known_initialized = False  # a Python copy of the `initialized` buffer once it is True
        self._known_steps_trained = -1  # a Python copy of the `steps_trained` buffer once read (-1: not yet)
        if d_in is not None:
            self._build(d_in, transcoder=skip_connection)
        else:  # the SAE's own checks (width, k, quantiles) now, on the meta device, not after the LM has loaded
            with torch.device("meta"):
                self._check_target_l0(sae(PROBE_D_IN))

    def _check_target_l0(self, sae: SparseAutoencoder) -> None:
        if self.hparams.target_l0 is not None and sae.k_sparse:
            raise ValueError(f"model.target_l0 steers λ, which {type(sae).__name__} does not have: its k sets L0 "
                             f"(set k to the L0 you want and leave target_l0 null)")


    @classmethod
    def from_arguments(cls, sae: str | type[SparseAutoencoder], **arguments: Any) -> SAEModule:
        """A module from one flat set of arguments (what a sweep member lists): those of `SAEModule` train, the
        rest configure the SAE, given by registry name or class."""
        architecture = sae_class(sae) if isinstance(sae, str) else sae
        training = set(inspect.signature(cls.__init__).parameters) - {"self", "sae"}
        switches = {k: v for k, v in arguments.items() if k not in training}
        accepted = set(inspect.signature(architecture.__init__).parameters) - {"self", "d_in"}
        unknown = sorted(set(switches) - accepted)
        if unknown:
            raise ValueError(f"{architecture.__name__} has no argument(s) {unknown}: training arguments are "
                             f"{sorted(training)}, the SAE's are {sorted(accepted)}")
        module = cls(sae=functools.partial(architecture, **switches),
                     **{k: v for k, v in arguments.items() if k in training})
        # the SAE recorded as the CLI records it, as plain data: checkpoints open with torch.load(weights_only=True)
        module.hparams["sae"] = {"class_path": f"{architecture.__module__}.{architecture.__qualname__}",
                                 "init_args": switches}
        return module

    # ----- construction -------------------------------------------------------------------------------
    def _build(self, d_in: int, transcoder: bool) -> None:
        with torch.random.fork_rng(devices=[]):
            if self.hparams.init_seed is not None:
                torch.manual_seed(self.hparams.init_seed)
            self.sae = self.make_sae(d_in)
            if transcoder:
                self.sae.make_transcoder(skip=self.hparams.skip_connection)
        self._check_target_l0(self.sae)
        self.sae.sparse_decode_below = self.hparams.sparse_decode_below
        if self.hparams.compile_chain:
            compile_gated_chain()
        width = self.sae.width
        self.sae.input_scale.fill_(math.nan)  # unset until estimated on the data (or restored)
        if self.sae.target_scale is not None:
            self.sae.target_scale.fill_(math.nan)
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))
        window = self.hparams.dead_window_tokens
        self.register_buffer("tokens_since_reset", torch.full((width,), window, dtype=torch.long))
        self.register_buffer("reset_latents", torch.tensor(0, dtype=torch.long))  # reset at the latest step
        self.register_buffer("revivals", torch.zeros(width, dtype=torch.long))  # each latent's reset events
        self.register_buffer("loss_average", torch.tensor(0.0))  # the training loss's EMA over ~100 steps (0: none yet)
        self.register_buffer("loss_spikes", torch.tensor(0, dtype=torch.long))
        self.register_buffer("spiking", torch.tensor(False))  # whether the latest step's loss was in a spike
        self.register_buffer("lambda_scale", torch.tensor(1.0))  # the target-L0 controller's factor on λ
        self.register_buffer("l0_average", torch.tensor(0.0))  # its moving averages of the training L0 (0: none yet)
        self.register_buffer("l0_trend_base", torch.tensor(0.0))
        self.register_buffer("lambda_drift", torch.tensor(0.0))  # the controller's learned ramp of log λ per step
        thresholds = self.sae.threshold_values()  # their start, once initialized on the first batch
        self.register_buffer("initial_thresholds", None if thresholds is None else torch.full_like(thresholds, math.nan))
        self.register_buffer("firing_frequency", torch.zeros(width, dtype=torch.float64))  # EMA over ~W tokens
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("steps_trained", torch.tensor(0, dtype=torch.long))  # restored by validate/test too
        self.register_buffer("initialized", torch.tensor(False))
        self.register_load_state_dict_pre_hook(keep_fresh_bookkeeping)

    def configure_model(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_d = getattr(datamodule, "d_model", None) if datamodule is not None else None
        pairs = bool(getattr(datamodule, "pairs", False))
        if self.hparams.skip_connection and datamodule is not None and not pairs:
            raise ValueError("model.skip_connection is for transcoders: give the data a target hookpoint "
                             "(data.init_args.target_hookpoint, e.g. mlp_out on hookpoint mlp_in), or drop it")
        if self.sae is None:
            if data_d is None:
                raise ValueError("model.d_in is not set and the datamodule does not report an activation size")
            self._build(data_d, transcoder=pairs)
        elif pairs != self.sae.is_transcoder and datamodule is not None:
            raise ValueError(f"The SAE was built as {'a transcoder' if self.sae.is_transcoder else 'an autoencoder'} "
                             f"but the data {'are' if pairs else 'are not'} (source, target) pairs: leave model.d_in "
                             f"unset so that the data decide")
        elif data_d is not None and data_d != self.sae.d_in:
            raise ValueError(
                f"The SAE has d_in={self.sae.d_in} but the hookpoint's activations have size {data_d}: set "
                f"model.d_in to {data_d} (or leave it unset), or pick a matching model/hookpoint."
            )

    def needs_scales(self) -> bool:
        """Whether the normalization scalars are still to be estimated (not yet, and not restored)."""
        return math.isnan(float(self.sae.input_scale))

    def apply_scales(self, scales: Sequence[float]) -> None:
        """Set the scalars that `estimate_scales` of the datamodule measured (one per side of the data)."""
        self.sae.set_scales(scales)
        sides = ("activations",) if len(scales) == 1 else ("source", "target")
        self.print("Normalization: " + ", ".join(f"{side} × {scale:.5g}" for side, scale in zip(sides, scales))
                   + f" so that E‖x‖² = d = {self.sae.d_in}")

    def _ensure_input_scale(self) -> None:
        if self.needs_scales():
            self.apply_scales(self.trainer.datamodule.estimate_scales())

    def on_fit_start(self) -> None:
        self._ensure_input_scale()

    def on_validation_start(self) -> None:
        self._ensure_input_scale()  # a no-op once estimated or restored

    def on_test_start(self) -> None:
        self._ensure_input_scale()

    # ----- schedules ----------------------------------------------------------------------------------
    def sparsity_coefficient(self) -> float | Tensor:
        """λ on its linear warmup, by training steps taken (so a stand-alone validate uses the trained λ); with
        `target_l0`, times the controller's factor (a tensor, so that a GPU step need not read it back)."""
        ramp = self.sparsity_ramp(self.known_steps_trained())
        if self.hparams.target_l0 is None:
            return self.hparams.sparsity_coefficient * ramp
        return self.hparams.sparsity_coefficient * ramp * self.lambda_scale

    def sparsity_ramp(self, steps_trained: int) -> float:
        """The warmup's share of λ for the step after `steps_trained` steps."""
        return linear_warmup(steps_trained, self.hparams.sparsity_warmup_steps)

    def steer_sparsity(self, l0: Tensor) -> None:
        """The target-L0 controller's step, on log λ. Its error is e = log(L̄0 / target), L̄0 the training L0's moving
        average over ~20 steps, clipped to ±1. Each step log λ moves by `target_l0_rate` · e (the integral term) plus a
        learned drift. The drift is there because an SAE that learns gives ever sparser codes at a fixed λ, so λ has to
        keep falling to hold an L0, and an integral term alone follows such a ramp only with a standing error of ramp /
        rate (5.4% in the full default run at rate 0.003). The drift sums the integral term's steps over ~500 steps,
        with e clipped to ±0.1, while L0 is not closing and either near the target (|e| < 0.1) or stalled (its ~80-step
        trend under 1%), so that the approach, where L0 moves, does not wind it up; with it L0 rests at the target while
        λ ramps. A drift that learned only near the target froze for good once a ramp steeper than 0.1 · rate held the
        error outside that band (SA-GSAE(H)+skip transcoder at target 80: held-out L0 64–68 for 3,000 steps). The
        integral holds while L0 already heads for the target fast enough to reach it within ~200 steps (from L̄0 against
        its ~100-step average): Adam moves thresholds at a bounded speed whatever λ is, so a sum that kept growing while
        the SAE catches up would overshoot by as much (anti-windup). During λ's warmup the ramp advances only while L̄0
        heads above the target within ~200 steps, and then climbs its own step (sparsity_coefficient /
        sparsity_warmup_steps) from wherever λ was held: L0 follows λ late, and a ramp that went on to a λ far above the
        target's pushed L0 to a third of the target first, while a λ held at the bottom of its ramp let L0 run to 5× a
        target above its start. Otherwise λ holds, and below the target the controller acts as it does after the warmup,
        without the drift (docs/method.md, "Asking for an L0")."""
        if self.hparams.target_l0 is None:
            return
        for average, rate in ((self.l0_average, 1 / 20), (self.l0_trend_base, 1 / 100)):
            average.copy_(torch.where(average == 0, l0, average.lerp(l0, rate)))
        error = (self.l0_average.clamp(min=1e-3) / self.hparams.target_l0).log().clamp(-1, 1)
        # The two averages lag each other by ~80 steps, so their log ratio is the trend of log L0 over 80 steps;
        # carried on for 200 steps it gives the error L̄0 heads for, which the error closes when it has not the
        # error's sign.
        heading = (self.l0_average.clamp(min=1e-3) / self.l0_trend_base.clamp(min=1e-3)).log()
        projected = error + heading * (200 / 80)
        closing = projected * error.sign() <= 0
        log_step = torch.where(closing, 0.0, self.hparams.target_l0_rate * error)
        steps = self.known_steps_trained()
        if steps < self.hparams.sparsity_warmup_steps:
            ramp, next_ramp = self.sparsity_ramp(steps), self.sparsity_ramp(steps + 1)
            hold = math.log(ramp / next_ramp)  # cancels the ramp's growth
            climb = ((ramp + (next_ramp - ramp) / self.lambda_scale) / next_ramp).log()  # the ramp's step, from here
            log_step = torch.where(projected > 0, climb, hold + torch.where(error <= 0, log_step, 0.0))
        else:
            learning = ((error.abs() < 0.1) | (heading.abs() < 0.01)) & ~closing
            drift_step = self.hparams.target_l0_rate * error.clamp(-0.1, 0.1) / 500
            self.lambda_drift.add_(torch.where(learning, drift_step, 0.0))
            log_step = log_step + self.lambda_drift
        self.lambda_scale.mul_(log_step.exp())

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then constant, then (with `lr_decay_fraction`) linear decay to 0 at max_steps."""
        factor = linear_warmup(step, self.hparams.lr_warmup_steps)
        total = self.trainer.max_steps
        decay_steps = int(self.hparams.lr_decay_fraction * total)
        if decay_steps > 0:
            factor = min(factor, max(0.0, (total - step) / decay_steps))
        return factor

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """This SAE's Adam parameter groups: its thresholds (at `threshold_lr_scale` × lr) and the rest; a sweep
        puts every member's groups in one optimizer."""
        betas = tuple(float(beta) for beta in (self.sae.adam_betas if self.hparams.betas is None else self.hparams.betas))
        thresholds = self.sae.threshold_parameters() if self.hparams.threshold_lr_scale != 1 else []
        others = [p for p in self.sae.parameters() if all(p is not t for t in thresholds)]
        groups = [{"name": "weights", "params": others, "lr": self.hparams.lr, "betas": betas}]
        if thresholds:  # the names are what LearningRateMonitor logs: lr-Adam/weights, lr-Adam/thresholds
            groups.append({"name": "thresholds", "params": thresholds,
                           "lr": self.hparams.lr * self.hparams.threshold_lr_scale, "betas": betas})
        return groups

    def configure_optimizers(self):
        groups = self.optimizer_groups()
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [self.lr_factor] * len(groups))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----- steps ----------------------------------------------------------------------------------------
    def evaluate_batch(self, batch: Tensor, train: bool = False) -> dict[str, Tensor]:
        """Loss terms, normalized input, reconstruction and codes of one batch (no logging, no bookkeeping); in
        training also each latent's firing count, which the dead-latent window needs."""
        source, target = split_pairs(batch)
        x = self.sae.normalize(source)
        y = x if target is None else self.sae.normalize_target(target)
        out = self.sae.loss(x, self.sparsity_coefficient(), dead=self.dead_mask() if train else None, target=y)
        result = {"loss": out.total, "target": y, "x_hat": out.reconstruction.detach(), "codes": out.codes.detach(),
                  **{f"loss_{name}": value for name, value in out.terms.items()}}
        if out.gate_squared_error is not None:
            result["gate_squared_error"] = out.gate_squared_error
        if train:
            result["firing"] = out.firing if out.firing is not None else firing_counts(result["codes"])
            result["summary"] = step_summary(y, out.squared_error.detach(), result["firing"], out.gate_squared_error)
        elif self.sae.W_skip is not None:  # how much the skip path alone explains (held out)
            with torch.no_grad():
                result["skip_squared_error"] = squared_error(y, self.sae.skip(x) + self.sae.b_dec)
        return result

    def _log_losses(self, result: dict[str, Tensor], stage: str) -> None:
        on_step = stage == "train"
        for name, value in result.items():
            if name.startswith("loss"):
                self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    def every_rank_batch(self, batch: Tensor) -> Tensor:
        """Every rank's `batch`, concatenated in rank order: the data-driven starts (b_dec, quantile thresholds)
        then see the tokens that one process given all ranks' batches would see, and every rank starts alike.
        (An element-wise mean over ranks would shrink the spread that the quantiles measure.)"""
        if self.trainer.world_size == 1:
            return batch
        return self.trainer.strategy.all_gather(batch).flatten(0, 1)

    def check_step(self, batch: Tensor, losses: Sequence[Tensor] = ()) -> bool:
        """Both finiteness checks of a training step in one reduction and one host read. True (with a warning and a
        count) when any rank's batch holds NaN/inf: every rank then skips it (a rank that skipped alone would hang
        DDP). A non-finite loss on finite data saves the weights before the step and stops the run."""
        flags = torch.stack([torch.isfinite(batch).all().logical_not(),
                             *(torch.isfinite(loss.detach()).logical_not() for loss in losses)]).float()
        bad_batch, *bad_losses = (self.trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if bad_batch:
            self.skipped_batches += 1
            rank_zero_warn(f"Skipped a batch with non-finite activations at step {self.trainer.global_step} "
                           f"({self.skipped_batches} so far)")
            return True
        if any(bad_losses):
            path = rescue_checkpoint(self.trainer, f"nonfinite-step{self.trainer.global_step}.ckpt")
            raise FloatingPointError(
                f"Non-finite loss at step {self.trainer.global_step}: the weights before this step are saved in "
                f"{path}. Lower model.lr or model.sparsity_coefficient, or check the activations."
            )
        return False

    def first_batch_unusable(self, batch: Tensor) -> bool:
        """The first batch sets the data-driven starts, so it is checked before them (later batches are checked
        once, with their loss, by `check_step`)."""
        return not self.data_initialized() and self.check_step(batch)

    def train_forward(self, batch: Tensor) -> dict[str, Tensor]:
        """A training batch's loss and outputs (as `evaluate_batch`), after the data-driven starts on the first."""
        if not self.data_initialized():
            source, target = split_pairs(self.every_rank_batch(batch))
            self.sae.initialize_from_batch(self.sae.normalize(source))
            if target is not None:
                fit_skip = self.hparams.skip_start == "least_squares"
                self.sae.initialize_target(self.sae.normalize_target(target),
                                           self.sae.normalize(source) if fit_skip else None)
            if self.initial_thresholds is not None:
                self.initial_thresholds.copy_(self.sae.threshold_values())
            self.initialized.fill_(True)
            self._known_initialized = True
        return self.evaluate_batch(batch, train=True)

    def record_step(self, firing: Tensor, tokens: int, loss: Tensor) -> None:
        """A kept step's bookkeeping: this rank's per-latent firing counts (`firing_counts`), the step count, and
        whether its loss spiked: more than twice its average over the last ~100 steps, once λ has warmed up (while
        λ grows the loss may rise by design). Counted without a host read, once per spike."""
        loss = self._track_firing(firing, tokens, loss)
        warmed_up = self.known_steps_trained() >= self.hparams.sparsity_warmup_steps
        if warmed_up:  # a spike counts once, however many steps the loss stays above twice its average
            spiking = (self.loss_average > 0) & (loss > LOSS_SPIKE_RATIO * self.loss_average)
            self.loss_spikes += (spiking & ~self.spiking).long()
            self.spiking.copy_(spiking)
        self.loss_average.copy_(torch.where(self.loss_average == 0, loss, self.loss_average.lerp(loss, 0.01)))
        self._known_steps_trained = self.known_steps_trained() + 1
        self.steps_trained += 1

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor] | None:
        if self.first_batch_unusable(batch):
            return self.log_skipped()
        result = self.train_forward(batch)
        if self.check_step(batch, [result["loss"]]):
            return self.log_skipped()
        self.record_step(result["firing"], len(batch), result["loss"])
        self._log_losses(result, "train")
        self.log("train/sparsity_coefficient", self.sparsity_coefficient(), on_step=True)
        return result

    def log_skipped(self) -> None:
        """Count a skipped batch in the logs (training_step then returns None: no backward, no step)."""
        self.log("train/skipped_nonfinite_batches", float(self.skipped_batches), on_step=True)

    def validation_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        result = self.evaluate_batch(batch)
        self._log_losses(result, "val")
        return result

    def test_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        result = self.evaluate_batch(batch)
        self._log_losses(result, "test")
        return result

    # ----- dead latents -----------------------------------------------------------------------------------
    def _track_firing(self, firing: Tensor, tokens: int, loss: Tensor) -> Tensor:
        """Per-latent firing across all ranks (sums, so every rank holds the same state); returns the loss's mean
        over the ranks, summed in the same reduction."""
        totals = self.trainer.strategy.reduce(torch.cat([firing.double(), loss.detach().double().reshape(1)]),
                                              reduce_op="sum")
        counts, loss = totals[:-1], (totals[-1] / self.trainer.world_size).float()
        tokens = tokens * self.trainer.world_size
        self.tokens_since_fired.add_(tokens).masked_fill_(counts > 0, 0)
        self.tokens_since_reset.add_(tokens)
        self.tokens_seen.add_(tokens)
        rate = min(1.0, tokens / self.hparams.dead_window_tokens)
        self.firing_frequency.lerp_(counts / tokens, rate)
        self.steer_sparsity(counts.sum().float() / tokens)
        return loss

    def dead_mask(self) -> Tensor:
        """Latents with no non-zero code in the last `dead_window_tokens` training tokens."""
        return self.tokens_since_fired >= self.hparams.dead_window_tokens

    def dead_fraction(self) -> Tensor:
        """The share of latents dead in the window, counting those the reset revived within it: a reset that
        makes a latent fire again hides, but does not undo, its death (SPEC §6)."""
        revived = self.tokens_since_reset < self.hparams.dead_window_tokens
        return (self.dead_mask() | revived).float().mean()

    def training_diagnostics(self) -> dict[str, Tensor]:
        """What could drive a run's drift (docs/method.md, "The gate path"): how many latents the dead-latent reset has
        revived in all and how many of those died and were revived again, the loss spikes so far, the SAE's own
        scale_diagnostics, and the thresholds' 10/50/90% quantiles (θ⁺ and θ⁻ each where they are untied)."""
        values = {"revived_latents": (self.revivals > 0).sum().float(),
                  "revived_again": (self.revivals > 1).sum().float(), "loss_spikes": self.loss_spikes.float()}
        values |= {name: value.float() for name, value in self.sae.scale_diagnostics().items()}
        thresholds = self.sae.threshold_values()
        if thresholds is not None and self.data_initialized():
            sides = thresholds.reshape(-1, self.sae.width).float()
            names = ("",) if len(sides) == 1 else ("_pos", "_neg")
            for name, side in zip(names, sides):
                finite = side[torch.isfinite(side)]
                if len(finite):
                    values |= deciles(finite, f"theta{name}")
        return values

    def threshold_changes(self) -> tuple[Tensor, Tensor] | None:
        """(|θ − θ₀| of every threshold, |θ − θ₀| / |θ₀| of those with θ₀ ≠ 0) since the first batch; None for
        SAEs without thresholds or before training."""
        if self.initial_thresholds is None or not self.data_initialized():
            return None
        start = self.initial_thresholds
        change = (self.sae.threshold_values() - start).abs()
        return change, change[start != 0] / start[start != 0].abs()

    def threshold_movement(self) -> dict[str, Tensor]:
        """The medians of `threshold_changes` (the relative one NaN where every θ₀ is 0); empty without them."""
        changes = self.threshold_changes()
        if changes is None:
            return {}
        absolute, relative = changes
        return {"threshold_abs_change": absolute.median(),
                "threshold_rel_change": relative.median() if len(relative) else torch.tensor(math.nan)}

    def data_initialized(self) -> bool:
        """Whether the first batch has set the data-driven starts. The buffer (restored from checkpoints) is read
        until it says True, then a Python copy answers: a GPU step need not wait on the device to know it."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def known_steps_trained(self) -> int:
        """`steps_trained` as a Python int, read from the buffer once after construction or a restore: λ's warmup
        asks for it every step, and a GPU step need not wait on the device to know it."""
        if self._known_steps_trained < 0:
            self._known_steps_trained = int(self.steps_trained)
        return self._known_steps_trained

    def forget_known_buffers(self) -> None:
        """After a restore: read `initialized` and `steps_trained` from the restored buffers again."""
        self._known_initialized = False
        self._known_steps_trained = -1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.forget_known_buffers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What `sagsae export` needs to rebuild the SAE with torch alone, and the run's latest metrics."""
        checkpoint["sae"] = {"architecture": self.sae.architecture, "config": self.sae.config(),
                             "transcoder": self.sae.transcoder_config()}
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "describe"):
            checkpoint["activations"] = datamodule.describe()
        checkpoint["sae_metrics"] = {name: float(value) for name, value in self.trainer.callback_metrics.items()
                                     if name.startswith(("train/", "val/"))}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.before_optimizer_step()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Projections and dead-latent resets, inside the step: callbacks that run after it (a checkpoint
        every N steps) then see, and save, the parameters the next step starts from."""
        self.sae.after_optimizer_step()
        self.reset_latents.zero_()
        if self.hparams.reset_dead_latents:  # without an `if dead.any()`: no host read in a GPU step
            dead = self.dead_mask()
            self.sae.reset_dead(dead)
            self.reset_latents.copy_(dead.sum())
            # A new revival, not the same one again: a latent reset every step until it fires counts once.
            self.revivals.add_(dead & (self.tokens_since_reset >= self.hparams.dead_window_tokens))
            self.tokens_since_reset.masked_fill_(dead, 0)
