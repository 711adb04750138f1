"""Spliced LM loss (docs/results.md): next-token CE with the hookpoint replaced by an SAE's reconstruction."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from datamodules.activation_stream import process_rank_and_world, sum_over_processes
from datamodules.hooked_lm import HookedLanguageModel
from datamodules.hookpoints import ActivationReader

Reconstruct = Callable[[Tensor], Tensor]  # raw activations read → what is written at the hookpoint


class LMLossEvaluator:
    """Next-token CE on fixed held-out contexts: clean and with the trainable positions zeroed once, then with
    them replaced by each SAE's reconstruction. Only real next tokens are scored; contexts go through the LM
    `chunk` at a time (the LM's logits: chunk × length × vocabulary in its dtype), and are scored in fp32 one
    context at a time (length × vocabulary: 0.5 GB at 1,024 × 128k, where the whole chunk's would be 8 GB).

    Under DDP every rank is given the same contexts, scores its stride of them and sums over ranks: every rank
    gets the CE that one process gets (all ranks must call together)."""

    def __init__(self, lm: HookedLanguageModel, input_ids: Tensor, writer: ActivationReader | None = None,
                 chunk: int = 16, baselines: Path | None = None) -> None:
        """`writer`: the hookpoint replaced, when it is not the LM's own (a site of `more_hookpoints`).
        `baselines`: a JSON file that keeps the clean and zeroed CE of these contexts, so that later runs on one
        cache skip those two LM passes; used by a single process only."""
        self.lm, self.input_ids, self.writer, self.chunk = lm, input_ids, writer, chunk
        store = baselines if process_rank_and_world()[1] == 1 else None
        key = self.baselines_key() if store else None
        saved = read_baselines(store).get(key) if store else None
        if saved:
            self.clean, self.zero = saved["ce_clean"], saved["ce_zero"]
            return
        self.clean = self.cross_entropy(None)
        self.zero = self.cross_entropy(torch.zeros_like)
        if store:
            write_baselines(store, key, {"ce_clean": self.clean, "ce_zero": self.zero})

    def baselines_key(self) -> str:
        """What the clean and zeroed CE depend on: the contexts, the hookpoint zeroed, the LM's dtype and device,
        and the software and CPU that ran it (a new machine measures them again)."""
        digest = hashlib.sha256(self.input_ids.cpu().numpy().tobytes()).hexdigest()[:16]
        zeroed = self.writer or self.lm.target_reader or self.lm.reader
        dtype = next(zeroed.model.parameters()).dtype
        return (f"{digest} {tuple(self.input_ids.shape)} {zeroed.hookpoint} layer {zeroed.layer} {dtype} "
                f"{self.lm.device} torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}")

    @torch.no_grad()
    def cross_entropy(self, make: Reconstruct | None) -> float:
        """Mean CE over the scored positions, with the trainable activations replaced by `make(x)` (None: clean)."""
        rank, world = process_rank_and_world()
        total, count = 0.0, 0
        for input_ids in self.input_ids[rank::world].split(self.chunk):
            input_ids = input_ids.to(self.lm.device)
            trainable = self.lm.trainable_positions(input_ids)

            def replace(read: Tensor, written: Tensor) -> Tensor:
                replaced = written.clone()
                replaced[trainable] = make(read[trainable].float()).to(written.dtype)
                return replaced

            if make is None:
                logits = self.lm.logits(input_ids)
            elif self.writer is None:
                logits = self.lm.logits_with_replacement(input_ids, replace)
            else:
                logits = self.writer.logits_with_replacement(input_ids, replace)
            for row_logits, targets, scored in zip(logits[:, :-1], input_ids[:, 1:], trainable[:, 1:]):
                # one context's scored positions at a time in fp32: [length, vocabulary] at most, not the chunk's
                losses = torch.nn.functional.cross_entropy(row_logits[scored].float(), targets[scored], reduction="none")
                total, count = total + float(losses.sum()), count + len(losses)
        total, count = sum_over_processes([total, float(count)], self.lm.device)
        return total / count

    def evaluate(self, reconstruct: Reconstruct) -> dict[str, float]:
        """CE clean, spliced and zeroed; ΔCE = CE_sae − CE_clean (nats); CE recovered =
        (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
        spliced = self.cross_entropy(reconstruct)
        recovered = (self.zero - spliced) / (self.zero - self.clean) if self.zero != self.clean else float("nan")
        return {"ce_clean": self.clean, "ce_sae": spliced, "ce_zero": self.zero, "ce_delta": spliced - self.clean,
                "ce_recovered": recovered}


def read_baselines(path: Path) -> dict[str, dict[str, float]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_baselines(path: Path, key: str, values: dict[str, float]) -> None:
    """Adds one entry, written whole (a temporary file renamed over the old), so a reader never sees half a file."""
    entries = {**read_baselines(path), key: values}
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(entries, indent=1))
    temporary.replace(path)
