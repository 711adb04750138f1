"""Writing activation caches: safetensors shards of raw activations (`activations`, [n, d], or a transcoder's
(source, target) pairs [n, 2, d]) and metadata.json,
the layout that `ActivationFileDataModule` reads. `python -m sagsae cache` and `synth` write through here."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from datamodules.activation_files import KEY, METADATA
from datamodules.language_model import DTYPES
from datamodules.lm_activations import LMActivationDataModule
from sagsae.measures import normalization_scale
from sagsae.formats.staging import staged_folder


class ShardWriter:
    """Accumulates activation chunks and writes fixed-size shards."""

    def __init__(self, folder: Path, shard_tokens: int, dtype: torch.dtype) -> None:
        self.folder, self.shard_tokens, self.dtype = folder, shard_tokens, dtype
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: list[Tensor] = []
        self.pending_tokens = 0
        self.shards = 0
        self.tokens = 0

    def add(self, chunk: Tensor) -> None:
        self.pending.append(chunk.to(self.dtype).cpu())
        self.pending_tokens += len(chunk)
        while self.pending_tokens >= self.shard_tokens:
            rows = torch.cat(self.pending)
            self._write(rows[: self.shard_tokens])
            self.pending = [rows[self.shard_tokens:]]
            self.pending_tokens = len(self.pending[0])

    def close(self) -> None:
        if self.pending_tokens:
            self._write(torch.cat(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, rows: Tensor) -> None:
        save_file({KEY: rows.contiguous()}, str(self.folder / f"shard-{self.shards:05d}.safetensors"))
        self.shards += 1
        self.tokens += len(rows)


def normalization_record(squares: float | Tensor, tokens: int, d_model: int) -> dict[str, float]:
    """metadata.json's normalization scalar(s): the activations' (a transcoder's source), and its target's."""
    sides = [normalization_scale(float(total), tokens, d_model) for total in torch.as_tensor(squares).reshape(-1)]
    return {"normalization_scale": sides[0], **({"target_normalization_scale": sides[1]} if len(sides) > 1 else {})}


def report_progress(done: int, total: int, seconds: float) -> None:
    """One line per shard on stderr: a cache of millions of tokens takes tens of minutes on a CPU."""
    rate = done / max(seconds, 1e-9)
    print(f"cached {done:,} of {total:,} train tokens ({rate:,.0f} tokens/s, about "
          f"{math.ceil(max(total - done, 0) / rate / 60)} min left at most)", file=sys.stderr, flush=True)


def write_cache(data: LMActivationDataModule, out: Path, train_tokens: int, val_tokens: int, shard_tokens: int,
                dtype: str, device: torch.device | None = None) -> dict:
    """One pass over the training documents (never repeated: a shorter corpus gives fewer tokens) and the first
    `val_tokens` held-out ones, written atomically to `out`; returns what metadata.json records. The LM runs on
    `device` (None: where `setup` puts it, the CPU outside a Trainer)."""
    if out.exists():  # before the LM loads
        raise FileExistsError(f"{out} already exists: choose a new --out folder or remove it first")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device is not None:
        data.load_language_model(device)
    data.setup()
    with staged_folder(out) as staging:
        train = ShardWriter(staging / "train", shard_tokens, DTYPES[dtype])
        squares, start = 0.0, time.perf_counter()  # Σ‖x‖² over the tokens (per side of pairs)
        for chunk in data.activation_chunks(validation=False, passes=[0], guard=data.guard):
            chunk = chunk[: train_tokens - train.tokens - train.pending_tokens]
            if dtype == "float16" and chunk.abs().max() > 6e4:
                raise ValueError("Activations exceed float16's range: cache with --dtype float32 or bfloat16")
            squares = squares + chunk.double().pow(2).sum(-1).sum(0)
            shards = train.shards
            train.add(chunk)
            if train.shards > shards:
                report_progress(train.tokens, train_tokens, time.perf_counter() - start)
            if train.tokens + train.pending_tokens >= train_tokens:
                break
        train.close()
        val = ShardWriter(staging / "val", shard_tokens, DTYPES[dtype])
        for batch in data.held_out_tokens(val_tokens).split(shard_tokens):
            val.add(batch)
        val.close()
        # the datamodule's own arguments (the CLI adds bookkeeping keys, "_class_path", which it would refuse)
        arguments = {key: value for key, value in data.hparams.items() if not key.startswith("_")}
        metadata = {**data.describe(), "lm_data": arguments, "dtype": dtype, "train_tokens": train.tokens, "val_tokens": val.tokens,
                    "train_shards": train.shards, "val_shards": val.shards,
                    **normalization_record(squares, train.tokens, data.d_model),
                    "requested_train_tokens": train_tokens}
        (staging / METADATA).write_text(json.dumps(metadata, indent=2))
    return metadata
