"""Activations cached on disk as safetensors shards (tensor key `activations`, shape [n, d]).

Layout written by `python -m sagsae cache`: `<dir>/metadata.json`, `<dir>/train/shard-00000.safetensors`, …,
`<dir>/val/shard-00000.safetensors`. `ActivationFileDataModule` also reads any folder of such shards or a
single `.safetensors` file with an `activations` tensor. Memory stays bounded: one shard plus the shuffle
buffer at a time.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.activation_stream import (IterableStream, held_out_loader, held_out_part, rank_and_world,
                                           stream_position)
from datamodules.lm_activations import LMActivationDataModule
from sagsae.measures import normalization_scales

KEY = "activations"
METADATA = "metadata.json"
BASELINES = "lm_loss_baselines.json"  # the clean and zeroed LM loss of its held-out contexts (lm_evaluation)


def shard_files(path: str | Path, split: str = "train") -> list[Path]:
    """The shards of `path`: a single file, a cache folder's split subfolder, or a folder of shards."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"Activation path {path} does not exist (write one with `python -m sagsae cache`)")
    folder = path / split if (path / split).is_dir() else path
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"No .safetensors shards in {folder}")
    return shards


def leading_rows(shards: list[Path], tokens: int) -> Tensor:
    """The first `tokens` finite rows of `shards` in order, float32 at the cache's raw scale ([n, d], or [n, 2, d]
    for pairs); rows with a non-finite value are passed over, as training skips them."""
    taken, count = [], 0
    for shard in shards:
        rows = load_file(str(shard))[KEY].float()
        taken.append(rows[torch.isfinite(rows.flatten(1)).all(1)][: tokens - count])
        count += len(taken[-1])
        if count >= tokens:
            break
    return torch.cat(taken)


class ShardShape(NamedTuple):
    rows: int
    width: int
    dtype: str
    pairs: bool  # (source, target) pairs [n, 2, d] rather than activations [n, d]


