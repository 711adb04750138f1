"""Saving a checkpoint outside Lightning's schedule: on an interrupt, or before a non-finite loss ends a run."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def rescue_checkpoint(trainer: L.Trainer, name: str) -> Path:
    """Save `name` in the run's checkpoint folder (or its root folder) and return its path."""
    callback = trainer.checkpoint_callback
    folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
    path = folder / name
    trainer.save_checkpoint(path)
    return path
