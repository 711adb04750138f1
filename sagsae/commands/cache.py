"""`python -m sagsae cache`: run the LM once and write its activations as safetensors shards.

    python -m sagsae cache --config configs/default.yaml --out cache/smollm2_l15_mlp_out --train_tokens 1000000
    python -m sagsae cache --config configs/default.yaml --data.init_args.hookpoint attn_out --out …

Train activations come from one pass over the training documents (never repeated: a corpus shorter than
--train_tokens gives fewer, and metadata.json says how many); validation ones from the held-out documents.
Activations are stored raw (unnormalized); metadata.json records the normalization scalar they imply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datamodules.activation_cache import write_cache
from datamodules.language_model import DTYPES
from datamodules.lm_activations import LMActivationDataModule


def datamodule_from_configs(training_args: list[str]) -> LMActivationDataModule:
    """The datamodule that `fit` builds from the same `--config` files and dotted overrides: the training CLI's
    own parser reads them, so one config serves every command."""
    from callbacks import hide_logger_advertisements
    from sagsae.commands.train import SAGSAECLI

    hide_logger_advertisements()
    datamodule = SAGSAECLI(args=training_args, run=False).datamodule
    if not isinstance(datamodule, LMActivationDataModule):
        raise ValueError(f"`cache` runs a language model: the config's data must be an LMActivationDataModule, "
                         f"not {type(datamodule).__name__}")
    return datamodule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagsae cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="a training config, or a shipped config's name (repeatable); any of fit's dotted "
                             "overrides (--data.init_args.hookpoint attn_out, …) may follow")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train_tokens", type=int, default=1_000_000)
    parser.add_argument("--val_tokens", type=int, default=32_768)
    parser.add_argument("--shard_tokens", type=int, default=262_144)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto",
                        help="where the LM runs: auto (cuda when available, else cpu), cpu, cuda, cuda:1, …")
    args, overrides = parser.parse_known_args(argv)
    for name in ("train_tokens", "val_tokens", "shard_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    try:
        datamodule = datamodule_from_configs([arg for config in args.config for arg in ("--config", config)] + overrides)
        metadata = write_cache(datamodule, args.out, args.train_tokens,
                               args.val_tokens, args.shard_tokens, args.dtype, device)
    except FileExistsError as error:  # raised before the LM loads
        parser.error(f"--out {error}")
    print(f"Cached {metadata['train_tokens']:,} train and {metadata['val_tokens']:,} validation tokens of "
          f"{metadata['model']} {metadata['hookpoint']} (layer {metadata['layer']}) in {args.out}")
    if metadata["train_tokens"] < args.train_tokens:
        print(f"The training documents hold only {metadata['train_tokens']:,} tokens (one pass, never repeated).")
    print(f"Train from it with: --data datamodules.ActivationFileDataModule --data.init_args.path {args.out}")