def shard_shape(path: Path) -> ShardShape:
    """(rows, width, dtype, pairs) of a shard's activations, read from its header; a file that is not a whole
    safetensors shard (truncated, corrupt, another tensor) fails naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if KEY not in handle.keys():
                raise ValueError(f"{path} has no {KEY!r} tensor (it has {list(handle.keys())}): not a `sagsae cache` "
                                 f"shard")
            tensor = handle.get_slice(KEY)
            shape, dtype = tensor.get_shape(), tensor.get_dtype()
    except ValueError:
        raise
    except Exception as error:  # safetensors' own error type: a truncated or corrupt file
        raise ValueError(f"{path} is not a readable safetensors shard ({error}): write the cache again with "
                         f"`sagsae cache`") from None
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[1] != 2):
        raise ValueError(f"{path}: {KEY!r} must be [n, d] (or (source, target) pairs [n, 2, d]), got shape {shape}")
    dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(dtype, dtype)
    return ShardShape(int(shape[0]), int(shape[-1]), dtype, len(shape) == 3)


def check_shards(folder: Path, metadata: dict, split: str, shapes: dict[Path, tuple[int, int, str]]) -> None:
    """The shards of a cache split agree with what its metadata.json says was written: count, tokens, width and
    dtype (a missing, truncated or foreign shard fails here, before training)."""
    expected = {"shards": metadata.get(f"{split}_shards"), "tokens": metadata.get(f"{split}_tokens"),
                "width": metadata.get("d_model"), "dtype": metadata.get("dtype")}
    found = {"shards": len(shapes), "tokens": sum(shape.rows for shape in shapes.values())}
    for name, value in found.items():
        if expected[name] is not None and value != expected[name]:
            raise ValueError(f"{folder / split} holds {value} {name} where {folder / METADATA} says "
                             f"{expected[name]}: the cache is incomplete; write it again with `sagsae cache`")
    for shard, shape in shapes.items():
        for name, value in (("width", shape.width), ("dtype", shape.dtype)):
            if expected[name] is not None and value != expected[name]:
                raise ValueError(f"{shard} has activation {name} {value} where {folder / METADATA} says "
                                 f"{expected[name]}: it belongs to another cache")


class ActivationFileDataModule(L.LightningDataModule):
    """Trains from cached activations: shards in a shuffled order each pass, mixed in a shuffle buffer.

    Args:
        path: a cache folder (from `sagsae cache`), a folder of shards, or one `.safetensors` file.
        val_path: held-out activations; None = the cache's `val/` split if present, else no validation.
        batch_size: tokens per batch.
        shuffle_buffer_tokens: tokens mixed before batches are drawn.
        val_tokens: held-out tokens evaluated at each validation.
        held_out: "all" the held-out tokens, or the "selection" (first) or "verdict" (second) half of them and of
            the LM loss's held-out contexts: choose a recipe on one, report on the other.
        normalization_tokens: tokens used to estimate the normalization scalar (E‖x‖² = d).
        seed: shard order and shuffle buffer.

    Under DDP each rank reads a disjoint set of shards (dealt round-robin; with fewer shards than ranks, a
    disjoint stride of rows), and the stream never ends, so no rank waits for another at an epoch's end.
    Shards are shuffled per epoch and mixed in windows of about `shuffle_buffer_tokens` rows; a resumed run
    continues the stream exactly where the checkpoint left it.
    """

    def __init__(self, path: str, val_path: str | None = None, batch_size: int = 4096,
                 shuffle_buffer_tokens: int = 65_536, val_tokens: int = 32_768, normalization_tokens: int = 16_384,
                 seed: int = 0, held_out: str = "all") -> None:
        super().__init__()
        held_out_part([], held_out)  # an unknown part fails here
        self.save_hyperparameters()
        self.shards = shard_files(path, "train")
        shapes = {shard: shard_shape(shard) for shard in self.shards}
        dims = {shape.width for shape in shapes.values()}
        if len(dims) != 1:
            raise ValueError(f"Shards of {path} disagree on the activation size: {sorted(dims)}")
        kinds = {shape.pairs for shape in shapes.values()}
        if len(kinds) != 1:
            raise ValueError(f"Shards of {path} mix activations [n, d] with (source, target) pairs [n, 2, d]")
        self.pairs = kinds.pop()
        self._d_model = dims.pop()
        self._shard_rows = {shard: shape.rows for shard, shape in shapes.items()}
        self._resume_batches = 0
        self.lm_data = None  # the live datamodule behind the cache, for the LM loss (language_model_data)
        folder = Path(path)
        cache_folder = folder.is_dir() and (folder / "train").is_dir()
        if cache_folder and not (folder / METADATA).is_file():
            raise FileNotFoundError(f"{folder / METADATA} is missing: {folder} is not a whole `sagsae cache` folder "
                                    f"(write it again, or give data.init_args.path the shards' folder)")
        self.metadata = json.loads((folder / METADATA).read_text()) if (folder / METADATA).is_file() else {}
        if val_path is None and cache_folder and (folder / "val").is_dir():
            val_path = str(folder / "val")
        self.val_shards = shard_files(val_path) if val_path else []
        if cache_folder:
            check_shards(folder, self.metadata, "train", shapes)
            if val_path == str(folder / "val"):
                check_shards(folder, self.metadata, "val", {shard: shard_shape(shard) for shard in self.val_shards})

    @property
    def d_model(self) -> int:
        return self._d_model

    def describe(self) -> dict:
        return {"activations": self.hparams.path, "d_model": self.d_model,
                **{k: self.metadata.get(k) for k in ("model", "hookpoint", "target_hookpoint", "layer", "dataset",
                                                     "context_length")}}

    def language_model_data(self) -> LMActivationDataModule:
        """The live datamodule that produced this cache (from metadata.json), for the LM's spliced loss on the
        cache's own held-out documents; built on first use. Caches written before `lm_data` was recorded are
        rebuilt from the model, hookpoint, layer, dataset and context length they name."""
        if self.lm_data is None:
            if not self.metadata.get("model"):
                raise NotImplementedError(f"{self.hparams.path} records no language model: no spliced LM loss")
            keys = ("model", "hookpoint", "layer", "dataset", "context_length")
            arguments = self.metadata.get("lm_data") or {k: self.metadata[k] for k in keys if k in self.metadata}
            self.lm_data = LMActivationDataModule(**arguments)
            self.lm_data.trainer = self.trainer
            self.lm_data.setup()
        return self.lm_data

    def spliced_cross_entropy(self, reconstruct, contexts: int = 16) -> dict[str, float]:
        """The spliced LM loss of `LMActivationDataModule`, on the LM and held-out documents of this cache; the
        clean and zeroed CE are kept in the cache folder, so that every later run on it skips those LM passes."""
        return self.language_model_data().spliced_cross_entropy(reconstruct, contexts, self.hparams.held_out,
                                                                baselines=Path(self.hparams.path) / BASELINES)

    def _my_shards(self) -> list[Path]:
        rank, world = rank_and_world(self.trainer)
        return self.shards[rank::world] if len(self.shards) >= world else self.shards

    def _row_count(self, shard: Path) -> int:
        """Rows of `shard` that this rank reads (a stride of them when there are fewer shards than ranks)."""
        rank, world = rank_and_world(self.trainer)
        rows = self._shard_rows[shard]
        return len(range(rank, rows, world)) if len(self.shards) < world else rows

    def rows(self, shard: Path) -> Tensor:
        """The rows of `shard` that this rank reads, as float32."""
        rank, world = rank_and_world(self.trainer)
        rows = load_file(str(shard))[KEY].float()
        return rows[rank::world] if len(self.shards) < world else rows

    def _windows(self, epoch: int) -> list[list[Path]]:
        """This epoch's shard order, cut into windows of about `shuffle_buffer_tokens` rows."""
        mine = self._my_shards()
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(self.hparams.seed + epoch))
        mean_rows = sum(self._row_count(s) for s in mine) / len(mine)
        size = max(1, math.ceil(self.hparams.shuffle_buffer_tokens / max(mean_rows, 1)))
        shuffled = [mine[i] for i in order.tolist()]
        return [shuffled[i : i + size] for i in range(0, len(shuffled), size)]

    def batches(self) -> Iterator[Tensor]:
        """A deterministic stream: window w of epoch e is permuted by a generator seeded from (seed, rank, e, w),
        and its last partial batch is dropped. So batch k can be reached without reading the batches before it,
        which is what exact resume needs (`batches_consumed` in the checkpoint)."""
        rank, _ = rank_and_world(self.trainer)
        batch = self.hparams.batch_size
        skip, self._resume_batches = self._resume_batches, 0
        for epoch in itertools.count():
            for index, window in enumerate(self._windows(epoch)):
                count = sum(self._row_count(s) for s in window) // batch
                if skip >= count:
                    skip -= count
                    continue
                rows = torch.cat([self.rows(s) for s in window])
                seed = (((self.hparams.seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_003 + index) % 2**63
                order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
                for start in range(skip * batch, count * batch, batch):
                    yield rows[order[start : start + batch]]
                skip = 0

    def state_dict(self) -> dict:
        return stream_position(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_batches = int(state_dict.get("batches_consumed", 0))

    def estimate_scales(self) -> list[float]:
        """The normalization scalar of the first `normalization_tokens` rows (one per side of pairs)."""
        return normalization_scales(leading_rows(self.shards, self.hparams.normalization_tokens))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IterableStream(self.batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        if not self.val_shards:
            if self.trainer is not None and self.trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
                raise ValueError(f"{self.hparams.path} has no held-out split (no val/ folder) to evaluate on: give "
                                 f"data.init_args.val_path, or cache with --val_tokens N")
            return DataLoader([], batch_size=None)  # a fit trains without validation
        rows = torch.cat([load_file(str(s))[KEY].float() for s in self.val_shards])
        rows = held_out_part(rows, self.hparams.held_out)[: self.hparams.val_tokens]
        return held_out_loader(rows, self.hparams.batch_size, self.trainer)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
