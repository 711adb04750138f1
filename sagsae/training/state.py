"""One SAE's training state: the SAE and the parts that steer and watch it, in torch alone. `fit`'s SAEModule
and a sweep's members wrap it; it never touches a Trainer, so its steps are tested without Lightning."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from sagsae.measures import deciles, step_summary
from sagsae.saes import SparseAutoencoder, sae_class
from sagsae.saes.base import squared_error
from sagsae.saes.gated_chain import compile_gated_chain
from sagsae.training.controller import TargetL0Controller
from sagsae.training.dead_latents import DeadLatentTracker
from sagsae.training.loss_spikes import LossSpikeDetector
from sagsae.training.schedules import learning_rate_factor, linear_warmup

SAEFactory = Callable[[int], SparseAutoencoder]  # d_in → the SAE, its other arguments already bound
SKIP_STARTS = ("zeros", "least_squares")  # `skip_start`'s choices
FIRING_ROWS = 1024  # rows per block of `firing_counts`


@dataclass(frozen=True)
class TrainingSettings:
    """How one SAE trains (SAEModule's arguments besides the SAE; its docstring says what each does)."""

    sparsity_coefficient: float = 1.0
    sparsity_warmup_steps: int = 200
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lr_decay_fraction: float = 0.0
    betas: tuple[float, float] | None = None
    threshold_lr_scale: float = 1.0
    dead_window_tokens: int = 1_000_000
    reset_dead_latents: bool = True
    target_l0: float | None = None
    target_l0_rate: float = 0.003
    init_seed: int | None = None
    sparse_decode_below: float | str | None = "auto"
    compile_chain: bool = False
    skip_connection: bool = False
    skip_start: str = "zeros"
    matryoshka_widths: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None
    matryoshka_random: bool = False

    def __post_init__(self) -> None:
        for name in ("sparsity_coefficient", "lr", "threshold_lr_scale"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ValueError(f"model.{name} must be a finite non-negative number, got {value}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ValueError(f"model.lr_decay_fraction must lie in [0, 1], got {self.lr_decay_fraction}")
        if self.dead_window_tokens <= 0:
            raise ValueError(f"model.dead_window_tokens must be positive, got {self.dead_window_tokens}")
        if self.target_l0 is not None and not (self.target_l0 > 0 and math.isfinite(self.target_l0)):
            raise ValueError(f"model.target_l0 must be a positive number of latents per token (or null), "
                             f"got {self.target_l0}")
        share = self.sparse_decode_below
        if share not in (None, "auto") and not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise ValueError(f"model.sparse_decode_below must lie in [0, 1], or be auto or null, got {share!r}")
        if not (self.target_l0_rate > 0 and math.isfinite(self.target_l0_rate)):
            raise ValueError(f"model.target_l0_rate must be a positive number, got {self.target_l0_rate}")
        if self.skip_start not in SKIP_STARTS:
            raise ValueError(f"model.skip_start must be one of {', '.join(SKIP_STARTS)}, got {self.skip_start!r}")
        if self.matryoshka_widths is None and (self.matryoshka_weights is not None or self.matryoshka_random):
            raise ValueError("model.matryoshka_weights and model.matryoshka_random shape Matryoshka levels: set "
                             "model.matryoshka_widths too, e.g. [512, 2048, 4608]")
        if self.skip_start != "zeros" and not self.skip_connection:
            raise ValueError(f"model.skip_start {self.skip_start!r} starts a skip connection: set "
                             f"model.skip_connection true, or drop skip_start")

    @classmethod
    def names(cls) -> set[str]:
        return {field.name for field in fields(cls)}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def nest(self, sae: SparseAutoencoder) -> None:
        """Make `sae` a Matryoshka SAE where the settings ask for one (the widths are checked against its width)."""
        if self.matryoshka_widths is not None:
            sae.make_matryoshka(self.matryoshka_widths, self.matryoshka_weights, self.matryoshka_random)

    def check_sae(self, sae: SparseAutoencoder) -> None:
        """The settings that an SAE's kind rules out."""
        if self.target_l0 is not None and sae.k_sparse:
            raise ValueError(f"model.target_l0 steers λ, which {type(sae).__name__} does not have: its k sets L0 "
                             f"(set k to the L0 you want and leave target_l0 null)")


@dataclass(frozen=True)
class TrainingPlan:
    """An SAE to build once the data give its size, and how it trains: what a sweep member or `fit` starts from."""

    make_sae: SAEFactory
    settings: TrainingSettings

    @classmethod
    def from_arguments(cls, sae: str | type[SparseAutoencoder], **arguments: Any) -> TrainingPlan:
        """A plan from one flat set of arguments (what a sweep member lists): `TrainingSettings`' train, the rest
        configure the SAE, given by registry name or class."""
        architecture = sae_class(sae) if isinstance(sae, str) else sae
        training = TrainingSettings.names()
        switches = {k: v for k, v in arguments.items() if k not in training}
        accepted = set(inspect.signature(architecture.__init__).parameters) - {"self", "d_in"}
        unknown = sorted(set(switches) - accepted)
        if unknown:
            raise ValueError(f"{architecture.__name__} has no argument(s) {unknown}: training arguments are "
                             f"{sorted(training)}, the SAE's are {sorted(accepted)}")
        settings = TrainingSettings(**{k: v for k, v in arguments.items() if k in training})
        return cls(functools.partial(architecture, **switches), settings)

    def sae_record(self) -> dict[str, Any] | None:
        """The SAE as the CLI records it, `{class_path, init_args}`, as plain data (None for another callable)."""
        if not isinstance(self.make_sae, functools.partial) or not isinstance(self.make_sae.func, type):
            return None
        architecture = self.make_sae.func
        return {"class_path": f"{architecture.__module__}.{architecture.__qualname__}",
                "init_args": dict(self.make_sae.keywords)}

    def check(self, probe_d_in: int = 64) -> None:
        """The SAE's own checks (width, k, quantiles) and the settings it rules out, on the meta device: before
        the data, and so before a language model loads."""
        with torch.device("meta"):
            sae = self.make_sae(probe_d_in)
            self.settings.check_sae(sae)
            self.settings.nest(sae)

    def build(self, d_in: int, transcoder: bool) -> TrainingState:
        """The SAE from `make_sae(d_in)` under `init_seed` (so that a sweep member and a stand-alone run with the
        same seed start alike), made a transcoder for paired data, in a fresh state."""
        with torch.random.fork_rng(devices=[]):
            if self.settings.init_seed is not None:
                torch.manual_seed(self.settings.init_seed)
            sae = self.make_sae(d_in)
            if transcoder:
                sae.make_transcoder(skip=self.settings.skip_connection)
            self.settings.nest(sae)
        return TrainingState(sae, self.settings)


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


class TrainingState(nn.Module):
    """An SAE with its λ controller, dead-latent tracker and loss-spike detector, and the counts they share.

    It gives a batch's loss (`evaluate_batch`), records a kept step from tensors already reduced across ranks
    (`record_step`), supplies the optimizer groups and LR factor, and applies the SAE's projections and resets
    around the optimizer step. Its buffers are what a checkpoint must carry to resume exactly."""

    def __init__(self, sae: SparseAutoencoder, settings: TrainingSettings) -> None:
        super().__init__()
        settings.check_sae(sae)
        self.settings = settings
        self.sae = sae
        sae.sparse_decode_below = settings.sparse_decode_below
        if settings.compile_chain:
            compile_gated_chain()
        sae.input_scale.fill_(math.nan)  # unset until estimated on the data (or restored)
        if sae.target_scale is not None:
            sae.target_scale.fill_(math.nan)
        self.controller = None if settings.target_l0 is None else TargetL0Controller(
            settings.target_l0, settings.target_l0_rate, settings.sparsity_warmup_steps)
        self.dead_latents = DeadLatentTracker(sae.width, settings.dead_window_tokens)
        self.loss_spikes = LossSpikeDetector(settings.sparsity_warmup_steps)
        thresholds = sae.threshold_values()  # their start, once initialized on the first batch
        self.register_buffer("initial_thresholds", None if thresholds is None else torch.full_like(thresholds, math.nan))
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("steps_trained", torch.tensor(0, dtype=torch.long))  # restored by validate/test too
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # a Python copy of `initialized` once it is True
        self._known_steps_trained = -1  # a Python copy of `steps_trained` once read (-1: not yet)

    # ----- counts read on the host once ----------------------------------------------------------------
    def data_initialized(self) -> bool:
        """Whether the first batch has set the data-driven starts. The buffer is read until it says True, then a
        Python copy answers: a GPU step need not wait on the device to know it."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def known_steps_trained(self) -> int:
        """`steps_trained` as a Python int, read from the buffer once after construction or a restore."""
        if self._known_steps_trained < 0:
            self._known_steps_trained = int(self.steps_trained)
        return self._known_steps_trained

    def forget_known_buffers(self) -> None:
        """After a restore: read `initialized` and `steps_trained` from the restored buffers again."""
        self._known_initialized = False
        self._known_steps_trained = -1

    # ----- normalization and the first batch ----------------------------------------------------------
    def needs_scales(self) -> bool:
        """Whether the normalization scalars are still to be estimated (not yet, and not restored)."""
        return math.isnan(float(self.sae.input_scale))

    @torch.no_grad()
    def initialize(self, first_batch: Tensor) -> None:
        """The data-driven starts (b_dec, quantile thresholds, a transcoder's target side) from the first batch,
        every rank's rows together so that every rank starts alike."""
        source, target = split_pairs(first_batch)
        self.sae.initialize_from_batch(self.sae.normalize(source))
        if target is not None:
            fit_skip = self.settings.skip_start == "least_squares"
            self.sae.initialize_target(self.sae.normalize_target(target),
                                       self.sae.normalize(source) if fit_skip else None)
        if self.initial_thresholds is not None:
            self.initial_thresholds.copy_(self.sae.threshold_values())
        self.initialized.fill_(True)
        self._known_initialized = True

    # ----- schedules ----------------------------------------------------------------------------------
    def sparsity_coefficient(self) -> float | Tensor:
        """λ on its linear warmup, by training steps taken (so a stand-alone validate uses the trained λ); with
        `target_l0`, times the controller's scale (a tensor, so that a GPU step need not read it back)."""
        ramp = self.settings.sparsity_coefficient * linear_warmup(self.known_steps_trained(),
                                                                   self.settings.sparsity_warmup_steps)
        return ramp if self.controller is None else ramp * self.controller.scale

    def lr_factor(self, step: int, max_steps: int) -> float:
        return learning_rate_factor(step, self.settings.lr_warmup_steps, self.settings.lr_decay_fraction, max_steps)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Adam parameter groups: the thresholds (at `threshold_lr_scale` × lr) and the rest."""
        settings = self.settings
        betas = tuple(float(beta) for beta in (self.sae.adam_betas if settings.betas is None else settings.betas))
        thresholds = self.sae.threshold_parameters() if settings.threshold_lr_scale != 1 else []
        others = [p for p in self.sae.parameters() if all(p is not t for t in thresholds)]
        groups = [{"name": "weights", "params": others, "lr": settings.lr, "betas": betas}]
        if thresholds:  # the names are what LearningRateMonitor logs: lr-Adam/weights, lr-Adam/thresholds
            groups.append({"name": "thresholds", "params": thresholds,
                           "lr": settings.lr * settings.threshold_lr_scale, "betas": betas})
        return groups

    # ----- steps --------------------------------------------------------------------------------------
    def evaluate_batch(self, batch: Tensor, train: bool = False) -> dict[str, Tensor]:
        """Loss terms, normalized target, reconstruction and codes of one batch; in training also each latent's
        firing count and the step's summary (R², MSE, L0 from what the loss computed)."""
        source, target = split_pairs(batch)
        x = self.sae.normalize(source)
        y = x if target is None else self.sae.normalize_target(target)
        dead = self.dead_latents.dead_mask() if train else None
        out = self.sae.loss(x, self.sparsity_coefficient(), dead=dead, target=y)
        result = {"loss": out.total, "target": y, "x_hat": out.reconstruction.detach(), "codes": out.codes.detach(),
                  **{f"loss_{name}": value for name, value in out.terms.items()}}
        if out.gate_squared_error is not None:
            result["gate_squared_error"] = out.gate_squared_error
        if out.prefix_squared_errors is not None:
            result["prefix_squared_errors"] = out.prefix_squared_errors
        if train:
            result["firing"] = out.firing if out.firing is not None else firing_counts(result["codes"])
            prefixes = None  # the fixed levels' errors (random ones change every step: nothing to follow)
            if out.prefix_squared_errors is not None and not self.sae.nesting.random_prefixes:
                prefixes = dict(zip(self.prefix_widths(), out.prefix_squared_errors))
            result["summary"] = step_summary(y, out.squared_error.detach(), result["firing"], out.gate_squared_error,
                                             prefixes)
        elif self.sae.W_skip is not None:  # how much the skip path alone explains (held out)
            with torch.no_grad():
                result["skip_squared_error"] = squared_error(y, self.sae.skip(x) + self.sae.b_dec)
        return result

    def record_step(self, counts: Tensor, tokens: int, loss: Tensor) -> None:
        """A kept step, from values already reduced over ranks: every latent's firing count, the tokens of the
        step and the mean loss."""
        step = self.known_steps_trained()
        self.dead_latents.record(counts, tokens)
        self.tokens_seen.add_(tokens)
        if self.controller is not None:
            self.controller.update(counts.sum().float() / tokens, step)
        self.loss_spikes.record(loss, step)
        self._known_steps_trained = step + 1
        self.steps_trained += 1

    def controller_message(self) -> str | None:
        """The controller's word, once, where L0 has stopped answering λ (TargetL0Controller.check)."""
        return None if self.controller is None else self.controller.check(self.known_steps_trained())

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        self.sae.before_optimizer_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The SAE's projections, then its reaction to dead latents (without an `if dead.any()`: no host read)."""
        self.sae.after_optimizer_step()
        self.dead_latents.reset_latents.zero_()
        if self.settings.reset_dead_latents:
            dead = self.dead_latents.dead_mask()
            self.sae.reset_dead(dead)
            self.dead_latents.record_reset(dead)

    def clip_gradients(self, value: float | None, algorithm: str = "norm") -> None:
        """This SAE's gradients clipped on their own, in the order `fit` clips them."""
        if not value:
            return
        parameters = [p for group in self.optimizer_groups() for p in group["params"]]
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, value)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, value)

    # ----- what is logged -----------------------------------------------------------------------------
    def dead_fraction(self) -> Tensor:
        return self.dead_latents.dead_fraction()

    def training_diagnostics(self) -> dict[str, Tensor]:
        """What could drive a run's drift (docs/method.md, "The gate path"): revivals, loss spikes, the SAE's own
        scale diagnostics, the thresholds' 10/50/90% quantiles (θ⁺ and θ⁻ each where they are untied), and the
        controller's scale and drift."""
        values = self.dead_latents.diagnostics() | {"loss_spikes": self.loss_spikes.spikes.float()}
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

    def held_out_row(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The held-out metrics of a window (`window_summary`'s values) as `fit` and sweeps log them. Two dead
        fractions with two names: `silent_fraction`, latents that never fired on the held-out tokens, and
        `dead_fraction`, latents dead in the training window (`DeadLatentTracker`)."""
        row = {"l0": values["l0"], "r2": values["r2"], "mse": values["mse"],
               "silent_fraction": values["silent_fraction"], "dead_fraction": self.dead_fraction().double(),
               "dense_fraction": (values["firing_density"] > 0.1).double().mean()}
        if self.sae.signed_codes:
            row["bipolar_fraction"] = values["bipolar_fraction"]
        return row | {key: value for key, value in values.items()
                      if key in ("aux_r2", "skip_r2") or key.startswith("r2_prefix_")}

    def prefix_widths(self) -> tuple[int, ...]:
        """The Matryoshka prefixes below the width whose held-out R² is measured (none without nesting)."""
        return () if self.sae.nesting is None else self.sae.nesting.widths[:-1]

    def spec(self) -> dict[str, Any]:
        """What rebuilds the SAE with torch alone (`sagsae.formats.serialization.sae_from_spec`)."""
        return {"architecture": self.sae.architecture, "config": self.sae.config(),
                "transcoder": self.sae.transcoder_config(), "matryoshka": self.sae.matryoshka_config()}
