"""LightningDataModule that streams activations live from a hookpoint of a frozen causal LM."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.activation_stream import (IterableStream, NormGuard, ShuffledStream, gather_objects,
                                           held_out_loader, held_out_part, rank_and_world, stream_position,
                                           sum_over_processes, take_tokens)
from datamodules.hooked_lm import HookedLanguageModel
from datamodules.language_model import prefetch_model
from datamodules.hookpoints import parse_hookpoint
from datamodules.lm_evaluation import LMLossEvaluator
from datamodules.text import Document, TextSource, rank_documents
from sagsae.measures import normalization_scale


class LMActivationDataModule(L.LightningDataModule):
    """Yields [batch_size, d_model] activation batches (raw: the SAE applies its normalization scalar), or with
    `target_hookpoint` [batch_size, 2, d_model] (source, target) pairs from one forward, which train a transcoder,
    or with `more_hookpoints` [batch_size, K, d_model], K sites from one forward (a sweep trains each on its own).

    Args:
        model: "embedded:smollm2-135m", any HF hub name, or a local folder.
        gguf_file: GGUF file inside `model` (embedded models set it themselves).
        hookpoint: resid_pre, resid_mid, resid_post, attn_out, mlp_in, mlp_out, or "blocks.L.hook_…".
        target_hookpoint: a second hookpoint of the same layer that a transcoder decodes (e.g. mlp_out, with
            hookpoint mlp_in: the MLP's normalized input and its output); None = an autoencoder's data.
        layer: block index; None = mid-depth ⌊n_layers/2⌋.
        more_hookpoints: further [hookpoint, layer] sites read in the same forward, after this one (a sweep's
            `one_forward` cells). A token's K activations are kept or dropped together, judged by their norm
            together, as a transcoder's pair is; with the guard off, site k's batches equal those of a datamodule
            on that site alone.
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
        target_hookpoint: str | None = None,
        layer: int | None = None,
        more_hookpoints: list[tuple[str, int | None]] | None = None,
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
        for name in (hookpoint, target_hookpoint):  # an unknown name fails here, before anything loads
            if name is not None:
                parse_hookpoint(name, layer)
        if more_hookpoints is not None:
            if target_hookpoint is not None:
                raise ValueError("data.more_hookpoints reads several sites for autoencoders: drop "
                                 "data.target_hookpoint (a transcoder's pair is one site)")
            for site in more_hookpoints:
                if not (isinstance(site, (list, tuple)) and len(site) == 2):
                    raise ValueError(f"data.more_hookpoints takes [hookpoint, layer] pairs, got {site!r}")
                parse_hookpoint(site[0], site[1])
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
        self.lm: HookedLanguageModel | None = None
        self.stream: ShuffledStream | None = None
        self.resume_state: dict | None = None  # where this rank's stream resumes (ShuffledStream.state)
        self.resume_batches = 0  # batches to replay instead, for a checkpoint without that state
        self.validation_rows: Tensor | None = None
        self.evaluators: dict[tuple[int, str, int], LMLossEvaluator] = {}  # by held-out contexts, part and site

    # ----- set-up ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Downloads, once per machine before any rank's `setup`: the dataset (TextSource.prepare) and a hub
        model's files, so that ranks do not fetch them side by side."""
        self.source.prepare()
        prefetch_model(self.hparams.model, self.hparams.gguf_file)

    def setup(self, stage: str | None = None) -> None:
        if self.lm is None:
            self.load_language_model(self.trainer.strategy.root_device if self.trainer is not None
                                     else torch.device("cpu"))

    def load_language_model(self, device: torch.device) -> None:
        """Load the LM on `device`; outside a Trainer (`sagsae cache`) this is how it reaches a GPU."""
        hp = self.hparams
        self.lm = HookedLanguageModel(hp.model, hp.gguf_file, hp.hookpoint, hp.layer, hp.lm_dtype, device,
                                      hp.context_length, hp.target_hookpoint)
        self.site_readers = None if hp.more_hookpoints is None else \
            [self.lm.reader, *self.lm.readers([tuple(site) for site in hp.more_hookpoints])]

    @property
    def d_model(self) -> int:
        if self.lm is None:
            raise RuntimeError("The datamodule is not set up yet: call setup() first")
        return self.lm.d_model

    @property
    def pairs(self) -> bool:
        """Whether batches are (source, target) pairs [B, 2, d] for a transcoder."""
        return self.hparams.target_hookpoint is not None

    @property
    def sites(self) -> int | None:
        """How many hookpoints each batch stacks [B, K, d] (`more_hookpoints`); None for one (or a pair)."""
        more = self.hparams.more_hookpoints
        return None if more is None else 1 + len(more)

    def read(self, input_ids: Tensor) -> Tensor:
        """The activations that a batch holds, at the trainable positions of `input_ids`."""
        if self.site_readers is None:
            return self.lm.activations(input_ids)
        return self.lm.activations_at(self.site_readers, input_ids)

    def describe(self) -> dict:
        """What a run records about its activations."""
        return {"model": self.hparams.model, "hookpoint": self.lm.hookpoint,
                "target_hookpoint": self.lm.target_hookpoint, "layer": self.lm.layer,
                **({} if self.site_readers is None else
                   {"more_hookpoints": [[r.hookpoint, r.layer] for r in self.site_readers[1:]]}),
                "d_model": self.d_model, "dataset": self.hparams.dataset,
                "context_length": self.hparams.context_length, "dropped_massive": self.guard.dropped_massive,
                "dropped_nonfinite": self.guard.dropped_nonfinite}

    # ----- documents → contexts → activations ------------------------------------------------------
    def documents(self, validation: bool, pass_index: int = 0, every_rank: bool = False,
                  start: int = 0) -> Iterator[Document]:
        """This rank's training or validation documents (all ranks' with `every_rank`), from the `start`-th on;
        indexable sources are reshuffled every pass."""
        rank, world = (0, 1) if every_rank else rank_and_world(self.trainer)
        return rank_documents(self.source, validation=validation, val_fraction=self.hparams.val_fraction,
                              seed=self.hparams.seed, pass_index=pass_index, rank=rank, world_size=world, start=start)

    def positioned_chunks(self, validation: bool, passes: Iterable[int], guard: NormGuard, every_rank: bool = False,
                          position: dict | None = None,
                          read: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[Tensor, dict]]:
        """Guarded activations of the trainable positions, one chunk per LM forward, over the given passes (of
        this rank's documents, or all ranks' with `every_rank`), each with the position right after it: the pass,
        the documents of that pass taken, the tokens carried into the next context and the guard's state.
        Started from such a `position` (in the first of `passes`), the stream continues exactly as it would have.
        `read` maps a batch of contexts to what the guard judges (default: this datamodule's sites, `read`).

        Each stream has its own guard, so the training stream's drops do not depend on when the normalization
        estimate or the validation set were computed."""
        hp = self.hparams
        read = self.read if read is None else read
        if position is not None:
            guard.load_state_dict(position["guard"])
        for pass_index in passes:
            start = position["documents"] if position is not None else 0
            carry = position["carry"] if position is not None else None
            resumed, position = start > 0 or bool(carry), None
            contexts = self.lm.positioned_contexts(self.documents(validation, pass_index, every_rank, start), carry)
            produced = False
            while batch := list(itertools.islice(contexts, hp.lm_batch_size)):
                produced = True
                chunk = guard(read(torch.tensor([context for context, _, _ in batch])))
                _, taken, carried = batch[-1]
                yield chunk, {"pass": pass_index, "documents": start + taken, "carry": carried,
                              "guard": guard.state_dict()}
            if not produced and not resumed:
                raise ValueError(f"Dataset {hp.dataset!r} yields fewer than {hp.context_length} tokens "
                                 f"for {'validation' if validation else 'training'}; add text or shorten contexts")

    def activation_chunks(self, validation: bool, passes: Iterable[int], guard: NormGuard,
                          every_rank: bool = False, read: Callable[[Tensor], Tensor] | None = None) -> Iterator[Tensor]:
        """positioned_chunks without the positions."""
        return (chunk for chunk, _ in self.positioned_chunks(validation, passes, guard, every_rank, read=read))

    def training_chunks(self, guard: NormGuard | None = None) -> Iterator[Tensor]:
        """The training activations pass after pass, in LM-forward chunks (a fresh guard unless one is given)."""
        guard = NormGuard(self.hparams.norm_guard_multiple) if guard is None else guard
        return self.activation_chunks(validation=False, passes=itertools.count(), guard=guard)

    def training_source(self, position: dict | None) -> Iterator[tuple[Tensor, dict]]:
        """The training stream's chunks from `position` (None: the start), with the stream's own guard."""
        first_pass = 0 if position is None else position["pass"]
        return self.positioned_chunks(validation=False, passes=itertools.count(first_pass), guard=self.guard,
                                      position=position)

    def training_batches(self) -> Iterator[Tensor]:
        """The training stream from its start or, after a resume, from the checkpoint's shuffle-buffer fill
        (ShuffledStream): O(buffer) LM forwards, the same batches as a run that never stopped. A checkpoint
        without that state (or from another number of ranks) replays the batches consumed instead."""
        self.guard = NormGuard(self.hparams.norm_guard_multiple)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.stream = ShuffledStream(self.training_source, self.hparams.batch_size,
                                     self.hparams.shuffle_buffer_tokens, generator, resume=self.resume_state)
        batches = iter(self.stream)
        skip, self.resume_batches, self.resume_state = self.resume_batches, 0, None
        if skip:
            rank_zero_info(f"Resuming the activation stream: replaying {skip} batches of LM forwards "
                           f"({skip * self.hparams.batch_size:,} tokens) to reach the checkpoint's position")
            for _ in itertools.islice(batches, skip):
                pass
        return batches

    def held_out_tokens(self, count: int) -> Tensor:
        """The first `count` held-out activations (whole held-out documents, own guard): the same tokens
        whatever the number of ranks, so that a DDP validation reports what one process would."""
        guard = NormGuard(self.hparams.norm_guard_multiple)
        return take_tokens(self.activation_chunks(validation=True, passes=[0], guard=guard, every_rank=True), count)

    def held_out_rows(self) -> Tensor:
        """The first `val_tokens` held-out tokens, computed once and kept (the LM is the slow part); each rank
        validates on its stride of them."""
        if self.validation_rows is None:
            self.validation_rows = self.held_out_tokens(self.hparams.val_tokens)
        return self.validation_rows

    def state_dict(self) -> dict:
        """The batches consumed and every rank's stream state at that point (gathered: Lightning saves rank 0's
        checkpoint only), so that each rank resumes where it stood."""
        state = stream_position(self.trainer)
        if self.stream is not None:
            state["ranks"] = gather_objects(self.stream.state(state["batches_consumed"]))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        consumed, ranks = int(state_dict.get("batches_consumed", 0)), state_dict.get("ranks")
        rank, world = rank_and_world(self.trainer)
        if ranks is not None and len(ranks) == world:
            self.resume_state, self.resume_batches = ranks[rank], 0
        else:
            self.resume_state, self.resume_batches = None, consumed

    @torch.no_grad()
    def estimate_scales(self) -> list[float]:
        """The scalar s with E‖s·x‖² = d over the first `normalization_tokens` training tokens (docs/method.md), over
        every rank; one per side of (source, target) pairs."""
        sample = take_tokens(self.training_chunks(), self.hparams.normalization_tokens)  # its own guard
        sums = sample.double().pow(2).sum(-1).sum(0).reshape(-1).tolist()
        *sums, count = sum_over_processes([*sums, float(len(sample))], self.lm.device)
        return [normalization_scale(total, int(count), self.d_model) for total in sums]

    def spliced_cross_entropy(self, reconstruct: Callable[[Tensor], Tensor], contexts: int = 16,
                              part: str = "all", site: int = 0, baselines: Path | None = None) -> dict[str, float]:
        """Spliced LM loss (lm_evaluation) on the first `contexts` held-out contexts of `part` (all, or the
        selection or verdict half, activation_stream.held_out_part), the same ones every time (their clean and
        zeroed losses computed once, or read from `baselines`), with the reconstruction written at `site` (of
        `more_hookpoints`)."""
        if site and (self.site_readers is None or site >= len(self.site_readers)):
            raise ValueError(f"No site {site}: this datamodule reads {self.sites or 1} hookpoint(s)")
        if (contexts, part, site) not in self.evaluators:
            packed = list(self.lm.contexts(self.documents(validation=True, every_rank=True)))  # tokenization: cheap
            chosen = held_out_part(packed, part)[:contexts]
            if len(chosen) < contexts:
                rank_zero_warn(f"The {part} held-out documents hold {len(chosen)} contexts, fewer than the {contexts} "
                               f"asked for the LM loss: raise data.val_fraction for more")
            writer = None if not site else self.site_readers[site]
            self.evaluators[contexts, part, site] = LMLossEvaluator(self.lm, torch.tensor(chosen), writer,
                                                                    baselines=baselines)
        return self.evaluators[contexts, part, site].evaluate(reconstruct)

    # ----- dataloaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(IterableStream(self.training_batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return held_out_loader(self.held_out_rows(), self.hparams.batch_size, self.trainer)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
