"""SPEC §7 Protocol A: the formulation must be proven, not assumed (issue: "the formulation must be proven").

SA-GSAE at width K, aux on, trained by the product's own LightningModule, must reach the true L0 (±20%),
R² ≥ 0.95, recover ≥ 90% of the 2K signed features, and carry both signs of an axis in one latent.
"""

from __future__ import annotations

import lightning as L
import torch

from callbacks import SAEMetrics
from datamodules import TensorActivationDataModule
from lightning_modules import SAGSAE
from sagsae.synthetic import bipolar_sharing, protocol_a, signed_feature_recovery


def test_sagsae_recovers_signed_axes_with_one_latent_each():
    data = protocol_a(220_000, d=64, axes=48, p=0.04, seed=0)  # the last 20k samples are held out
    train, test = data.activations[:200_000], data.activations[200_000:]
    coefficients = data.coefficients[200_000:]
    L.seed_everything(0)
    module = SAGSAE(d_in=64, width=48, sparsity_coefficient=4.0, sparsity_warmup_steps=200, lr=1e-3,
                    lr_warmup_steps=0, dead_window_tokens=1_000_000)
    trainer = L.Trainer(max_steps=1500, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        callbacks=[SAEMetrics()])
    trainer.fit(module, TensorActivationDataModule(train, batch_size=4096))
    sae = module.sae.eval()
    with torch.no_grad():
        x = sae.normalize(test)
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    l0 = float((codes != 0).sum(1).float().mean())
    r2 = float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    true_l0 = float((coefficients != 0).sum(1).float().mean())
    recovery = signed_feature_recovery(sae.W_dec.detach(), data.directions, signed_codes=True)
    sharing = bipolar_sharing(codes, coefficients, sae.W_dec.detach(), data.directions)
    summary = f"L0 {l0:.2f} (true {true_l0:.2f}), R² {r2:.3f}, recovery {recovery:.2f}, sharing {sharing:.2f}"
    assert abs(l0 - true_l0) <= 0.2 * true_l0, summary
    assert r2 >= 0.95, summary
    assert recovery >= 0.9, summary
    assert sharing >= 0.9, summary
