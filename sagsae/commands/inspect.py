"""`python -m sagsae inspect --ckpt_path CKPT --out FOLDER`: what each latent of a trained SAE responds to, as a
static feature browser that opens offline (FOLDER/index.html).

One streaming pass over `--tokens` tokens of text through the LM the SAE was trained on (read from the checkpoint
or the exported folder; any model, dataset and hookpoint can be given instead) keeps, for every latent, its
firing density, its share of negative firings, a histogram of its codes, and its top contexts for each sign
apart, with a few random firings beside them; its decoder direction read through the LM's unembedding gives the
tokens it promotes and suppresses. Memory grows with latents × examples kept, not with the tokens scanned.

    python -m sagsae inspect --ckpt_path runs/default/lightning_logs/version_0/checkpoints/last.ckpt --out runs/browser
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from sagsae.analysis.browser import latent_records, write_browser
from sagsae.analysis.inspection import LatentStatistics, logit_effects
from sagsae.saes import SparseAutoencoder
from sagsae.formats.serialization import CONFIG, load, read_checkpoint, sae_from_checkpoint


def trained_sae(ckpt_path: str | None, sae_folder: str | None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE and what it was trained on ({model, hookpoint, target_hookpoint, layer, dataset, context_length};
    None where the source does not record it). A transcoder's hookpoint is its source, which inspect reads."""
    if ckpt_path:
        state = read_checkpoint(ckpt_path)
        return sae_from_checkpoint(state), dict(state.get("activations") or {})
    sae = load(sae_folder)
    metadata = json.loads((Path(sae_folder) / CONFIG).read_text()).get("metadata") or {}
    return sae, {"model": metadata.get("model_name"), "hookpoint": metadata.get("hook_name"),
                 "target_hookpoint": metadata.get("hook_name_out"), "layer": metadata.get("hook_layer"), "dataset": metadata.get("dataset_path"),
                 "context_length": metadata.get("context_size")}


