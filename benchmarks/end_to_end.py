"""Tokens/s of a training `fit` on live activations against the activation pipeline alone (same process).

    python -m benchmarks.end_to_end [--width 4608 --steps 6 --json out.json]

The pipeline alone draws the same number of batches from the datamodule with no SAE; `fit` trains the default
SA-GSAE on them. Throughput is timed between the end of the first step and the end of the last one, so model
loading and the first batch's shuffle-buffer fill are excluded from both. Peak resident memory is reported
too (the whole process: LM, buffers and SAE).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
from pathlib import Path

import lightning as L
import torch

from benchmarks import DEVICE, clock, device_name
from datamodules import LMActivationDataModule
from lightning_modules import SAEModule


class StepClock(L.Callback):
    """Wall time at the end of every training step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(clock())


def fit_tokens_per_second(module: L.LightningModule, data: L.LightningDataModule, steps: int) -> float:
    clock = StepClock()
    L.Trainer(accelerator=DEVICE.type, devices=1, max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[clock]).fit(module, data)
    return (steps - 1) * data.hparams.batch_size / (clock.times[-1] - clock.times[0])


def pipeline_tokens_per_second(data: LMActivationDataModule, steps: int) -> float:
    batches = data.training_batches()
    next(batches)
    start = clock()
    tokens = sum(len(batch) for batch in itertools.islice(batches, steps - 1))
    return tokens / (clock() - start)


def datamodule(args) -> LMActivationDataModule:
    return LMActivationDataModule(model=args.model, hookpoint=args.hookpoint, layer=args.layer, batch_size=args.batch)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--hookpoint", default="mlp_out")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--width", type=int, default=4608)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = datamodule(args)
    data.load_language_model(DEVICE)  # where `fit` will run it
    pipeline = pipeline_tokens_per_second(data, args.steps)
    module: SAEModule = SAEModule.from_arguments("sagsae", width=args.width, sparsity_coefficient=8.0)
    trained = fit_tokens_per_second(module, datamodule(args), args.steps)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.model} {args.hookpoint} layer {args.layer}, SA-GSAE width {args.width}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {device_name()}")
    print(f"{'activation pipeline alone':<28} {pipeline:>10,.0f} tokens/s")
    print(f"{'fit (pipeline + SAE step)':<28} {trained:>10,.0f} tokens/s")
    print(f"peak resident memory {peak_gib:.2f} GiB")
    print(f"ratio: fit / pipeline {trained / pipeline:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"pipeline": pipeline, "fit": trained, "peak_gib": peak_gib}, indent=2))


if __name__ == "__main__":
    main()
