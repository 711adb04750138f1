"""Documents in, packed BOS-first token contexts out.

Sources: the embedded Wikipedia summaries, or any `datasets` dataset (hub name, local folder, builder such as
"json"/"text"/"parquet" with data_files), streamed or not, with a text column or pre-tokenized `input_ids`.
The validation split holds out whole documents, chosen by a hash of their index (of their content for streamed
sources, which each rank reads from its own shards), so no article is split.
"""

from __future__ import annotations

import array
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from datamodules.embedded import embedded_corpus_file, is_embedded

Document = str | list[int]


@dataclass
class TextSource:
    dataset: str = "embedded:wiki-summaries"
    dataset_config: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    _rows: object = field(default=None, init=False, repr=False)

    def _load(self):
        if self._rows is not None:
            return self._rows
        if is_embedded(self.dataset):
            with open(embedded_corpus_file(self.dataset), encoding="utf-8") as handle:
                articles = json.load(handle)
            self._rows = [article["extract"] for article in articles.values() if article.get("extract")]
        else:
            self._rows = self._load_hf_dataset()
        return self._rows

    def _load_hf_dataset(self):
        import datasets

        try:
            rows = datasets.load_dataset(
                self.dataset, self.dataset_config, data_files=self.data_files, split=self.split,
                streaming=self.streaming,
            )
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"Could not load dataset {self.dataset!r} (config={self.dataset_config!r}, "
                f"data_files={self.data_files!r}, split={self.split!r}): {error}. Give a hub name, a local "
                f"folder, or a builder such as 'json' or 'text' with data_files."
            ) from error
        columns = rows.column_names or []
        if columns and self.text_column not in columns and "input_ids" not in columns:
            raise ValueError(
                f"Dataset {self.dataset!r} has no text column {self.text_column!r} and no 'input_ids' "
                f"column; its columns are {columns}. Set text_column to one of them."
            )
        return rows

    @property
    def indexable(self) -> bool:
        """Lists and non-streamed datasets can be read in any order (and so shuffled per pass)."""
        return isinstance(self._load(), list) or not self.streaming

    def __len__(self) -> int:
        return len(self._load())

    def _document(self, row) -> Document:
        if isinstance(row, str):
            return row
        if "input_ids" in row and self.text_column not in row:
            return list(row["input_ids"])
        return row[self.text_column]

    def document(self, index: int) -> Document:
        return self._document(self._load()[index])

    def documents(self, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        """Every document in order or, for a streamed dataset read by several ranks, this rank's share split at
        the source (`datasets.distributed.split_dataset_by_node`: whole shards per rank where their number
        divides evenly, so no rank downloads another's; otherwise every world_size-th document)."""
        rows = self._load()
        if world_size > 1:
            if self.indexable:
                raise ValueError("An indexable source is dealt to ranks by index (rank_documents), not split")
            from datasets.distributed import split_dataset_by_node

            rows = split_dataset_by_node(rows, rank=rank, world_size=world_size)
        for row in rows:
            yield self._document(row)

    def prepare(self) -> None:
        """Download and prepare a hub or builder dataset once (a DataModule's prepare_data: one process per
        machine), so that every rank's `setup` reads it from the cache; embedded and streamed sources need
        nothing."""
        if not is_embedded(self.dataset) and not self.streaming:
            self._load()


def is_validation_document(index: int, val_fraction: float) -> bool:
    """Stable, seed-independent choice of held-out documents."""
    return zlib.crc32(index.to_bytes(8, "little")) % 1_000_000 < val_fraction * 1_000_000


def is_validation_content(document: Document, val_fraction: float) -> bool:
    """The held-out choice for streamed sources, whose ranks read their own shards and so know no global index:
    a hash of the document's text or tokens (stable and seed-independent; a repeated document stays on one side)."""
    data = document.encode("utf-8") if isinstance(document, str) else array.array("q", document).tobytes()
    return zlib.crc32(data) % 1_000_000 < val_fraction * 1_000_000


def select_documents(
    documents: Iterable[Document], *, validation: bool, val_fraction: float, rank: int = 0, world_size: int = 1
) -> Iterator[Document]:
    """The train or validation documents of this rank (documents are dealt round-robin to ranks)."""
    position = 0
    for index, document in enumerate(documents):
        if is_validation_document(index, val_fraction) != validation:
            continue
        if position % world_size == rank:
            yield document
        position += 1


def pack_contexts(
    token_documents: Iterable[list[int]], context_length: int, bos_id: int, separator_id: int
) -> Iterator[list[int]]:
    """Concatenate documents (separated by `separator_id`) and cut contexts of `context_length` that each
    start with BOS: the first position carries the LM's attention-sink activation and is never trained on."""
    return (context for context, _, _ in packed_contexts(token_documents, context_length, bos_id, separator_id))


def packed_contexts(token_documents: Iterable[list[int]], context_length: int, bos_id: int, separator_id: int,
                    carry: list[int] | None = None) -> Iterator[tuple[list[int], int, list[int]]]:
    """pack_contexts, each context with where the packing stands after it: (context, documents taken so far,
    the tokens carried into the next context). Packing the documents after those taken, starting from that
    carry, gives the contexts that follow (resume without re-reading what came before)."""
    body = context_length - 1
    buffer: list[int] = list(carry or [])
    taken = 0

    def cut() -> Iterator[tuple[list[int], int, list[int]]]:
        while len(buffer) >= body:
            context = [bos_id, *buffer[:body]]
            del buffer[:body]
            yield context, taken, list(buffer)

    yield from cut()  # a carry may hold whole contexts of a long document
    for tokens in token_documents:
        buffer.extend(tokens)
        buffer.append(separator_id)
        taken += 1
        yield from cut()


def tokenize_documents(documents: Iterable[Document], tokenizer, chunk: int = 64) -> Iterator[list[int]]:
    """Token ids without special tokens; pre-tokenized documents pass through."""
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        if pending:
            yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
            pending.clear()

    for document in documents:
        if isinstance(document, str):
            pending.append(document)
            if len(pending) == chunk:
                yield from flush()
        else:
            yield from flush()
            yield list(document)
    yield from flush()


def rank_documents(source: TextSource, *, validation: bool, val_fraction: float, seed: int, pass_index: int,
                   rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[Document]:
    """This rank's training or validation documents for one pass, from its `start`-th on; indexable sources
    reshuffle the training documents every pass (seeded by seed + pass), streamed ones keep their order."""
    if not source.indexable:  # streamed: this rank's share is split at the source, held out by content
        mine = (document for document in source.documents(rank, world_size)
                if is_validation_content(document, val_fraction) == validation)
        yield from itertools.islice(mine, start, None)
        return
    select = dict(validation=validation, val_fraction=val_fraction, rank=rank, world_size=world_size)
    indices = list(select_documents(range(len(source)), **select))
    if not indices:
        raise ValueError(f"Dataset {source.dataset!r} has no {'validation' if validation else 'training'} "
                         f"documents for rank {rank}: add documents or change data.val_fraction")
    if not validation:
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + pass_index))
        indices = [indices[i] for i in order.tolist()]
    for index in indices[start:]:
        yield source.document(index)
