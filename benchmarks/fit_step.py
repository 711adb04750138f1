"""Each architecture's training step through `fit` (the CLI with its config: callbacks, logger, clipping,
checkpoint writer) against the bare step of the same SAE on the same batch, on cached activations, in one process.

    python -m benchmarks.fit_step --cache cache/smollm2_l15_attn_out_v10 [--steps 10 --precision bf16-mixed]

The two are measured in pairs: after each `fit` step, a bare step of a copy of the SAE (on the run's first batch,
with its own Adam) runs and is timed on its own, and the `fit` step is the time from the end of that bare step to
the end of the next `fit` step, so it includes reading the batch, the callbacks and the logging of a
`log_every_n_steps: 1` config. Both figures are medians over the steps from the third on (the first fills the
shuffle buffer). Pairing matters here: these machines' speed drifts by up to 25% within minutes, and two phases
measured one after the other gave fit/bare ratios that moved by 0.3 between runs. The goal (issue "Speed"):
through `fit`, every architecture's step within 10% of its bare step (fit/bare ≤ 1.10).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import lightning as L
import torch

from benchmarks import DEVICE, clock, device_name, synchronize
from benchmarks.sae_step import training_step
from benchmarks.zoo_short_runs import ARCHITECTURES, CONFIGS
from sagsae.commands.train import SAGSAECLI

GOAL = 1.10


class PairedBareStep(L.Callback):
    """After every `fit` step, one bare step of a copy of the SAE, timed on its own (see the module docstring)."""

    def __init__(self, autocast: str | None) -> None:
        self.autocast = autocast
        self.bare: list[float] = []
        self.fit: list[float] = []
        self.resumed: float | None = None
        self.step = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch: torch.Tensor,
                           batch_idx: int) -> None:
        synchronize()
        if self.resumed is not None:
            self.fit.append(clock() - self.resumed)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.autocast == "bf16"):
            if self.step is None:
                x = module.sae.normalize(batch).detach()
                self.step = training_step(copy.deepcopy(module.sae).train(), x, 8.0)
                self.step()  # warm-up
            synchronize()
            start = clock()
            self.step()
            synchronize()
        self.resumed = clock()
        self.bare.append(self.resumed - start)


def fit_step(name: str, cache: str, steps: int, precision: str, root: str) -> tuple[float, float]:
    """(median seconds per step through fit, median seconds per paired bare step) for configs/<name>.yaml over
    configs/default.yaml, as the README runs them."""
    configs = [CONFIGS / "default.yaml"] + ([CONFIGS / f"{name}.yaml"] if name != "default" else [])
    cli = SAGSAECLI(args=[*(arg for config in configs for arg in ("--config", str(config))),
                          "--data", "datamodules.ActivationFileDataModule",
                          "--data.path", cache, "--trainer.max_steps", str(steps), "--trainer.precision", precision,
                          "--trainer.accelerator", DEVICE.type, "--trainer.default_root_dir", root,
                          "--trainer.limit_val_batches", "0"], run=False)
    paired = PairedBareStep("bf16" if precision == "bf16-mixed" else None)
    cli.trainer.callbacks.append(paired)
    cli.trainer.fit(cli.model, cli.datamodule)
    return statistics.median(paired.fit[1:]), statistics.median(paired.bare[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a `sagsae cache` folder")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for name in args.architectures:
            fit_seconds, bare = fit_step(name, args.cache, args.steps, args.precision, root)
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
