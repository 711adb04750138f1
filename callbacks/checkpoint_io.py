"""Checkpoints that appear whole or not at all.

Lightning's default writer goes through fsspec, which stages the file in the system's temporary folder and then
moves it over the target: when that folder is on another file system the move is a copy, so a kill or a full disk
during it leaves a truncated `last.ckpt` where the previous good one was. Here the checkpoint is written to a
hidden file beside the target, flushed to disk, and renamed over it (atomic on POSIX): a kill or a failed write
leaves the previous checkpoint as it was (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO


def partial_path(path: Path) -> Path:
    """Where a checkpoint is written before it is renamed into place (one name per target, so that a stray file
    left by a kill is overwritten by the next save rather than piling up)."""
    return path.with_name(f".{path.name}.partial")


class RecordingWriter:
    """A file's `write` that remembers the OSError it raised: torch.save reports a failed write only as an opaque
    "unexpected pos" RuntimeError, and a researcher needs to read "No space left on device"."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written to a partial file, fsynced and renamed over the target; remote ones (a URL)
    go through Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        writer = None
        try:
            with open(partial, "wb") as handle:
                writer = RecordingWriter(handle)
                torch.save(checkpoint, writer)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except (OSError, RuntimeError) as error:  # torch.save turns a failed write into a RuntimeError
            partial.unlink(missing_ok=True)
            cause = writer.error if writer is not None and writer.error is not None else error
            previous = "the previous checkpoint there is intact" if path.exists() else "no checkpoint was there"
            raise OSError(f"Could not write checkpoint {path} ({cause}); {previous}. Free disk space or set "
                          f"trainer.default_root_dir to a folder with room, then resume") from None  # the message names the cause
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself reaches the disk
        finally:
            os.close(directory)
