"""Does a trained SAE flip between two states from one step to the next, and which Adam β1 stops it?

    python -m benchmarks.period_two --run runs/default                 # a run's logged training L0, last third
    python -m benchmarks.period_two --checkpoint runs/X/lightning_logs/version_0/checkpoints/last.ckpt \
        --cache cache/smollm2_l15_mlp_out_v10 [--steps 120]                # continue it under each β1 variant

A period-2 flip shows in the per-step training L0 as a lag-1 autocorrelation near −1 (`alternation` in
sagsae/analysis/convergence.py). Whether it is the SAE's state or the batches shows in the held-out L0 after
successive steps: a state that flips makes it flip too. `--checkpoint` continues one trained SAE from its weights
and buffers (λ, the target-L0 controller) with a fresh Adam under each variant: β1 0 everywhere (the λ-sparse
SAEs' default), β1 0.9 on the thresholds only, on b_dec only (it shifts every latent's π at once), everywhere,
and β1 0 at half the learning rate. For each it prints the flip of the training L0 over the second half, the
held-out L0 after each of the last 4 steps, and the cosine between each parameter's successive updates (−1: it
reverses every step). Same data order, same seed, same precision choice as `fit`; on CPU, 2 threads
(docs/method.md, "Asking for an L0").
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
from sagsae.training.migrations import migrate_checkpoint
from sagsae.commands.sweep import import_class
from sagsae.analysis.convergence import alternation
from sagsae.precision import automatic_precision

VARIANTS = {  # name: (β1 by parameter group or SAE parameter, factor on every learning rate)
    "beta1 0": ({}, 1.0), "beta1 0.9 on thresholds": ({"thresholds": 0.9}, 1.0),
    "beta1 0.9 on b_dec": ({"b_dec": 0.9}, 1.0), "beta1 0.9": ({"thresholds": 0.9, "weights": 0.9}, 1.0),
    "beta1 0, half the LR": ({}, 0.5)}
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


def module_from_checkpoint(path: Path, first_betas: dict[str, float], lr_factor: float = 1.0
                           ) -> tuple[SAEModule, dict]:
    """A module built from a checkpoint's recorded arguments (its state is loaded once the trainer has built the
    SAE), with the Adam β1 replaced as `first_betas` says: a key is a parameter group's name, or an SAE
    parameter's name, which then gets a group of its own (its group's learning rate); every learning rate is
    multiplied by `lr_factor`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    sae = arguments.pop("sae")
    module = SAEModule.from_arguments(import_class(sae["class_path"]), **sae["init_args"],
                                      **{**arguments, "lr_warmup_steps": 0, "lr": arguments["lr"] * lr_factor})
    build = module.configure_model

    def configure_model() -> None:  # the state exists once built: then its groups get the first-moment betas
        build()
        own_groups = module.state.optimizer_groups
        module.state.optimizer_groups = lambda: regroup(own_groups())

    def regroup(chosen: list[dict]) -> list[dict]:
        for name, parameter in module.sae.named_parameters():
            if name in first_betas:
                group = next(g for g in chosen if any(p is parameter for p in g["params"]))
                group["params"] = [p for p in group["params"] if p is not parameter]
                chosen.append({**group, "name": name, "params": [parameter]})
        for group in chosen:
            if group["name"] in first_betas:
                group["betas"] = (first_betas[group["name"]], group["betas"][1])
        return chosen

    module.configure_model = configure_model
    return module, migrate_checkpoint(checkpoint)["state_dict"]


class Recorder(L.Callback):
    """Loads the checkpoint's state once the SAE exists; records the training L0 of every step, the held-out
    L0 after each of the last steps, and for every parameter the cosine between its successive updates over the
    second half (−1: the update reverses every step, the parameter's own period-2 flip)."""

    def __init__(self, state: dict, held_out: torch.Tensor, steps: int) -> None:
        self.state, self.held_out, self.steps = state, held_out, steps
        self.l0: list[float] = []
        self.held_out_l0: list[float] = []
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.update_cosines: dict[str, list[float]] = {}

    def on_fit_start(self, trainer: L.Trainer, module: SAEModule) -> None:
        module.load_state_dict(self.state)
        module.forget_known_buffers()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.l0.append(float(outputs["firing"].sum()) / len(batch))
        for name, parameter in module.sae.named_parameters():
            value = parameter.detach().flatten().float().clone()
            last_value, last_update = self.previous.get(name, (None, None))
            update = None if last_value is None else value - last_value
            if update is not None and last_update is not None and trainer.global_step > self.steps // 2:
                cosine = torch.nn.functional.cosine_similarity(update, last_update, dim=0)
                self.update_cosines.setdefault(name, []).append(float(cosine))
            self.previous[name] = (value, update)
        if trainer.global_step > self.steps - HELD_OUT_STEPS:
            with torch.no_grad():
                codes = module.state.evaluate_batch(self.held_out.to(module.device))["codes"]
            self.held_out_l0.append(float((codes != 0).sum(1).float().mean()))


def continue_under_variants(checkpoint: Path, cache: str, steps: int, batch_size: int, variants: list[str]) -> None:
    data = ActivationFileDataModule(path=cache, batch_size=batch_size, seed=1)
    data.setup("fit")
    held_out = torch.cat(list(data.val_dataloader()))
    precision = automatic_precision(DEVICE.type)[0]  # what `fit` takes with trainer.precision unset
    print(f"{checkpoint}: {steps} more steps of {batch_size} tokens on {cache}, {precision}; held-out "
          f"{len(held_out):,} tokens")
    for name in variants:
        first_betas, lr_factor = VARIANTS[name]
        L.seed_everything(0, verbose=False)
        module, state = module_from_checkpoint(checkpoint, first_betas, lr_factor)
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
        print(" " * 24 + " cosine of successive updates: " + ", ".join(
            f"{parameter} {sum(c) / len(c):+.2f}" for parameter, c in recorder.update_cosines.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run's folder: read its logged training L0")
    parser.add_argument("--checkpoint", type=Path, help="a trained SAE's checkpoint to continue")
    parser.add_argument("--cache", help="the activation cache to continue it on (with --checkpoint)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to continue under (default: all)")
    args = parser.parse_args()
    if args.run is not None:
        l0 = logged_l0(args.run)
        flip = alternation(l0[-(len(l0) // 3):])
        print(f"{args.run}: last third of {len(l0)} steps, training L0 flips ±{flip.amplitude:.1%} step to step, "
              f"lag-1 autocorrelation {flip.lag_one:+.2f}")
    if args.checkpoint is not None:
        if args.cache is None:
            raise SystemExit("--checkpoint needs --cache: the activations to continue training on")
        continue_under_variants(args.checkpoint, args.cache, args.steps, args.batch_size, args.variants)
    if args.run is None and args.checkpoint is None:
        parser.error("give --run, --checkpoint (with --cache), or both")


if __name__ == "__main__":
    main()
