"""Does a trained SAE flip between two states from one step to the next, and which Adam β1 stops it?

    python -m benchmarks.period_two --run runs/default                 # a run's logged training L0, last third
    python -m benchmarks.period_two --checkpoint runs/X/lightning_logs/version_0/checkpoints/last.ckpt \
        --cache cache/smollm2_l15_mlp_out_v10 [--steps 120]                # continue it under each β1 variant

A period-2 flip shows in the per-step training L0 as a lag-1 autocorrelation near −1 (`alternation` in
sagsae/analysis/convergence.py). Whether it is the SAE's state or the batches shows in the held-out L0 after
successive steps: a state that flips makes it flip too. `--checkpoint` continues one trained SAE from its weights
and buffers (λ, the target-L0 controller) with a fresh Adam under each variant: β1 0 everywhere (the λ-sparse
SAEs' default), β1 0.9 on the thresholds only, and β1 0.9 everywhere. For each it prints the flip of the training L0
over the second half, and the held-out L0 after each of the last 4 steps. Same data order, same seed, same precision
choice as `fit`; on CPU, 2 threads (docs/method.md, "Asking for an L0").
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import lightning as L
import torch

from benchmarks import DEVICE
from datamodules import ActivationFileDataModule
from lightning_modules import SAEModule
from sagsae.commands.sweep import import_class
from sagsae.analysis.convergence import alternation
from sagsae.precision import automatic_precision

VARIANTS = {"beta1 0": {}, "beta1 0.9 on thresholds": {"thresholds": 0.9},
            "beta1 0.9": {"thresholds": 0.9, "weights": 0.9}}
HELD_OUT_STEPS = 4


def logged_l0(run: Path) -> list[float]:
    """The per-step training L0 from the newest TensorBoard event file under `run`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(glob.glob(str(run / "**" / "events.out.tfevents.*"), recursive=True),
                      key=lambda path: Path(path).stat().st_mtime)
    if not versions:
        raise SystemExit(f"--run {run}: no TensorBoard event file under it")
    events = EventAccumulator(versions[-1], size_guidance={"scalars": 0})
    events.Reload()
    return [scalar.value for scalar in events.Scalars("train/l0")]


def module_from_checkpoint(path: Path, first_betas: dict[str, float]) -> tuple[SAEModule, dict]:
    """A module built from a checkpoint's recorded arguments (its state is loaded once the trainer has built the
    SAE), with the Adam β1 of each parameter group replaced as `first_betas` says."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    sae = arguments.pop("sae")
    module = SAEModule.from_arguments(import_class(sae["class_path"]), **sae["init_args"],
                                      **{**arguments, "lr_warmup_steps": 0})
    own_groups = module.optimizer_groups

    def groups() -> list[dict]:
        chosen = own_groups()
        for group in chosen:
            if group["name"] in first_betas:
                group["betas"] = (first_betas[group["name"]], group["betas"][1])
        return chosen

    module.optimizer_groups = groups
    return module, checkpoint["state_dict"]


class Recorder(L.Callback):
    """Loads the checkpoint's state once the SAE exists; records the training L0 of every step and the held-out
    L0 after each of the last steps."""

    def __init__(self, state: dict, held_out: torch.Tensor, steps: int) -> None:
        self.state, self.held_out, self.steps = state, held_out, steps
        self.l0: list[float] = []
        self.held_out_l0: list[float] = []

    def on_fit_start(self, trainer: L.Trainer, module: SAEModule) -> None:
        module.load_state_dict(self.state)
        module.forget_known_buffers()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.l0.append(float(outputs["firing"].sum()) / len(batch))
        if trainer.global_step > self.steps - HELD_OUT_STEPS:
            with torch.no_grad():
                codes = module.evaluate_batch(self.held_out.to(module.device))["codes"]
            self.held_out_l0.append(float((codes != 0).sum(1).float().mean()))


def continue_under_variants(checkpoint: Path, cache: str, steps: int, batch_size: int) -> None:
    data = ActivationFileDataModule(path=cache, batch_size=batch_size, seed=1)
    data.setup("fit")
    held_out = torch.cat(list(data.val_dataloader()))
    precision = automatic_precision(DEVICE.type)[0]  # what `fit` takes with trainer.precision unset
    print(f"{checkpoint}: {steps} more steps of {batch_size} tokens on {cache}, {precision}; held-out "
          f"{len(held_out):,} tokens")
    for name, first_betas in VARIANTS.items():
        L.seed_everything(0, verbose=False)
        module, state = module_from_checkpoint(checkpoint, first_betas)
        recorder = Recorder(state, held_out, steps)
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                            precision=precision, callbacks=[recorder])
        trainer.fit(module, ActivationFileDataModule(path=cache, batch_size=batch_size, seed=1))
        second_half = recorder.l0[steps // 2:]
        flip = alternation(second_half)
        print(f"{name:24s} training L0 {sum(second_half) / len(second_half):5.1f}: flip ±{flip.amplitude:.1%}, "
              f"lag-1 autocorrelation {flip.lag_one:+.2f}; held-out L0 after the last {HELD_OUT_STEPS} steps: "
              + ", ".join(f"{l0:.1f}" for l0 in recorder.held_out_l0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run's folder: read its logged training L0")
    parser.add_argument("--checkpoint", type=Path, help="a trained SAE's checkpoint to continue")
    parser.add_argument("--cache", help="the activation cache to continue it on (with --checkpoint)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=4096)
    args = parser.parse_args()
    if args.run is not None:
        l0 = logged_l0(args.run)
        flip = alternation(l0[-(len(l0) // 3):])
        print(f"{args.run}: last third of {len(l0)} steps, training L0 flips ±{flip.amplitude:.1%} step to step, "
              f"lag-1 autocorrelation {flip.lag_one:+.2f}")
    if args.checkpoint is not None:
        if args.cache is None:
            raise SystemExit("--checkpoint needs --cache: the activations to continue training on")
        continue_under_variants(args.checkpoint, args.cache, args.steps, args.batch_size)
    if args.run is None and args.checkpoint is None:
        parser.error("give --run, --checkpoint (with --cache), or both")


if __name__ == "__main__":
    main()
