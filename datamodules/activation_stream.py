"""From LM activations to training batches: the massive-activation guard and the shuffle buffer."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


class IterableStream(IterableDataset):
    """A dataset that is a fresh iterator from `make_iterator` each time a DataLoader starts reading it."""

    def __init__(self, make_iterator: Callable[[], Iterator[Tensor]]) -> None:
        self.make_iterator = make_iterator

    def __iter__(self) -> Iterator[Tensor]:
        return self.make_iterator()


HELD_OUT_PARTS = ("all", "selection", "verdict")


def held_out_part(items, part: str):
    """The held-out data (in document order) or one half of it: "selection" (the first half), on which a
    recipe may be chosen, and "verdict" (the second), which reports the comparison that the choice never saw."""
    if part not in HELD_OUT_PARTS:
        raise ValueError(f"held_out must be one of {', '.join(HELD_OUT_PARTS)}, got {part!r}")
    half = len(items) // 2
    return items if part == "all" else items[:half] if part == "selection" else items[half:]


def rank_and_world(trainer) -> tuple[int, int]:
    """(global rank, world size) of the trainer a datamodule is attached to; (0, 1) without one."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def process_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the processes of torch.distributed's default group, in float64 (as they are outside
    one): the sums and counts behind a mean that every rank must agree on."""
    if process_rank_and_world()[1] == 1:
        return values
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sums)
    return sums.tolist()


def gather_objects(value: Any) -> list[Any]:
    """Every process's `value`, in rank order ([value] outside torch.distributed)."""
    world = process_rank_and_world()[1]
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def held_out_loader(rows: Tensor, batch_size: int, trainer) -> DataLoader:
    """This rank's stride of the held-out `rows`, in batches. An iterable, not a list: Lightning gives a list
    loader a distributed sampler, which would split the rows across ranks a second time (and pad with repeats),
    so under DDP the ranks together would see neither all of the held-out tokens nor each once."""
    rank, world = rank_and_world(trainer)
    batches = list(rows[rank::world].split(batch_size))
    return DataLoader(IterableStream(lambda: iter(batches)), batch_size=None)


def stream_position(trainer) -> dict:
    """A training stream's checkpoint state: the batches the fit loop has taken from it (trained or skipped as
    non-finite), so a resumed run starts at the next one. Lightning fetches a batch ahead, so a count kept by
    the stream itself would be one too many."""
    consumed = trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer is not None else 0
    return {"batches_consumed": int(consumed)}


