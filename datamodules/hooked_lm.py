"""A frozen causal LM read at one hookpoint: documents in, the activations an SAE trains on out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from datamodules.hookpoints import ActivationReader, read_hookpoints
from datamodules.language_model import load_language_model, resolve_dtype
from datamodules.text import Document, pack_contexts, packed_contexts, tokenize_documents


class HookedLanguageModel:
    """The LM, its tokenizer and one hookpoint, or two (a transcoder's source and target, at one layer). Contexts
    start with BOS and documents are joined by EOS (or BOS); the SAE trains on every position but BOS and special
    tokens (`trainable_positions`)."""

    def __init__(self, model: str, gguf_file: str | None, hookpoint: str, layer: int | None, lm_dtype: str,
                 device: torch.device, context_length: int, target_hookpoint: str | None = None) -> None:
        lm, self.tokenizer = load_language_model(model, gguf_file, resolve_dtype(lm_dtype, device), device,
                                                 context_length)
        self.reader = ActivationReader(lm, hookpoint, layer)
        self.target_reader = None if target_hookpoint is None else ActivationReader(lm, target_hookpoint,
                                                                                     self.reader.layer)
        self.device = device
        self.context_length = context_length
        self.bos_id = self.tokenizer.bos_token_id
        if self.bos_id is None:
            self.bos_id = self.tokenizer.eos_token_id
        if self.bos_id is None:
            raise ValueError(f"The tokenizer of {model!r} has neither a BOS nor an EOS token to start contexts")
        self.separator_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.bos_id
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids) | {self.bos_id, self.separator_id}))

    @property
    def d_model(self) -> int:
        return self.reader.d_model

    @property
    def hookpoint(self) -> str:
        return self.reader.hookpoint

    @property
    def target_hookpoint(self) -> str | None:
        return None if self.target_reader is None else self.target_reader.hookpoint

    @property
    def layer(self) -> int:
        return self.reader.layer

    def contexts(self, documents: Iterable[Document]) -> Iterator[list[int]]:
        """Token contexts of `context_length`, BOS first, documents packed end to end."""
        return pack_contexts(tokenize_documents(documents, self.tokenizer), self.context_length, self.bos_id,
                             self.separator_id)

    def positioned_contexts(self, documents: Iterable[Document],
                            carry: list[int] | None = None) -> Iterator[tuple[list[int], int, list[int]]]:
        """`contexts`, each with (documents taken so far, tokens carried into the next context), starting from
        `carry` (text.packed_contexts): what a stream that resumes without replay records."""
        return packed_contexts(tokenize_documents(documents, self.tokenizer), self.context_length, self.bos_id,
                               self.separator_id, carry)

    def trainable_positions(self, input_ids: Tensor) -> Tensor:
        """Positions the SAE sees: not BOS (position 0), not special tokens."""
        trainable = ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
        trainable[:, 0] = False
        return trainable

    def activations(self, input_ids: Tensor) -> Tensor:
        """The hookpoint's activations at the trainable positions of `input_ids` [n, d], or a transcoder's
        (source, target) pairs [n, 2, d]: one forward that stops at the deeper of the hookpoints."""
        if self.target_reader is None:
            return self.activations_at([self.reader], input_ids)[:, 0]
        return self.activations_at([self.reader, self.target_reader], input_ids)

    def readers(self, hookpoints: list[tuple[str, int | None]]) -> list[ActivationReader]:
        """Readers of other (hookpoint, layer) pairs of this LM (layer None: the mid-depth one), for
        `activations_at`; each name is checked against the model here."""
        return [ActivationReader(self.reader.model, hookpoint, layer) for hookpoint, layer in hookpoints]

    def activations_at(self, readers: list[ActivationReader], input_ids: Tensor) -> Tensor:
        """Several hookpoints' activations at the trainable positions [n, len(readers), d], from one forward that
        stops at the deepest of them."""
        input_ids = input_ids.to(self.device)
        values = torch.stack(read_hookpoints(self.reader.model, readers, input_ids), 2)
        return values[self.trainable_positions(input_ids)].float()

    def context_activations(self, input_ids: Tensor) -> Tensor:
        """The (source) hookpoint's activations at every position [contexts, length, d] (for showing whole
        contexts)."""
        return self.reader(input_ids.to(self.device)).float()

    def logits(self, input_ids: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.reader.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def logits_with_replacement(self, input_ids: Tensor, replace: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Logits with the written hookpoint's tensor replaced by `replace(read, written)` in the forward: for an
        autoencoder both are its hookpoint's tensor; for a transcoder `read` is the source and the target is
        written (everything else as the model computes it)."""
        if self.target_reader is None:
            return self.reader.logits_with_replacement(input_ids.to(self.device), replace)
        return self.target_reader.logits_with_replacement(input_ids.to(self.device), replace, source=self.reader)
