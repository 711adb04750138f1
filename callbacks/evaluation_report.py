"""`validate` and `test` reports: a rich table in the terminal and metrics.json in the run's folder."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from rich.console import Console
from rich.table import Table


class EvaluationReport(L.Callback):
    """After a stand-alone `validate` or `test` run, print its metrics and write them to metrics.json.

    `trainer.log_dir` is a collective under DDP, so every rank asks for it and only rank zero writes."""

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not the validations inside `fit`
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(f"{stage}/")}
        table = Table(title=f"sagsae {stage} report")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.5g}")
        Console().print(table)
        folder.mkdir(parents=True, exist_ok=True)
        report = {"stage": stage, "ckpt_path": trainer.ckpt_path,
                  "trained_tokens": -1 if pl_module.state is None else int(pl_module.state.tokens_seen),
                  "metrics": metrics}
        (folder / "metrics.json").write_text(json.dumps(report, indent=2))
        print(f"Wrote {folder / 'metrics.json'}")