class NormGuard:
    """Drops tokens whose norm exceeds `multiple` × the running median norm, and non-finite tokens (docs/method.md).

    The median runs over the last `history` kept tokens; the very first chunk is judged against its own median.
    A transcoder's (source, target) pair [2, d] is one token, judged by the norm of both together.
    """

    def __init__(self, multiple: float | None, history: int = 65_536) -> None:
        if multiple is not None and multiple <= 1:
            raise ValueError(f"norm_guard_multiple must be > 1 (or null to switch the guard off), got {multiple}")
        self.multiple = multiple
        self.history = history
        self._norms = torch.empty(0)
        self.dropped_massive = 0
        self.dropped_nonfinite = 0

    def __call__(self, x: Tensor) -> Tensor:
        finite = torch.isfinite(x.flatten(1)).all(-1)
        self.dropped_nonfinite += int((~finite).sum())
        x = x[finite]
        if self.multiple is None or len(x) == 0:
            return x
        norms = x.flatten(1).norm(dim=-1).float().cpu()
        reference = self._norms if len(self._norms) else norms
        keep = norms <= self.multiple * reference.median()
        self.dropped_massive += int((~keep).sum())
        self._norms = torch.cat([self._norms, norms[keep]])[-self.history :]
        return x[keep.to(x.device)]

    def state_dict(self) -> dict[str, Any]:
        """The running norms and the drop counts (the norms tensor is replaced, never changed, on each call, so
        holding it costs nothing)."""
        return {"norms": self._norms, "dropped_massive": self.dropped_massive,
                "dropped_nonfinite": self.dropped_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._norms = state["norms"]
        self.dropped_massive, self.dropped_nonfinite = state["dropped_massive"], state["dropped_nonfinite"]


class GuardEach:
    """One NormGuard per hookpoint of [n, K, d] chunks (`HookedLanguageModel.activations_at`): each hookpoint is
    judged on its own, as a stream of it alone would be; returns K tensors."""

    def __init__(self, multiple: float | None, count: int) -> None:
        self.guards = [NormGuard(multiple) for _ in range(count)]

    def __call__(self, x: Tensor) -> list[Tensor]:
        return [guard(x[:, index]) for index, guard in enumerate(self.guards)]

    def state_dict(self) -> dict[str, Any]:
        return {"guards": [guard.state_dict() for guard in self.guards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for guard, saved in zip(self.guards, state["guards"]):
            guard.load_state_dict(saved)


def take_tokens(chunks: Iterable[Tensor], count: int) -> Tensor:
    """The first `count` rows of a stream of [n, …] chunks (fewer if it ends first); reads no further."""
    taken: list[Tensor] = []
    remaining = count
    for chunk in chunks:
        taken.append(chunk[:remaining])
        remaining -= len(taken[-1])
        if remaining <= 0:
            break
    return torch.cat(taken)


def shuffled_batches(
    chunks: Iterable[Tensor], batch_size: int, buffer_tokens: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """ShuffledStream over chunks that need no resume state."""
    return iter(ShuffledStream(lambda _: ((chunk, None) for chunk in chunks), batch_size, buffer_tokens, generator))


def narrowest_exact(values: Tensor) -> Tensor:
    """`values` in bf16 or fp16 where that holds them exactly (activations of an LM run in bf16, cast to fp32),
    else as they are: a checkpoint's half buffer at half the size, with nothing rounded."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = values.to(dtype)
        if torch.equal(narrow.to(values.dtype), values):
            return narrow
    return values


class ShuffledStream:
    """Mix tokens from many contexts: fill a buffer, shuffle it, emit batches until half of it is left.

    Each chunk is copied straight to its shuffled rows of the pool (no concatenated copy beside it), and the
    batches and the half left over are copies, not views, so that no batch a consumer still holds keeps the old
    pool alive through the next refill: about two buffers at the peak (pending chunks and the pool), where a
    concatenate-then-permute of views takes three and a half (benchmarks/memory.py).

    Resumable in O(buffer): `open_source(position)` yields (chunk, the position right after it), starting at
    `position` (None: the beginning). Where each fill began (the half buffer carried into it, the generator's
    state and the source's position) is remembered for the last two fills; `state(consumed)` gives the one that
    holds the batch after the `consumed`-th, and a stream built with `resume=` that state redoes that one fill and
    skips the batches already consumed: the same batches, bit for bit, as a stream that never stopped, without
    replaying what came before. (Two fills: the consumer may have fetched one batch ahead, into the next fill.)
    """

    def __init__(self, open_source: Callable[[Any], Iterator[tuple[Tensor, Any]]], batch_size: int,
                 buffer_tokens: int, generator: torch.Generator, resume: dict[str, Any] | None = None) -> None:
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"shuffle_buffer_tokens ({buffer_tokens}) must be at least 2 × batch_size ({batch_size})")
        self.open_source, self.batch_size, self.buffer_tokens = open_source, batch_size, buffer_tokens
        self.generator, self.resume = generator, resume
        self.fills: deque[dict[str, Any]] = deque(maxlen=2)

    def state(self, consumed: int) -> dict[str, Any]:
        """What resumes the stream after its first `consumed` batches (tensors on the CPU)."""
        fill = next((f for f in reversed(self.fills) if f["batches_before"] <= consumed), None)
        if fill is None:
            raise RuntimeError(f"The stream cannot resume after batch {consumed}: it no longer holds that fill")
        leftover = fill["leftover"]
        return {**fill, "leftover": None if leftover is None else narrowest_exact(leftover.cpu()),
                "skip": consumed - fill["batches_before"]}

    def __iter__(self) -> Iterator[Tensor]:
        start = self.resume or {"batches_before": 0, "leftover": None, "generator": self.generator.get_state(),
                                "position": None, "skip": 0}
        self.generator.set_state(start["generator"])
        skip = start["skip"]
        pending = [] if start["leftover"] is None else [start["leftover"]]
        filled = sum(len(piece) for piece in pending)
        self.fills.clear()
        self.fills.append({key: start[key] for key in ("batches_before", "leftover", "generator", "position")})
        batches = start["batches_before"]
        for chunk, position in self.open_source(start["position"]):
            if pending and (pending[0].device, pending[0].dtype) != (chunk.device, chunk.dtype):
                pending[0] = pending[0].to(chunk.device, chunk.dtype)  # a leftover restored from a checkpoint
            pending.append(chunk)
            filled += len(chunk)
            if filled < self.buffer_tokens:
                continue
            order = torch.randperm(filled, generator=self.generator)
            row_of = torch.empty_like(order)
            row_of[order] = torch.arange(filled)  # the pool row of every pending token: pool = concatenated[order]
            pool = chunk.new_empty((filled, *chunk.shape[1:]))
            offset = 0
            for piece in pending:
                pool.index_copy_(0, row_of[offset : offset + len(piece)].to(pool.device), piece)
                offset += len(piece)
            pending.clear()
            del piece, chunk  # no name may keep a pending chunk alive
            emitted = (filled - self.buffer_tokens // 2) // self.batch_size * self.batch_size
            leftover = pool[emitted:].clone()
            pending.append(leftover)
            filled = len(leftover)
            next_fill = {"batches_before": batches + emitted // self.batch_size, "leftover": leftover,
                         "generator": self.generator.get_state(), "position": position}
            for batch in pool[:emitted].split(self.batch_size):
                batches += 1
                if skip:
                    skip -= 1
                    continue
                yield batch.clone()  # a copy: no view that pins the pool
            del pool
            self.fills.append(next_fill)  # the consumer asked for more: the next fill begins
