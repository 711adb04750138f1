"""Many SAEs from one activation stream: every member trains on the same batch, so a sweep of N SAEs costs one
LM forward (or one cache read) per batch instead of N.

Each member is a `TrainingState` (sagsae/training/state.py) built from its `TrainingPlan`: its own Adam
hyperparameters, schedules, controller, dead-latent tracking and seed, the same state that `fit`'s SAEModule wraps.
Members back-propagate one after another, so only one member's activations are alive at a time (memory grows
with the members' parameters, not their activations); their parameters are disjoint, so each gets exactly the
gradient of its own loss, and one Adam with a parameter group (and an LR schedule) per member takes, through
Lightning's optimizer step, the step a member alone under `Trainer.fit` would take, in one fused update.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_modules.reconstruction_metrics import ReconstructionMetrics, is_logging_step
from lightning_modules.step_checks import NonFiniteGuard, data_shape, every_rank_batch, reduce_step
from sagsae.measures import deciles
from sagsae.training import TrainingPlan, TrainingState
from sagsae.training.migrations import CHECKPOINT_VERSION, VERSION_KEY, migrate_checkpoint

LM_LOSS_KEYS = ("ce_delta", "ce_recovered", "ce_clean")


class SweepModule(L.LightningModule):
    """Trains `members` (name → TrainingPlan) side by side; logs `train/<name>/…` and `val/<name>/…`.

    `latest_validation` holds each member's latest held-out L0, R², MSE, silent and bipolar fractions, its
    training-window dead fraction and how far its thresholds moved; `validation_history` the same at
    every validation (the budget checkpoints of a convergence report). With `lm_loss_contexts`, every
    `lm_loss_every`-th of those rows and the final one add the spliced LM loss on that many held-out contexts:
    ΔCE = CE with the SAE's reconstruction − clean CE (nats), and CE recovered.

    `gradient_clip_val` (with `gradient_clip_algorithm` "norm" or "value") clips each member's gradients on their
    own, as `Trainer(gradient_clip_val=…)` clips a member that trains alone: the sweep back-propagates member by
    member (manual optimization), where Lightning leaves clipping to the module, which clips in
    `on_before_optimizer_step` as Lightning would (after fp16's unscaling, before the step).

    `sites` (name → k) trains members on several hookpoints of one LM forward: batches are [B, K, d] (a
    datamodule's `more_hookpoints`) and each member sees only its site's rows, normalization scalar and spliced
    LM loss, so that it trains as it would on that hookpoint alone."""

    def __init__(self, members: dict[str, TrainingPlan], lm_loss_contexts: int = 0, lm_loss_every: int = 1,
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm",
                 sites: dict[str, int] | None = None) -> None:
        super().__init__()
        if lm_loss_contexts < 0 or lm_loss_every < 1:
            raise ValueError(f"lm_loss needs contexts ≥ 0 and every ≥ 1, got {lm_loss_contexts} and {lm_loss_every}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        if gradient_clip_val is not None and not gradient_clip_val >= 0:
            raise ValueError(f"gradient_clip_val must be ≥ 0 (or null for none), got {gradient_clip_val}")
        self.automatic_optimization = False
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.lm_loss_contexts, self.lm_loss_every = lm_loss_contexts, lm_loss_every
        for name in members:
            if not name.replace("_", "").replace("-", "").replace("/", "").isalnum():
                raise ValueError(f"Sweep member names may hold letters, digits, '_', '-' and '/'; got {name!r}")
        if sites is not None and set(sites) != set(members):
            raise ValueError(f"sites must name every member once: {sorted(set(sites) ^ set(members))} differ")
        self.sites = sites
        for plan in members.values():
            plan.check()
        self.plans = members
        self.members = nn.ModuleDict()  # name → TrainingState, built once the data give the activation size
        self.nonfinite = NonFiniteGuard()
        self._evaluation: dict[str, ReconstructionMetrics] = {}
        self.latest_validation: dict[str, dict[str, float]] = {}
        self.validation_history: dict[str, list[dict[str, float]]] = {}  # every validation, in budget order

    def configure_model(self) -> None:
        if len(self.members):
            return
        stacked = getattr(self.trainer.datamodule, "sites", None)
        if (self.sites is None) != (stacked is None) or self.sites and max(self.sites.values()) >= stacked:
            raise ValueError(f"The sweep's members read sites {sorted(set((self.sites or {}).values()))} of batches "
                             f"that stack {stacked or 'no'} sites: give the data more_hookpoints to match")
        for name, plan in self.plans.items():
            d_in, pairs = data_shape(self.trainer, plan.settings)
            if d_in is None:
                raise ValueError("A sweep takes the activation size from its data: this datamodule does not report one")
            self.members[name] = plan.build(d_in, transcoder=bool(pairs))

    def rows(self, name: str, batch: Tensor) -> Tensor:
        """What member `name` trains on: the batch, or its site's rows of a [B, K, d] batch."""
        return batch if self.sites is None else batch[:, self.sites[name]]

    def on_fit_start(self) -> None:
        unset = [name for name, member in self.members.items() if member.needs_scales()]
        if unset:  # one estimate on the shared data serves every member
            scales = self.trainer.datamodule.estimate_scales()
            for name in unset:
                self.members[name].sae.set_scales(scales if self.sites is None else [scales[self.sites[name]]])

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps
        groups = [(member, {**group, "name": f"{name}/{group['name']}"})
                  for name, member in self.members.items() for group in member.optimizer_groups()]
        optimizer = torch.optim.Adam([group for _, group in groups])
        factors = [lambda step, m=member: m.lr_factor(step, max_steps) for member, _ in groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """Each member's forward and backward in turn (its graph freed before the next member's forward), then
        Lightning's optimizer step (`on_before_optimizer_step` projects and clips each member), the LR schedule,
        and each member's after-step projections and resets: what `fit` does for a member alone, in its order.

        Under DDP the members' losses are summed into one backward instead: DDP's reducer averages gradients
        across ranks once per backward and expects every parameter in it (same gradients, more memory)."""
        first = next(iter(self.members.values()))
        if not first.data_initialized():  # the same decision and the same rows for every member
            if self.nonfinite(self.trainer, batch):
                return self._log_skipped()
            rows = every_rank_batch(self.trainer, batch)
            for name, member in self.members.items():
                member.initialize(self.rows(name, rows))
        optimizer = self.optimizers()
        one_backward = self.trainer.world_size > 1
        total = 0.0
        logging = is_logging_step(self.trainer)
        losses, firing, rows = [], {}, {}
        for name, member in self.members.items():
            result = member.evaluate_batch(self.rows(name, batch), train=True)
            firing[name] = result["firing"]
            if logging:
                rows[name] = self._batch_row(result)
            losses.append(result["loss"].detach())
            if one_backward:
                total = total + result["loss"]
            else:
                self.manual_backward(result["loss"])
            del result
        if one_backward:
            self.manual_backward(total)
        if self.nonfinite(self.trainer, batch, losses):  # one host read for the batch and every member's loss
            optimizer.zero_grad()
            return self._log_skipped()
        for (name, member), loss in zip(self.members.items(), losses):
            member.record_step(*reduce_step(self.trainer, firing[name], len(batch), loss))
            message = member.controller_message()
            if message is not None:
                rank_zero_warn(f"Sweep member {name}: {message}")
            if logging:
                self._log_training(name, member, rows[name])
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()
        for member in self.members.values():
            member.after_optimizer_step()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Inside Lightning's optimizer step: each member's gradient projections, then its own clip (one norm over
        every member would let one member's spike shrink the others' steps)."""
        for member in self.members.values():
            member.before_optimizer_step()
            member.clip_gradients(self.gradient_clip_val, self.gradient_clip_algorithm)

    def _log_skipped(self) -> None:
        self.log("train/skipped_nonfinite_batches", float(self.nonfinite.skipped), on_step=True)

    @staticmethod
    def _batch_row(result: dict[str, Tensor]) -> dict[str, Tensor]:
        """A member's batch metrics, taken before its outputs are freed (logged once the step is kept)."""
        summary = result["summary"]
        return {"loss": result["loss"].detach(), "l0": summary["l0"], "r2": summary["r2"].float()}

    def _log_training(self, name: str, member: TrainingState, row: dict[str, Tensor]) -> None:
        values = {**row, "dead_fraction": member.dead_fraction(),
                  "reset_latents": member.dead_latents.reset_latents.float(),
                  **member.threshold_movement()}
        for key, value in values.items():
            self.log(f"train/{name}/{key}", value, on_step=True, on_epoch=False)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch)

    def _evaluate(self, batch: Tensor) -> None:
        for name, member in self.members.items():
            if name not in self._evaluation:
                self._evaluation[name] = ReconstructionMetrics(member.sae.d_in, member.sae.width,
                                                               member.prefix_widths()).to(self.device)
            result = member.evaluate_batch(self.rows(name, batch))
            self._evaluation[name].update(result["target"], result["x_hat"], result["codes"],
                                          result.get("gate_squared_error"), result.get("skip_squared_error"),
                                          result.get("prefix_squared_errors"))

    def _finish_evaluation(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            for metric in self._evaluation.values():
                metric.reset()
            return
        for name, metric in self._evaluation.items():
            values = metric.compute()
            metric.reset()
            member = self.members[name]
            row = member.held_out_row(values)
            for key, value in row.items():
                self.log(f"{stage}/{name}/{key}", value.float(), sync_dist=False)
            if not all(math.isfinite(float(v)) for v in row.values()):
                rank_zero_warn(f"Sweep member {name} has non-finite {stage} metrics: {row}")
            row |= member.threshold_movement()  # NaN where thresholds started at 0 (Gated's default start)
            row |= member.training_diagnostics() | deciles(values["firing_density"], "density")
            row["sparsity_coefficient"] = torch.as_tensor(member.sparsity_coefficient())  # λ, which target_l0 steers
            history = self.validation_history.setdefault(name, [])
            again = history.pop() if history and history[-1]["tokens_seen"] == int(member.tokens_seen) else {}
            if "ce_delta" in again:  # the same weights evaluated again (a final validate after fit): same ΔCE
                row |= {key: torch.as_tensor(again[key]) for key in LM_LOSS_KEYS}
            elif self._lm_loss_due(len(history)):
                row |= self._lm_loss(name, member)
            self.latest_validation[name] = {key: float(value) for key, value in row.items()}
            self.latest_validation[name]["tokens_seen"] = int(member.tokens_seen)
            history.append(dict(self.latest_validation[name]))

    def _lm_loss_due(self, checkpoint_index: int) -> bool:
        """Every `lm_loss_every`-th budget checkpoint of a fit, and any stand-alone validation (a sweep's last)."""
        if not self.lm_loss_contexts:
            return False
        return self.trainer.state.fn != TrainerFn.FITTING or (checkpoint_index + 1) % self.lm_loss_every == 0

    def _lm_loss(self, name: str, member: TrainingState) -> dict[str, float]:
        sae = member.sae
        was_training = sae.training
        sae.eval()
        site = {} if self.sites is None else {"site": self.sites[name]}
        try:
            values = self.trainer.datamodule.spliced_cross_entropy(sae.reconstruct_raw, self.lm_loss_contexts, **site)
        except NotImplementedError as reason:  # a cache without a language model: say so once, then stop asking
            rank_zero_warn(f"No spliced LM loss for this sweep cell: {reason}")
            self.lm_loss_contexts = 0
            return {}
        finally:
            sae.train(was_training)
        for key in ("ce_delta", "ce_recovered"):
            self.log(f"val/{name}/{key}", values[key], sync_dist=False)
        return {key: values[key] for key in LM_LOSS_KEYS}

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[VERSION_KEY] = CHECKPOINT_VERSION
        checkpoint["sweep_members"] = {name: {**m.spec(), "training": m.settings.as_dict()}
                                       for name, m in self.members.items()}
        checkpoint["latest_validation"] = self.latest_validation
        checkpoint["validation_history"] = self.validation_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        migrate_checkpoint(checkpoint)  # before Lightning loads its state_dict
        self.latest_validation = checkpoint.get("latest_validation", {})
        self.validation_history = checkpoint.get("validation_history", {})
        for member in self.members.values():
            member.forget_known_buffers()
