"""LightningDataModule that streams activations live from a hookpoint of a frozen causal LM."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from datamodules.activation_stream import NormGuard, shuffled_batches, stream_position, take_tokens
from datamodules.language_model import load_language_model, resolve_dtype
from datamodules.text import TextSource, pack_contexts, select_documents, tokenize_documents
from sagsae.hookpoints import ActivationReader, parse_hookpoint


class _GeneratorDataset(IterableDataset):
    def __init__(self, make_iterator: Callable[[], Iterator[Tensor]]) -> None:
        self.make_iterator = make_iterator

    def __iter__(self) -> Iterator[Tensor]:
        return self.make_iterator()


class LMActivationDataModule(L.LightningDataModule):
    """Yields [batch_size, d_model] activation batches (raw: the SAE applies its normalization scalar).

    Args:
        model: "embedded:smollm2-135m", any HF hub name, or a local folder.
        gguf_file: GGUF file inside `model` (embedded models set it themselves).
        hookpoint: resid_pre, resid_mid, resid_post, attn_out, mlp_out, or "blocks.L.hook_…".
        layer: block index; None = mid-depth ⌊n_layers/2⌋.
        dataset: "embedded:wiki-summaries" or a `datasets` name/path/builder (with data_files).
        context_length: tokens per context, BOS included (the BOS position is never trained on).
        lm_batch_size: contexts per LM forward.
        batch_size: tokens per SAE batch.
        shuffle_buffer_tokens: tokens mixed before batches are drawn.
        val_fraction: share of documents held out (whole documents) for validation and test.
        val_tokens: held-out tokens evaluated at each validation.
        norm_guard_multiple: drop tokens above this multiple of the running median norm; None = off.
        normalization_tokens: tokens used to estimate the normalization scalar (E‖x‖² = d).
        lm_dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.
        seed: document order and shuffle buffer.
    """

    def __init__(
        self,
        model: str = "embedded:smollm2-135m",
        gguf_file: str | None = None,
        hookpoint: str = "mlp_out",
        layer: int | None = None,
        dataset: str = "embedded:wiki-summaries",
        dataset_config: str | None = None,
        data_files: str | list[str] | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = False,
        context_length: int = 128,
        lm_batch_size: int = 32,
        batch_size: int = 4096,
        shuffle_buffer_tokens: int = 32_768,
        val_fraction: float = 0.02,
        val_tokens: int = 32_768,
        norm_guard_multiple: float | None = 10.0,
        normalization_tokens: int = 16_384,
        lm_dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        parse_hookpoint(hookpoint, layer)  # an unknown name fails here, before anything loads
        for name, value in [("context_length", context_length), ("lm_batch_size", lm_batch_size),
                            ("batch_size", batch_size), ("val_tokens", val_tokens),
                            ("normalization_tokens", normalization_tokens)]:
            if value <= 0:
                raise ValueError(f"data.{name} must be positive, got {value}")
        if context_length < 2:
            raise ValueError("data.context_length must be at least 2 (BOS plus one trained token)")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.source = TextSource(dataset, dataset_config, data_files, split, text_column, streaming)
        self.guard = NormGuard(norm_guard_multiple)
        self.reader: ActivationReader | None = None
        self._resume_batches = 0
        self._validation_batches: list[Tensor] | None = None
        self._spliced_contexts: Tensor | None = None

    # ----- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.reader is not None:
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        lm, self.tokenizer = load_language_model(hp.model, hp.gguf_file, resolve_dtype(hp.lm_dtype, device), device)
        self.reader = ActivationReader(lm, hp.hookpoint, hp.layer)
        self.device = device
        self.bos_id = self.tokenizer.bos_token_id
        if self.bos_id is None:
            self.bos_id = self.tokenizer.eos_token_id
        if self.bos_id is None:
            raise ValueError(f"The tokenizer of {hp.model!r} has neither a BOS nor an EOS token to start contexts")
        self.separator_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.bos_id
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids) | {self.bos_id, self.separator_id}))

    @property
    def d_model(self) -> int:
        if self.reader is None:
            raise RuntimeError("The datamodule is not set up yet: call setup() first")
        return self.reader.d_model

    def describe(self) -> dict:
        """What a run records about its activations."""
        return {"model": self.hparams.model, "hookpoint": self.reader.hookpoint, "layer": self.reader.layer,
                "d_model": self.d_model, "dataset": self.hparams.dataset,
                "context_length": self.hparams.context_length, "dropped_massive": self.guard.dropped_massive,
                "dropped_nonfinite": self.guard.dropped_nonfinite}

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    # ----- documents → contexts → activations ------------------------------------------------------
    def _documents(self, validation: bool, pass_index: int) -> Iterator:
        """This rank's training or validation documents; indexable sources are reshuffled every pass."""
        rank, world = self._rank_and_world()
        select = dict(validation=validation, val_fraction=self.hparams.val_fraction, rank=rank, world_size=world)
        if not self.source.indexable:
            yield from select_documents(self.source.documents(), **select)
            return
        indices = list(select_documents(range(len(self.source)), **select))
        if not indices:
            raise ValueError(f"Dataset {self.hparams.dataset!r} has no {'validation' if validation else 'training'} "
                             f"documents for rank {rank}: add documents or change data.val_fraction")
        if not validation:
            order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.hparams.seed + pass_index))
            indices = [indices[i] for i in order.tolist()]
        for index in indices:
            yield self.source.document(index)

    def _activation_chunks(self, validation: bool, passes: Iterator[int], guard: NormGuard) -> Iterator[Tensor]:
        """Guarded activations of the trainable positions, one chunk per LM forward.

        Each stream has its own guard, so the training stream's drops do not depend on when the normalization
        estimate or the validation set were computed (exact resume replays it from the start)."""
        hp = self.hparams
        for pass_index in passes:
            tokens = tokenize_documents(self._documents(validation, pass_index), self.tokenizer)
            contexts = pack_contexts(tokens, hp.context_length, self.bos_id, self.separator_id)
            produced = False
            while batch := list(itertools.islice(contexts, hp.lm_batch_size)):
                produced = True
                input_ids = torch.tensor(batch)
                trainable = self._trainable(input_ids)
                activations = self.reader(input_ids.to(self.device))
                yield guard(activations[trainable.to(self.device)].float())
            if not produced:
                raise ValueError(f"Dataset {hp.dataset!r} yields fewer than {hp.context_length} tokens "
                                 f"for {'validation' if validation else 'training'}; add text or shorten contexts")

    def _training_chunks(self, guard: NormGuard | None = None) -> Iterator[Tensor]:
        guard = NormGuard(self.hparams.norm_guard_multiple) if guard is None else guard
        return self._activation_chunks(validation=False, passes=itertools.count(), guard=guard)

    def _training_batches(self) -> Iterator[Tensor]:
        """The training stream from its start; after a resume, the batches already consumed are replayed
        (LM forwards without training) so that the run continues exactly where the checkpoint left it."""
        self.guard = NormGuard(self.hparams.norm_guard_multiple)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        batches = shuffled_batches(self._training_chunks(self.guard), self.hparams.batch_size,
                                   self.hparams.shuffle_buffer_tokens, generator)
        skip, self._resume_batches = self._resume_batches, 0
        if skip:
            rank_zero_info(f"Resuming the activation stream: replaying {skip} batches of LM forwards "
                           f"({skip * self.hparams.batch_size:,} tokens) to reach the checkpoint's position")
            for _ in itertools.islice(batches, skip):
                pass
        return batches

    def state_dict(self) -> dict:
        return stream_position(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_batches = int(state_dict.get("batches_consumed", 0))

    @torch.no_grad()
    def estimate_input_scale(self) -> float:
        """The scalar s with E‖s·x‖² = d over the first `normalization_tokens` training tokens (SPEC §5)."""
        # _training_chunks() brings a guard of its own: the training stream's stays untouched
        sample = take_tokens(self._training_chunks(), self.hparams.normalization_tokens)
        total, count = float(sample.double().pow(2).sum()), len(sample)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(stats)
            total, count = stats.tolist()
        return math.sqrt(self.d_model / (total / count))

    # ----- spliced LM loss (SPEC §6) ------------------------------------------------------------------
    def _trainable(self, input_ids: Tensor) -> Tensor:
        """Positions the SAE sees: not BOS (position 0), not special tokens."""
        trainable = ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
        trainable[:, 0] = False
        return trainable

    @torch.no_grad()
    def spliced_cross_entropy(self, reconstruct: Callable[[Tensor], Tensor], contexts: int = 16) -> dict[str, float]:
        """Next-token CE on held-out contexts: clean, with the hookpoint replaced by the SAE's reconstruction
        at the trained positions, and by zeros there; CE recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
        if self._spliced_contexts is None:
            tokens = tokenize_documents(self._documents(True, 0), self.tokenizer)
            packed = pack_contexts(tokens, self.hparams.context_length, self.bos_id, self.separator_id)
            self._spliced_contexts = torch.tensor(list(itertools.islice(packed, contexts)))
        input_ids = self._spliced_contexts.to(self.device)
        trainable = self._trainable(input_ids)
        targets = input_ids[:, 1:]
        scored = trainable[:, 1:]  # predict real tokens, not separators

        def cross_entropy(logits: Tensor) -> float:
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            return float(losses[scored].mean())

        def splice(make: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
            def replace(activations: Tensor) -> Tensor:
                replaced = activations.clone()
                replaced[trainable] = make(activations[trainable].float()).to(activations.dtype)
                return replaced
            return replace

        model = self.reader.model
        with torch.inference_mode():
            clean = cross_entropy(model(input_ids=input_ids, use_cache=False).logits)
        spliced = cross_entropy(self.reader.logits_with_replacement(input_ids, splice(reconstruct)))
        zero = cross_entropy(self.reader.logits_with_replacement(input_ids, splice(torch.zeros_like)))
        recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
        return {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero, "ce_recovered": recovered}

    # ----- dataloaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_GeneratorDataset(self._training_batches), batch_size=None)

    def _held_out_batches(self) -> list[Tensor]:
        """The first `val_tokens` held-out tokens, computed once and kept (the LM is the slow part)."""
        if self._validation_batches is None:
            _, world = self._rank_and_world()
            guard = NormGuard(self.hparams.norm_guard_multiple)
            held_out = take_tokens(self._activation_chunks(validation=True, passes=iter([0]), guard=guard),
                                   math.ceil(self.hparams.val_tokens / world))
            self._validation_batches = list(held_out.split(self.hparams.batch_size))
        return self._validation_batches

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._held_out_batches(), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
