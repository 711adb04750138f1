"""Versioned checkpoint migrations: a checkpoint written by an older sagsae is brought to the current layout before
anything reads it, so old runs still resume, export and inspect. Each migration takes one version to the next."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VERSION_KEY = "sagsae_checkpoint_version"
CHECKPOINT_VERSION = 2
FIT_SAE_PREFIX = "state.sae."  # where a `fit` checkpoint keeps its SAE

# Version 1 kept the training bookkeeping as buffers of the module itself (or of each sweep member); version 2 keeps
# it in the parts of a TrainingState (sagsae/training/state.py), under `state.` in `fit`'s checkpoints.
RENAMED_IN_2 = {
    "tokens_since_fired": "dead_latents.tokens_since_fired", "tokens_since_reset": "dead_latents.tokens_since_reset",
    "reset_latents": "dead_latents.reset_latents", "revivals": "dead_latents.revivals",
    "firing_frequency": "dead_latents.firing_frequency", "loss_average": "loss_spikes.average",
    "loss_spikes": "loss_spikes.spikes", "spiking": "loss_spikes.spiking", "lambda_scale": "controller.scale",
    "lambda_drift": "controller.drift", "l0_average": "controller.fast_average",
    "l0_trend_base": "controller.slow_average",
}
CONTROLLER_KEYS = ("lambda_scale", "lambda_drift", "l0_average", "l0_trend_base")
# Buffers that version 1 added over time: a checkpoint without them resumed with these fresh values.
FRESH_IN_1 = {"loss_average": 0.0, "loss_spikes": 0, "spiking": False, "lambda_scale": 1.0, "l0_average": 0.0,
              "l0_trend_base": 0.0, "lambda_drift": 0.0}


def _owners(state_dict: dict[str, Any]) -> list[str]:
    """The prefixes under which a version-1 checkpoint keeps one SAE's bookkeeping: "" in `fit`'s, "members.<name>."
    in a sweep's (each owner has `tokens_since_fired`)."""
    return [key.removesuffix("tokens_since_fired") for key in state_dict if key.endswith("tokens_since_fired")]


def to_training_state(checkpoint: dict[str, Any]) -> None:
    """Version 1 → 2: the bookkeeping moves into the training state's parts; `fit`'s keys gain `state.`. The
    controller's buffers go where the run had a target L0, and are dropped elsewhere (it had none)."""
    state_dict = checkpoint["state_dict"]
    sweep = "sweep_members" in checkpoint
    for owner in _owners(state_dict):
        width = len(state_dict[owner + "tokens_since_fired"])
        state_dict.setdefault(owner + "revivals", torch.zeros(width, dtype=torch.long))
        for name, value in FRESH_IN_1.items():
            state_dict.setdefault(owner + name, torch.tensor(value))
        name = owner.removeprefix("members.").removesuffix(".")
        training = checkpoint["sweep_members"][name]["training"] if sweep else checkpoint.get("hyper_parameters", {})
        steered = training.get("target_l0") is not None
        new_owner = owner if sweep else "state."
        for key in [key for key in state_dict if key.startswith(owner)]:
            rest = key.removeprefix(owner)
            if sweep and rest.startswith("sae."):
                continue
            value = state_dict.pop(key)
            if rest in CONTROLLER_KEYS and not steered:
                continue
            state_dict[new_owner + RENAMED_IN_2.get(rest, rest)] = value
        if steered:  # the controller's check of whether L0 answers λ is new: it starts its windows afresh
            state_dict[new_owner + "controller.window_error"] = torch.tensor(-1.0)
            state_dict[new_owner + "controller.unresponsive_step"] = torch.tensor(-1)


MIGRATIONS: dict[int, Callable[[dict[str, Any]], None]] = {1: to_training_state}


def migrate_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint (as torch.load returns it) to CHECKPOINT_VERSION, in place; returns it. One without a
    version is version 1."""
    version = int(checkpoint.get(VERSION_KEY, 1))
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"This checkpoint was written by a newer sagsae (checkpoint version {version}, this one "
                         f"reads up to {CHECKPOINT_VERSION}): upgrade sagsae to open it")
    for step in range(version, CHECKPOINT_VERSION):
        MIGRATIONS[step](checkpoint)
    checkpoint[VERSION_KEY] = CHECKPOINT_VERSION
    return checkpoint
