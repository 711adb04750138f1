"""DDP scenarios on 2 CPU processes (gloo), run as `python -m tests.ddp_scenarios SPEC.json` by tests/test_ddp.py.

Lightning starts rank 1 by running the same command again; each rank writes what it saw to
`<spec's out>/rank<r>.pt`, which the tests compare with one process. A scenario runs in its own processes so that
a hang (a rank waiting for a collective the other never joins) ends in the test's timeout, not in pytest's.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from callbacks import GateCollapseMonitor, SAEMetrics, SplicedLMLoss
from lightning_modules import SAEModule, SweepModule
from sagsae.training import TrainingPlan
from sagsae.commands import end_process_group
from sagsae.commands.sweep import import_class
from sagsae.saes import sae_class

STEP_DATA = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))  # the tests build the same tensor


def ddp_trainer(steps: int, callbacks: list[L.Callback] | None = None, devices: int = 2, num_nodes: int = 1,
                **settings: Any) -> L.Trainer:
    """A quiet CPU trainer; a training run skips validation unless `settings` say otherwise."""
    defaults = dict(accelerator="cpu", devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if devices * num_nodes > 1 else "auto", max_steps=steps, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    limit_val_batches=0 if steps else None, num_sanity_val_steps=0, callbacks=callbacks or [])
    return L.Trainer(**{**defaults, **settings})


def save(spec: dict[str, Any], trainer: L.Trainer, record: dict[str, Any]) -> None:
    torch.save(record, Path(spec["out"]) / f"rank{trainer.global_rank}.pt")


def sweep_members(spec: dict[str, Any]) -> dict[str, TrainingPlan]:
    """Members as {name: {"sae": registry name or class path, **its flat arguments}}."""
    members = {}
    for name, arguments in spec["members"].items():
        arguments = dict(arguments)
        sae = arguments.pop("sae")
        members[name] = TrainingPlan.from_arguments(import_class(sae) if "." in sae else sae_class(sae), **arguments)
    return members


def train_sweep(spec: dict[str, Any]) -> None:
    """A sweep of the given members trains `steps` steps on STEP_DATA; each rank saves every member's state."""
    from datamodules import TensorActivationDataModule

    sweep = SweepModule(sweep_members(spec))
    trainer = ddp_trainer(spec["steps"])
    trainer.fit(sweep, TensorActivationDataModule(STEP_DATA, batch_size=spec["batch_size"]))
    save(spec, trainer, {"global_step": trainer.global_step,
                         "state": {k: v.clone() for k, v in sweep.state_dict().items()}})


class CollapseOnRankOne(GateCollapseMonitor):
    """A gate collapse that only rank 1 sees, from step `at` on."""

    def __init__(self, at: int) -> None:
        super().__init__(stop_training=True)
        self.at = at

    def _reasons(self, pl_module, *histories: list[float]) -> list[str]:
        seen = pl_module.trainer.global_rank == 1 and pl_module.global_step >= self.at
        return ["a collapse staged on rank 1"] if seen else []


def collapse_on_one_rank(spec: dict[str, Any]) -> None:
    from datamodules import TensorActivationDataModule

    module = SAEModule.from_arguments("sagsae", width=16, init_seed=0)
    trainer = ddp_trainer(spec["steps"], [CollapseOnRankOne(spec["at"])], log_every_n_steps=spec["log_every"])
    trainer.fit(module, TensorActivationDataModule(STEP_DATA, batch_size=256))
    save(spec, trainer, {"global_step": trainer.global_step})


class RaiseOnRank(L.Callback):
    """A failure on one rank only, at one step."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"staged failure on rank {self.rank} at step {self.step}")


def one_rank_raises(spec: dict[str, Any]) -> None:
    """A fit in which one rank raises mid-run: the scenario must end (non-zero), not hang."""
    from datamodules import TensorActivationDataModule

    module = SAEModule.from_arguments("sagsae", width=16, init_seed=0)
    trainer = ddp_trainer(spec["steps"], [RaiseOnRank(spec["rank"], spec["at"])])
    trainer.fit(module, TensorActivationDataModule(STEP_DATA, batch_size=256))


class HeldOutRecorder(L.Callback):
    """Every validation batch this rank evaluated."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches.append(batch.detach().clone())


