"""Writing activation caches: safetensors shards of raw activations (`activations`, [n, d], or a transcoder's
(source, target) pairs [n, 2, d]) and metadata.json,
the layout that `ActivationFileDataModule` reads. `python -m sagsae cache` and `synth` write through here."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from datamodules.activation_files import KEY, METADATA
from datamodules.activation_stream import GuardEach, NormGuard
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
    return write_caches(data, [out], None, train_tokens, val_tokens, shard_tokens, dtype, device)[0]


def write_caches(data: LMActivationDataModule, outs: list[Path], hookpoints: list[tuple[str, int | None]] | None,
                 train_tokens: int, val_tokens: int, shard_tokens: int, dtype: str,
                 device: torch.device | None = None) -> list[dict]:
    """`write_cache` for several (hookpoint, layer) pairs of one LM at once, one folder each (`outs`, in the same
    order), from one forward per batch of contexts that stops at the deepest of them. Each folder holds what a
    cache of its hookpoint alone holds: each hookpoint has its own norm guard. `hookpoints` None: the datamodule's
    own hookpoint (or transcoder pair), into `outs[0]`."""
    for out in outs:  # before the LM loads
        if out.exists():
            raise FileExistsError(f"{out} already exists: choose a new --out folder or remove it first")
    if len(set(outs)) != len(outs):
        raise ValueError(f"Two hookpoints would write to one folder: {[str(out) for out in outs]}")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if hookpoints is not None and data.pairs:
        raise ValueError("Several hookpoints are cached one folder each: drop data.init_args.target_hookpoint "
                         "(a transcoder's pairs are cached one pair at a time)")
    if device is not None:
        data.load_language_model(device)
    data.setup()
    if hookpoints is None:
        read, guard, describe = None, data.guard, [data.describe()]
        arguments = [{}]
    else:
        readers = data.lm.readers(hookpoints)
        read = functools.partial(data.lm.activations_at, readers)
        guard = GuardEach(data.hparams.norm_guard_multiple, len(readers))
        describe = [{**data.describe(), "hookpoint": reader.hookpoint, "layer": reader.layer} for reader in readers]
        arguments = [{"hookpoint": reader.hookpoint, "layer": reader.layer} for reader in readers]
    with contextlib.ExitStack() as stack:
        stagings = [stack.enter_context(staged_folder(out)) for out in outs]
        trains = [ShardWriter(staging / "train", shard_tokens, DTYPES[dtype]) for staging in stagings]
        squares, start = [0.0] * len(outs), time.perf_counter()  # Σ‖x‖² over the tokens (per side of pairs)
        for chunks in each_output(data.activation_chunks(validation=False, passes=[0], guard=guard, read=read)):
            shards = trains[0].shards
            for index, (train, chunk) in enumerate(zip(trains, chunks)):
                chunk = chunk[: train_tokens - train.tokens - train.pending_tokens]
                if dtype == "float16" and chunk.abs().max() > 6e4:
                    raise ValueError("Activations exceed float16's range: cache with --dtype float32 or bfloat16")
                squares[index] = squares[index] + chunk.double().pow(2).sum(-1).sum(0)
                train.add(chunk)
            if trains[0].shards > shards:
                report_progress(trains[0].tokens, train_tokens, time.perf_counter() - start)
            if all(train.tokens + train.pending_tokens >= train_tokens for train in trains):
                break
        held_out_guard = NormGuard(data.hparams.norm_guard_multiple) if hookpoints is None else \
            GuardEach(data.hparams.norm_guard_multiple, len(outs))
        held_out = take_each(each_output(data.activation_chunks(validation=True, passes=[0], guard=held_out_guard,
                                                                every_rank=True, read=read)), val_tokens, len(outs))
        records = []
        # the datamodule's own arguments (the CLI adds bookkeeping keys, "_class_path", which it would refuse)
        own = {key: value for key, value in data.hparams.items() if not key.startswith("_")}
        guards = [guard] if hookpoints is None else guard.guards
        for staging, train, rows, total, description, changed, kept in zip(stagings, trains, held_out, squares,
                                                                           describe, arguments, guards):
            train.close()
            val = ShardWriter(staging / "val", shard_tokens, DTYPES[dtype])
            for batch in rows.split(shard_tokens):
                val.add(batch)
            val.close()
            metadata = {**description, "dropped_massive": kept.dropped_massive,
                        "dropped_nonfinite": kept.dropped_nonfinite, "lm_data": {**own, **changed}, "dtype": dtype,
                        "train_tokens": train.tokens, "val_tokens": val.tokens, "train_shards": train.shards,
                        "val_shards": val.shards, **normalization_record(total, train.tokens, data.d_model),
                        "requested_train_tokens": train_tokens}
            (staging / METADATA).write_text(json.dumps(metadata, indent=2))
            records.append(metadata)
    return records


def each_output(chunks: Iterator[Tensor | list[Tensor]]) -> Iterator[list[Tensor]]:
    """Chunks as a list per output folder: one hookpoint's tensors become a list of one."""
    return (chunk if isinstance(chunk, list) else [chunk] for chunk in chunks)


def take_each(chunks: Iterator[list[Tensor]], count: int, outputs: int) -> list[Tensor]:
    """The first `count` rows of each output's stream (fewer if the stream ends first)."""
    taken: list[list[Tensor]] = [[] for _ in range(outputs)]
    for chunk in chunks:
        for rows, part in zip(taken, chunk):
            rows.append(part[: count - sum(len(r) for r in rows)])
        if all(sum(len(r) for r in rows) >= count for rows in taken):
            break
    return [torch.cat(rows) for rows in taken]
