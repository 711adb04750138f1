"""Thresholds that can be watched and steered: how far they moved, their own learning rate, and dead latents
that a reset revived still counted as dead for their window."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from callbacks import SAEMetrics
from datamodules import TensorActivationDataModule
from lightning_modules import SAEModule

DATA = torch.randn(8192, 16, generator=torch.Generator().manual_seed(0))


def fit(module: SAEModule, steps: int = 40) -> SAEModule:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[SAEMetrics()])
    trainer.fit(module, TensorActivationDataModule(DATA, batch_size=512))
    return module


@pytest.mark.parametrize("architecture, start", [("sagsae", {"theta_init_quantile": 0.9}),
                                                 ("jumprelu", {"theta_init_quantile": 0.9}),
                                                 ("gated", {"gate_init_quantile": 0.9})])
def test_threshold_movement_is_measured_from_the_first_batchs_start(architecture, start):
    module = fit(SAEModule.from_arguments(architecture, width=32, sparsity_coefficient=2.0, lr=1e-2, **start))
    assert torch.equal(module.state.initial_thresholds.isnan(), torch.zeros(32, dtype=torch.bool))
    moved = module.state.threshold_movement()
    absolute, relative = module.state.threshold_changes()
    direct = (module.sae.threshold_values() - module.state.initial_thresholds).abs()
    assert torch.equal(absolute, direct)
    assert float(moved["threshold_abs_change"]) == pytest.approx(float(direct.median()))
    nonzero = module.state.initial_thresholds != 0
    expected = (direct[nonzero] / module.state.initial_thresholds[nonzero].abs()).median()
    assert float(moved["threshold_rel_change"]) == pytest.approx(float(expected)) and float(expected) > 0
    assert len(relative) == int(nonzero.sum())


def test_architectures_without_thresholds_report_none():
    module = fit(SAEModule.from_arguments("topk", width=32, k=4), steps=3)
    assert module.state.threshold_changes() is None and module.state.threshold_movement() == {}


def test_a_threshold_learning_rate_moves_thresholds_further():
    """Adam's step is about lr whatever the gradient, so 10× the thresholds' LR moves them about 10× as far;
    every other parameter gets the same LR either way."""
    def moved(scale: float) -> tuple[float, SAEModule]:
        module = SAEModule.from_arguments("sagsae", width=32, sparsity_coefficient=4.0, lr=1e-3, lr_warmup_steps=0,
                                          theta_init_quantile=0.9, threshold_lr_scale=scale, init_seed=0)
        return float(fit(module).state.threshold_movement()["threshold_abs_change"]), module

    slow, plain = moved(1.0)
    fast, scaled = moved(10.0)
    assert len(plain.state.optimizer_groups()) == 1
    groups = scaled.state.optimizer_groups()
    assert [g["lr"] for g in groups] == [1e-3, 1e-2] and groups[1]["params"] == [scaled.sae.threshold]
    assert sum(len(g["params"]) for g in groups) == len(list(scaled.sae.parameters()))
    assert fast > 4 * slow > 0


def test_a_latent_revived_by_the_reset_counts_as_dead_for_its_window():
    state = SAEModule.from_arguments("sagsae", d_in=8, width=4, dead_window_tokens=100).state
    tracker = state.dead_latents
    tracker.tokens_since_fired.copy_(torch.tensor([100, 0, 0, 0]))  # latent 0 silent for a whole window
    state.after_optimizer_step()
    assert int(tracker.reset_latents) == 1 and tracker.tokens_since_reset.tolist()[0] == 0
    assert float(state.sae.threshold[0]) == pytest.approx(state.sae.theta_init)
    tracker.tokens_since_fired[0] = 0  # it fires again after the reset...
    assert not tracker.dead_mask().any()
    assert float(state.dead_fraction()) == 0.25  # ...but still counts as dead within the window
    state.after_optimizer_step()
    assert int(tracker.reset_latents) == 0
    tracker.tokens_since_reset[0] = 100
    assert float(state.dead_fraction()) == 0.0
    assert math.isclose(float(SAEModule.from_arguments("sagsae", d_in=8, width=4).state.dead_fraction()), 0.0)
