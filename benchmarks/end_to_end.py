"""Tokens/s of a training `fit` on live activations against the activation pipeline alone, in fp32 and in bf16
(the LM in bfloat16 and the SAE in bf16-mixed), all in one process.

    python -m benchmarks.end_to_end [--width 4608 --steps 6 --precisions 32-true bf16-mixed --json out.json]

The pipeline alone draws the same number of batches from the datamodule with no SAE; `fit` trains the default
SA-GSAE on them. Throughput is timed between the end of the first step and the end of the last one, so model
loading and the first batch's shuffle-buffer fill are excluded from both. The goals (issue "Speed"): bf16 fit
≥ 0.8 of its own pipeline, and ≥ 1.8× the fp32 fit. Peak resident memory is reported too (the whole process:
LMs, buffers and SAEs).
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


LM_DTYPE = {"32-true": "float32", "bf16-mixed": "bfloat16"}  # the LM's dtype for each SAE precision


def fit_tokens_per_second(module: L.LightningModule, data: L.LightningDataModule, steps: int,
                          precision: str = "32-true") -> float:
    clock = StepClock()
    L.Trainer(accelerator=DEVICE.type, devices=1, max_steps=steps, precision=precision, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              callbacks=[clock]).fit(module, data)
    return (steps - 1) * data.hparams.batch_size / (clock.times[-1] - clock.times[0])


def pipeline_tokens_per_second(data: LMActivationDataModule, steps: int) -> float:
    batches = data.training_batches()
    next(batches)
    start = clock()
    tokens = sum(len(batch) for batch in itertools.islice(batches, steps - 1))
    return tokens / (clock() - start)


def datamodule(args, lm_dtype: str = "auto") -> LMActivationDataModule:
    return LMActivationDataModule(model=args.model, hookpoint=args.hookpoint, layer=args.layer, batch_size=args.batch,
                                  lm_dtype=lm_dtype)


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
    parser.add_argument("--precisions", nargs="+", default=list(LM_DTYPE), choices=list(LM_DTYPE))
    args = parser.parse_args()
    rates: dict[str, dict[str, float]] = {}
    for precision in args.precisions:
        torch.manual_seed(0)
        data = datamodule(args, LM_DTYPE[precision])
        data.load_language_model(DEVICE)  # where `fit` will run it
        pipeline = pipeline_tokens_per_second(data, args.steps)
        del data
        module: SAEModule = SAEModule.from_arguments("sagsae", width=args.width, sparsity_coefficient=8.0)
        fit = fit_tokens_per_second(module, datamodule(args, LM_DTYPE[precision]), args.steps, precision)
        rates[precision] = {"pipeline": pipeline, "fit": fit}
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.model} {args.hookpoint} layer {args.layer}, SA-GSAE width {args.width}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {device_name()}")
    print(f"{'precision (LM dtype)':<26} {'pipeline tok/s':>15} {'fit tok/s':>10} {'fit/pipeline':>13}")
    for precision, rate in rates.items():
        print(f"{precision + ' (' + LM_DTYPE[precision] + ')':<26} {rate['pipeline']:>15,.0f} {rate['fit']:>10,.0f} "
              f"{rate['fit'] / rate['pipeline']:>13.2f}")
    if len(rates) == 2:
        print(f"bf16 fit / fp32 fit {rates['bf16-mixed']['fit'] / rates['32-true']['fit']:.2f} (goal ≥ 1.8)")
    print(f"peak resident memory {peak_gib:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "peak_gib": peak_gib}, indent=2))


if __name__ == "__main__":
    main()
