"""What a run that settles needs (docs/method.md, "Settling"): `fit` lands on its target L0 (the controller alone is
tested in tests/test_controller.py), and the drift diagnostics count what they say they count (revivals, loss
spikes, the gate path's held-out R²)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from callbacks import SAEMetrics
from lightning_modules.reconstruction_metrics import ReconstructionMetrics
from datamodules import TensorActivationDataModule
from lightning_modules import SAEModule
from sagsae.analysis.synthetic import protocol_a
from tests.test_robustness import SpikeBatch

pytestmark = pytest.mark.slow(53)  # seconds in all: the longest files run first (tests/conftest.py)

TRAIN = 100_000


def fit(module: SAEModule, data: torch.Tensor, steps: int, batch_size: int = 4096, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        callbacks=[SAEMetrics(), *callbacks])
    trainer.fit(module, TensorActivationDataModule(data, batch_size=batch_size))
    return trainer


@pytest.fixture(scope="module")
def denser_signed_axes():
    """Protocol A with each axis firing on 20% of samples: a true L0 of about 9.6, so a target of 6 makes the
    SAE give up real features, where L0 answers λ smoothly (above the truth it hardly answers at all)."""
    return protocol_a(TRAIN + 20_000, d=64, axes=48, p=0.2, seed=0)


@pytest.mark.parametrize("architecture, width", [("sagsae", 48), ("relu", 96)])
def test_target_l0_lands_within_five_percent_of_its_target(denser_signed_axes, architecture, width):
    L.seed_everything(0)
    module = SAEModule.from_arguments(architecture, d_in=64, width=width, sparsity_coefficient=4.0,
                                      sparsity_warmup_steps=100, lr=1e-3, lr_warmup_steps=0, target_l0=6.0)
    fit(module, denser_signed_axes.activations[:TRAIN], steps=1500)
    sae = module.sae.eval()
    with torch.no_grad():
        codes = sae.encode(sae.normalize(denser_signed_axes.activations[TRAIN:]))
    held_out_l0 = float((codes != 0).sum(1).float().mean())
    assert abs(held_out_l0 - 6.0) <= 0.05 * 6.0, held_out_l0
    assert abs(math.log(float(module.state.sparsity_coefficient()) / 4.0)) > 0.05, "λ must have been steered"


def test_target_l0_is_refused_for_k_sparse_saes():
    with pytest.raises(ValueError, match="target_l0 steers λ, which TopK"):
        SAEModule.from_arguments("topk", width=16, k=4, target_l0=10.0)


def test_revivals_count_each_death_once():
    """Latent 0 is silenced (its encoder row and bias at zero, so π = 0 < θ) for steps 0–9 and again from step 14:
    it dies at 1,024 tokens (step 4) and is reset at every step until it fires again (one revival), fires while
    free, and dies again at step 18 (a second revival, so it is "revived again")."""
    L.seed_everything(0)
    module = SAEModule.from_arguments("sagsae", d_in=8, width=16, dead_window_tokens=1024, sparsity_warmup_steps=0)

    class SilenceLatentZero(L.Callback):
        row: torch.Tensor | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sae = pl_module.sae
            with torch.no_grad():
                if self.row is None:
                    self.row = sae.W_gate[0].clone()
                silent = trainer.global_step < 10 or trainer.global_step >= 14
                sae.W_gate[0] = 0 if silent else self.row
                sae.b_gate[0] = 0

    fit(module, torch.randn(4096, 8), steps=20, batch_size=256, callbacks=[SilenceLatentZero()])
    revivals = module.state.dead_latents.revivals
    assert int(revivals[0]) == 2 and int(revivals[1:].sum()) == 0
    diagnostics = module.state.training_diagnostics()
    assert diagnostics["revived_latents"] == 1 and diagnostics["revived_again"] == 1


def test_loss_spikes_are_counted_only_when_the_loss_jumps():
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(8192, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    counts = {}
    for name, callbacks in (("clean", []), ("spiked", [SpikeBatch(at=30, factor=30.0)]),
                            ("spiked twice", [SpikeBatch(at=20, factor=30.0), SpikeBatch(at=30, factor=30.0),
                                              SpikeBatch(at=31, factor=30.0)])):
        module = SAEModule.from_arguments("sagsae", d_in=8, width=16, init_seed=0, sparsity_warmup_steps=10)
        fit(module, data.clone(), steps=40, batch_size=256, callbacks=callbacks)
        counts[name] = int(module.state.loss_spikes.spikes)
    assert counts == {"clean": 0, "spiked": 1, "spiked twice": 2}  # steps 30 and 31 are one spike


def test_held_out_aux_r2_is_the_gate_paths_r2():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    gate_x_hat = x + 0.5 * torch.randn(300, 6, generator=generator, dtype=torch.float64)
    metric = ReconstructionMetrics(6, 10)
    for rows in torch.arange(300).split(64):
        gate_error = (x[rows] - gate_x_hat[rows]).pow(2).sum(-1).mean()
        metric.update(x[rows], x[rows], torch.zeros(len(rows), 10), gate_error)
    expected = 1 - (x - gate_x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(metric.compute()["aux_r2"]) == pytest.approx(float(expected), rel=1e-9)
    without_gate = ReconstructionMetrics(6, 10)
    without_gate.update(x, gate_x_hat, torch.zeros(300, 10))  # an SAE without a gate path
    assert "aux_r2" not in without_gate.compute()
