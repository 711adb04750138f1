"""What a researcher needs around a run: its metadata on disk, a finite progress bar, where things landed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.dashboard import SAETensorBoardLogger
from sagsae.analysis.convergence import TARGET_L0_BAND, TARGET_R2_SLOPE, at_target

_PACKAGES = ("sagsae", "torch", "lightning", "torchmetrics", "transformers", "datasets", "gguf")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Package versions, Python and the git commit: what a run's numbers depend on besides its config."""
    return {"versions": {name: _version(name) for name in _PACKAGES} | {"python": platform.python_version()},
            **git_state(Path(__file__).resolve().parent)}


def git_state(folder: Path) -> dict:
    """The commit checked out at `folder` and whether tracked files differ from it: a run started from edited code
    is not that commit's run. Both None outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: `status` then never writes the index, so a timeout cannot leave .git/index.lock
            result = subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, text=True, timeout=5,
                                    cwd=folder)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


class RunInfo(L.Callback):
    """Writes run_metadata.json (versions, seed, data, SAE) into the log folder and prints where to look, and at
    the end of a run with a target L0 whether it settled there, from its held-out checks (kept in checkpoints, so
    a resumed run judges its whole history).

    `trainer.log_dir` is a collective under DDP, so every rank asks for it and only rank zero writes."""

    def __init__(self) -> None:
        self.checks: list[dict[str, float]] = []  # held-out L0 and R² at each validation of `fit`

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and "val/l0" in metrics:
            self.checks.append({"tokens_seen": int(pl_module.state.tokens_seen), "l0": float(metrics["val/l0"]),
                                "r2": float(metrics["val/r2"])})

    def state_dict(self) -> dict:
        return {"checks": self.checks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.checks = list(state_dict.get("checks", []))

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # after every on_fit_start, so that the module has estimated (or restored) its input scale
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write_metadata(trainer, pl_module, folder)
            if isinstance(trainer.logger, SAETensorBoardLogger):
                trainer.logger.write_layout()
            experiment = getattr(trainer.logger, "experiment", None)
            if (folder / "config.yaml").is_file() and hasattr(experiment, "add_text"):
                experiment.add_text("config", "```yaml\n" + (folder / "config.yaml").read_text() + "\n```", 0)

    def _write_metadata(self, trainer: L.Trainer, pl_module, folder: Path) -> None:
        datamodule = trainer.datamodule
        info = {
            **environment(),
            "seed": _seed(),
            "architecture": pl_module.sae.architecture,
            "d_in": pl_module.sae.d_in,
            "width": pl_module.sae.width,
            "input_scale": float(pl_module.sae.input_scale),
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run_metadata.json").write_text(json.dumps(info, indent=2))

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        log_dir = trainer.log_dir
        if trainer.is_global_zero:
            if isinstance(trainer.logger, SAETensorBoardLogger):  # hparams beside the final metrics (HPARAMS tab)
                tags = sorted(k for k in trainer.callback_metrics if k.startswith(("train/", "val/")))
                trainer.logger.log_final_metrics(dict(pl_module.hparams), tags)
            self._print_summary(trainer, pl_module, log_dir)

    def _print_summary(self, trainer: L.Trainer, pl_module, log_dir: str | None) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in
                          ("train/l0", "train/r2", "train/dead_fraction", "train/tokens_per_s",
                           "val/l0", "val/r2", "val/silent_fraction", "val/ce_delta", "val/ce_recovered")
                          if k in metrics)
        checkpoint = trainer.checkpoint_callback
        log_root = Path(trainer.logger.save_dir) if trainer.logger is not None else Path(trainer.default_root_dir)
        print(f"\nFinished at step {trainer.global_step}: {shown}")
        target = pl_module.hparams.get("target_l0")
        if target is not None and self.checks:
            print(settle_line(self.checks, target))
        print(f"Logs, config and metadata: {log_dir}")
        if checkpoint is not None and checkpoint.dirpath:
            print(f"Checkpoints (last.ckpt resumes with --ckpt_path): {checkpoint.dirpath}")
        print(f"Open the dashboards with: tensorboard --logdir {log_root}")


def settle_line(checks: list[dict[str, float]], target_l0: float) -> str:
    """Whether a target-L0 run settled, in one line with its numbers (docs/method.md, "Asking for an L0")."""
    reading = at_target(checks, target_l0)
    if reading.checks < 2:
        return (f"Settled at target L0 {target_l0:g}: not judged (the last third of the run holds {reading.checks} "
                f"held-out check{'' if reading.checks == 1 else 's'}; validate more often, "
                "--trainer.val_check_interval)")
    return (f"Settled at target L0 {target_l0:g}: {'yes' if reading.settled else 'no'}; over the last third "
            f"({reading.checks} held-out checks) L0 stays within {reading.l0_off:.1%} of it and R² moves "
            f"{reading.r2_trend:+.4f} per 1M tokens (settled: within {TARGET_L0_BAND:.0%} and "
            f"{TARGET_R2_SLOPE} per 1M)")


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None


class StepProgressBar(RichProgressBar):
    """A rich bar counted in steps up to max_steps (the activation stream has no length of its own), showing
    the SAE's health at a glance: L0, R², dead fraction and tokens/s."""

    SHOWN = {"train/l0": "L0", "train/r2": "R²", "train/dead_fraction": "dead", "train/tokens_per_s": "tok/s",
             "val/r2": "val R²"}

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training steps"

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        return {short: metrics[name] for name, short in self.SHOWN.items() if name in metrics}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.started = time.perf_counter()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Where output is not a terminal (`make demo | tee log`, a batch job), the bar draws nothing until the
        end, so a plain line every ~5% of the run (at most every 50 steps) says how it goes."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_terminal or not trainer.is_global_zero:
            return
        step, total = trainer.global_step, trainer.max_steps
        every = min(50, max(1, total // 20)) if total > 0 else 50  # no max_steps (-1): every 50 steps
        if step % every and step != total:
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        eta = f", ETA {elapsed / done * (total - step):.0f} s" if done and total > 0 else ""
        shown = ", ".join(f"{name} {float(value):.4g}" for name, value in self.get_metrics(trainer, pl_module).items())
        print(f"step {step}/{total}, {elapsed:.0f} s{eta}" + (f": {shown}" if shown else ""), flush=True)

    @property
    def is_terminal(self) -> bool:
        return sys.stdout.isatty()