def validation_module(d_in: int) -> SAEModule:
    """A fixed SAE as a checkpoint would give it: built, seeded, its normalization set."""
    module = SAEModule(sae=functools.partial(sae_class("sagsae"), width=16), d_in=d_in, init_seed=0)
    module.sae.input_scale.fill_(0.5)
    return module


def validate(spec: dict[str, Any], devices: int = 2) -> dict[str, Any]:
    """`validate` of a fixed SAE on the given datamodule; returns (and under DDP saves) the held-out batches this
    rank saw and the logged metrics."""
    datamodule = import_class(spec["datamodule"]["class_path"])(**spec["datamodule"]["init_args"])
    recorder = HeldOutRecorder()
    callbacks = [recorder, SAEMetrics(), *([SplicedLMLoss(contexts=spec["contexts"])] if spec.get("contexts") else [])]
    trainer = ddp_trainer(0, callbacks, devices=devices)
    trainer.validate(validation_module(spec["d_in"]), datamodule, verbose=False)
    record = {"batches": recorder.batches,
              "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
    if devices > 1:
        save(spec, trainer, record)
    return record


class TrainingRecorder(HeldOutRecorder):
    """Every training and held-out batch this rank saw."""

    def __init__(self) -> None:
        super().__init__()
        self.training: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.training.append(batch.detach().clone())


def fit_and_validate(spec: dict[str, Any]) -> None:
    """`steps` steps on STEP_DATA with a held-out check at the end, on `nodes` nodes of one process each (as
    torchrun starts them) or on 2 processes of one node; each rank saves its batches, state and metrics."""
    from datamodules import TensorActivationDataModule

    topology = {"devices": 1, "num_nodes": spec["nodes"]} if "nodes" in spec else {}
    recorder = TrainingRecorder()
    module = SAEModule.from_arguments("sagsae", d_in=8, width=16, lr=0.01, init_seed=0, sparsity_warmup_steps=2)
    trainer = ddp_trainer(spec["steps"], [recorder, SAEMetrics()], limit_val_batches=None,
                          val_check_interval=spec["steps"], **topology)
    trainer.fit(module, TensorActivationDataModule(STEP_DATA[:3072], STEP_DATA[3072:], batch_size=128))
    save(spec, trainer, {"global_step": trainer.global_step, "training": recorder.training,
                         "held_out": recorder.batches, "state": {k: v.clone() for k, v in module.state_dict().items()},
                         "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}})


def live_fit(spec: dict[str, Any]) -> None:
    """A fit of `steps` steps on the tiny LM's live stream (from `ckpt` if given); with `every`, `fit`'s own
    LastCheckpoint saves `<out>/checkpoints/step=N.ckpt` every that many steps, mid-run. Every rank joins each
    save: it gathers every rank's stream state."""
    from callbacks import LastCheckpoint
    from datamodules import LMActivationDataModule

    module = SAEModule.from_arguments("sagsae", d_in=32, width=16, lr=0.01, init_seed=0, sparsity_warmup_steps=2)
    every = [LastCheckpoint(dirpath=Path(spec["out"]) / "checkpoints", filename="{step}", save_top_k=-1,
                            every_n_train_steps=spec["every"])] if "every" in spec else []
    trainer = ddp_trainer(spec["steps"], callbacks=every, enable_checkpointing=bool(every))
    trainer.fit(module, LMActivationDataModule(**spec["datamodule"]), ckpt_path=spec.get("ckpt"), weights_only=False)
    save(spec, trainer, {"global_step": trainer.global_step,
                         "state": {k: v.clone() for k, v in module.state_dict().items()}})


SCENARIOS = {"train_sweep": train_sweep, "live_fit": live_fit, "collapse_on_one_rank": collapse_on_one_rank, "validate": validate,
             "one_rank_raises": one_rank_raises, "fit_and_validate": fit_and_validate}

if __name__ == "__main__":
    scenario_spec = json.loads(Path(sys.argv[1]).read_text())
    SCENARIOS[scenario_spec["scenario"]](scenario_spec)
    end_process_group()