def inspect_sae(sae: SparseAutoencoder, lm, documents, tokens: int, stats: LatentStatistics,
                lm_batch_size: int, progress=print) -> dict[str, float]:
    """Run the pass: contexts of `documents` through `lm` (a HookedLanguageModel) and `sae` into `stats`, until
    `tokens` counted tokens. Returns the seconds spent in the LM and in everything else."""
    contexts = lm.contexts(documents)
    seconds = {"lm": 0.0, "total": 0.0}
    start, next_report = time.perf_counter(), tokens / 10
    sae_device = next(sae.parameters()).device
    while stats.tokens_counted < tokens and (batch := list(itertools.islice(contexts, lm_batch_size))):
        input_ids = torch.tensor(batch)
        lm_start = time.perf_counter()
        activations = lm.context_activations(input_ids)
        seconds["lm"] += time.perf_counter() - lm_start
        with torch.no_grad():
            codes = sae.encode(sae.normalize(activations.to(sae_device))).cpu()
        stats.update(input_ids, codes, lm.trainable_positions(input_ids).cpu())
        if stats.tokens_counted >= next_report:
            elapsed = time.perf_counter() - start
            progress(f"inspect: {stats.tokens_counted:,} of {tokens:,} tokens, {elapsed:.0f} s "
                     f"({stats.tokens_counted / elapsed:,.0f} tokens/s)")
            while next_report <= stats.tokens_counted:
                next_report += tokens / 10
    if stats.tokens_counted == 0:
        raise ValueError("The dataset gave no tokens to inspect: check --dataset (and --context_length)")
    seconds["total"] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagsae inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="a training checkpoint, e.g. .../checkpoints/last.ckpt")
    source.add_argument("--sae", help="a folder written by `sagsae export` (or a SAELens folder)")
    parser.add_argument("--out", required=True, help="the browser folder to create")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens to scan (default 100,000)")
    data = parser.add_argument_group("data (default: what the SAE was trained on)")
    data.add_argument("--model", help="embedded:smollm2-135m, an HF hub name or a local folder")
    data.add_argument("--gguf_file", help="GGUF file inside --model")
    data.add_argument("--hookpoint", help="e.g. mlp_out or blocks.15.hook_mlp_out")
    data.add_argument("--layer", type=int)
    data.add_argument("--dataset", help="embedded:wiki-summaries or a `datasets` name, folder or builder")
    data.add_argument("--dataset_config")
    data.add_argument("--data_files", nargs="+")
    data.add_argument("--split", default="train")
    data.add_argument("--text_column", default="text")
    data.add_argument("--context_length", type=int)
    data.add_argument("--lm_batch_size", type=int, default=16, help="contexts per LM forward")
    data.add_argument("--lm_dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    data.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    shown = parser.add_argument_group("what the browser keeps")
    shown.add_argument("--top_k", type=int, default=10, help="top contexts per latent and sign")
    shown.add_argument("--random_k", type=int, default=5, help="random firing contexts per latent")
    shown.add_argument("--before", type=int, default=12, help="tokens shown before the firing token")
    shown.add_argument("--after", type=int, default=4, help="tokens shown after it")
    shown.add_argument("--logit_k", type=int, default=10, help="promoted and suppressed tokens per latent")
    shown.add_argument("--seed", type=int, default=0, help="the random firings' sample")
    args = parser.parse_args(argv)
    for name in ("tokens", "top_k", "random_k", "lm_batch_size", "logit_k"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("before", "after"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be at least 0, got {getattr(args, name)}")
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out} already exists: choose a new folder or remove it first")

    sae, trained_on = trained_sae(args.ckpt_path, args.sae)
    settings = {key: getattr(args, key) if getattr(args, key) is not None else trained_on.get(key)
                for key in ("model", "hookpoint", "layer", "dataset", "context_length")}
    missing = [key for key in ("model", "hookpoint") if settings[key] is None]
    if missing:
        raise ValueError(f"the SAE does not record its {' and '.join(missing)}: give --{' and --'.join(missing)}")
    settings["dataset"] = settings["dataset"] or "embedded:wiki-summaries"
    settings["context_length"] = settings["context_length"] or 128

    from datamodules.hooked_lm import HookedLanguageModel
    from datamodules.text import TextSource

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    lm = HookedLanguageModel(settings["model"], args.gguf_file, settings["hookpoint"], settings["layer"],
                             args.lm_dtype, device, settings["context_length"])
    if lm.d_model != sae.d_in:
        raise ValueError(f"The SAE reads {sae.d_in}-wide activations but {settings['model']} {lm.hookpoint} "
                         f"(layer {lm.layer}) is {lm.d_model} wide: give the --model, --hookpoint and --layer it "
                         f"was trained on")
    sae.to(device).eval()
    text = TextSource(settings["dataset"], args.dataset_config, args.data_files, args.split, args.text_column,
                      streaming=False)
    stats = LatentStatistics(sae.width, args.top_k, args.random_k, args.before, args.after, args.seed)
    seconds = inspect_sae(sae, lm, text.documents(), args.tokens, stats, args.lm_batch_size)

    # the decoder's directions in the space it writes, raw units: a transcoder's target (an MLP's write to the
    # residual, which the logit lens reads as any residual direction)
    directions = (sae.W_dec.detach().T / sae.output_scale).to(device)
    logits = tuple(t.cpu() for t in logit_effects(directions, lm.reader.direct_logits, args.logit_k))
    token_text = token_decoder(lm.tokenizer)
    about = {"architecture": sae.architecture, "signed": sae.signed_codes, "model": settings["model"],
             "hookpoint": lm.hookpoint, "layer": lm.layer, "dataset": settings["dataset"],
             **({"target_hookpoint": trained_on.get("target_hookpoint")} if sae.is_transcoder else {}),
             **({"matryoshka_widths": list(sae.nesting.widths)} if sae.nesting is not None else {}),
             "tokens": stats.tokens_counted, "source": str(args.ckpt_path or args.sae),
             "seconds_lm": round(seconds["lm"], 1), "seconds_total": round(seconds["total"], 1)}
    folder = write_browser(args.out, latent_records(stats, token_text, logits), about)
    print(f"inspect: {stats.tokens_counted:,} tokens in {seconds['total']:.0f} s (LM forward {seconds['lm']:.0f} s, "
          f"{seconds['total'] / seconds['lm']:.2f}× it); browser in {folder}/index.html")


def token_decoder(tokenizer):
    """Token id → its text, each distinct id decoded once (tokenizers' own pieces show 'Ġ' for a space)."""
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return text
