"""Checkpoints written by older sagsae load (sagsae/training/migrations.py): version 1 kept the bookkeeping as the
module's own buffers, and its earliest checkpoints lack the buffers added later."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules import TensorActivationDataModule
from lightning_modules import SAEModule
from sagsae.formats.serialization import read_checkpoint, sae_from_checkpoint
from sagsae.training.migrations import CHECKPOINT_VERSION, RENAMED_IN_2, VERSION_KEY, migrate_checkpoint

NEW_IN_2 = ("controller.window_error", "controller.unresponsive_step")
DATA = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))


def trained(target_l0: float | None = 4.0) -> tuple[SAEModule, L.Trainer]:
    module = SAEModule.from_arguments("sagsae", width=16, init_seed=0, target_l0=target_l0, sparsity_warmup_steps=2)
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, TensorActivationDataModule(DATA, batch_size=256))
    return module, trainer


def version_one(checkpoint: dict, drop: tuple[str, ...] = ()) -> dict:
    """`checkpoint` in version 1's layout (written by hand from the rename table), without the buffers in `drop`."""
    back = {new: old for old, new in RENAMED_IN_2.items()}
    state_dict = {}
    for key, value in checkpoint["state_dict"].items():
        rest = key.removeprefix("state.")
        old = rest if rest.startswith("sae.") else back.get(rest, rest)
        if old not in drop and old not in NEW_IN_2:
            state_dict[old] = value
    old = {k: v for k, v in checkpoint.items() if k != VERSION_KEY}
    return {**old, "state_dict": state_dict}


@pytest.mark.parametrize("target_l0", [4.0, None])
def test_a_version_one_checkpoint_resumes_into_the_same_state(tmp_path, target_l0):
    module, trainer = trained(target_l0)
    trainer.save_checkpoint(tmp_path / "now.ckpt")
    current = torch.load(tmp_path / "now.ckpt", weights_only=True)
    assert current[VERSION_KEY] == CHECKPOINT_VERSION
    old = version_one(current)
    assert "lambda_scale" in old["state_dict"] or target_l0 is None and "tokens_since_fired" in old["state_dict"]
    if target_l0 is None:  # version 1 wrote the controller's buffers whether or not it steered
        old["state_dict"] |= {"lambda_scale": torch.tensor(1.0), "lambda_drift": torch.tensor(0.0),
                              "l0_average": torch.tensor(0.0), "l0_trend_base": torch.tensor(0.0)}
    torch.save(old, tmp_path / "old.ckpt")
    migrated = read_checkpoint(tmp_path / "old.ckpt")
    assert set(migrated["state_dict"]) == set(current["state_dict"])
    for key, value in current["state_dict"].items():
        assert torch.equal(migrated["state_dict"][key], value), key
    assert torch.equal(sae_from_checkpoint(migrated).W_dec, module.sae.W_dec)
    resumed = SAEModule.from_arguments("sagsae", width=16, init_seed=1, target_l0=target_l0, sparsity_warmup_steps=2)
    L.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0).fit(
        resumed, TensorActivationDataModule(DATA, batch_size=256), ckpt_path=tmp_path / "old.ckpt")
    assert int(resumed.state.steps_trained) == 7


def test_the_earliest_checkpoints_take_fresh_bookkeeping(tmp_path):
    """Before revivals, spikes and the controller existed: those buffers start fresh, the rest is kept."""
    module, trainer = trained(4.0)
    trainer.save_checkpoint(tmp_path / "now.ckpt")
    checkpoint = torch.load(tmp_path / "now.ckpt", weights_only=True)
    later = ("revivals", "loss_average", "loss_spikes", "spiking", "lambda_scale", "l0_average", "l0_trend_base",
             "lambda_drift")
    migrated = migrate_checkpoint(version_one(checkpoint, drop=later))
    fresh = SAEModule.from_arguments("sagsae", d_in=8, width=16, target_l0=4.0).state
    fresh.load_state_dict({k.removeprefix("state."): v for k, v in migrated["state_dict"].items()})
    assert float(fresh.controller.scale) == 1.0 and int(fresh.loss_spikes.spikes) == 0
    assert int(fresh.steps_trained) == 6 and torch.equal(fresh.sae.W_dec, module.sae.W_dec)


def test_a_newer_checkpoint_is_refused_by_name():
    with pytest.raises(ValueError, match="newer sagsae"):
        migrate_checkpoint({VERSION_KEY: CHECKPOINT_VERSION + 1, "state_dict": {}})
