"""Each architecture's training step through `fit` (the CLI with its config: callbacks, logger, clipping,
checkpoint writer) against the bare step of the same SAE on the same batch, on cached activations, in one process.

    python -m benchmarks.fit_step --cache cache/smollm2_l15_attn_out_v10 [--steps 10 --precision bf16-mixed]

The step through `fit` is the median interval between the ends of consecutive training steps from the third on
(the first fills the shuffle buffer), so it includes reading the batch, the callbacks and the logging of a
`log_every_n_steps: 1` config. The goal (issue "Speed"): through `fit`, every architecture's step within 10% of its
bare step (fit/bare ≤ 1.10).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import DEVICE, device_name
from benchmarks.end_to_end import StepClock
from benchmarks.sae_step import seconds_per_call, training_step
from benchmarks.zoo_short_runs import ARCHITECTURES, CONFIGS
from sagsae.commands.train import SAGSAECLI
from sagsae.saes import SparseAutoencoder

GOAL = 1.10


def fit_step(name: str, cache: str, steps: int, precision: str, root: str) -> tuple[float, SparseAutoencoder, torch.Tensor]:
    """(median seconds per step through fit, the trained SAE, one normalized training batch) for configs/<name>.yaml
    over configs/default.yaml, as the README runs them."""
    configs = [CONFIGS / "default.yaml"] + ([CONFIGS / f"{name}.yaml"] if name != "default" else [])
    cli = SAGSAECLI(args=[*(arg for config in configs for arg in ("--config", str(config))),
                          "--data", "datamodules.ActivationFileDataModule",
                          "--data.path", cache, "--trainer.max_steps", str(steps), "--trainer.precision", precision,
                          "--trainer.accelerator", DEVICE.type, "--trainer.default_root_dir", root,
                          "--trainer.limit_val_batches", "0"], run=False)
    clock = StepClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    intervals = [end - start for start, end in zip(clock.times[1:], clock.times[2:])]
    batch = next(iter(cli.datamodule.train_dataloader())).to(DEVICE)
    return statistics.median(intervals), cli.model.sae, cli.model.sae.normalize(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a `sagsae cache` folder")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for name in args.architectures:
            fit_seconds, sae, x = fit_step(name, args.cache, args.steps, args.precision, root)
            bare = seconds_per_call(training_step(copy.deepcopy(sae).train(), x, 8.0), args.repeats,
                                    "bf16" if args.precision == "bf16-mixed" else None)
            rows[name] = {"fit": fit_seconds, "bare": bare, "ratio": fit_seconds / bare}
    print(f"{device_name()}, {torch.get_num_threads()} threads, {args.precision}, {args.cache}")
    print(f"{'config':<10} {'fit ms':>9} {'bare ms':>9} {'fit/bare':>9}")
    for name, row in rows.items():
        print(f"{name:<10} {row['fit'] * 1e3:>9.0f} {row['bare'] * 1e3:>9.0f} {row['ratio']:>9.2f}")
    missed = [name for name, row in rows.items() if row["ratio"] > GOAL]
    print(f"goal fit/bare ≤ {GOAL}: " + (f"missed for {missed}" if missed else "met for every architecture"))
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
