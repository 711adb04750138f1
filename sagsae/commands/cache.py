"""`python -m sagsae cache`: run the LM once and write its activations as safetensors shards.

    python -m sagsae cache --config configs/default.yaml --out cache/smollm2_l15_mlp_out --train_tokens 1000000
    python -m sagsae cache --config configs/default.yaml --data.init_args.hookpoint attn_out --out …
    python -m sagsae cache --config configs/default.yaml --hookpoints mlp_out attn_out resid_mid \
        --out 'cache/smollm2_l{layer}_{hookpoint}'

Several hookpoints (and layers) come from one LM forward per batch of contexts, which stops at the deepest of
them, into one folder each: --out then names a pattern with {hookpoint} (and {layer} for several layers). Each
folder holds what a cache of its hookpoint alone holds.

Train activations come from one pass over the training documents (never repeated: a corpus shorter than
--train_tokens gives fewer, and metadata.json says how many); validation ones from the held-out documents.
Activations are stored raw (unnormalized); metadata.json records the normalization scalar they imply.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from datamodules.hookpoints import UnknownHookpointError, parse_hookpoint
from datamodules.language_model import DTYPES

if TYPE_CHECKING:  # Lightning loads once the arguments pass, so that `--help` and their refusals come at once
    from datamodules.lm_activations import LMActivationDataModule


def datamodule_from_configs(training_args: list[str]) -> LMActivationDataModule:
    """The datamodule that `fit` builds from the same `--config` files and dotted overrides: the training CLI's
    own parser reads them, so one config serves every command."""
    from callbacks import hide_logger_advertisements
    from datamodules.lm_activations import LMActivationDataModule
    from sagsae.commands.train import SAGSAECLI

    hide_logger_advertisements()
    with warnings.catch_warnings():  # our args are the command line's training half, not a mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
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
    parser.add_argument("--out", required=True,
                        help="the cache folder; with several hookpoints or layers a pattern holding {hookpoint} "
                             "(and {layer}), e.g. 'cache/smollm2_l{layer}_{hookpoint}'")
    parser.add_argument("--hookpoints", nargs="+",
                        help="cache these hookpoints from one forward (default: the config's data.init_args.hookpoint)")
    parser.add_argument("--layers", nargs="+", type=int,
                        help="at these layers (default: the config's data.init_args.layer); every hookpoint at each")
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
    from datamodules.activation_cache import write_caches

    try:
        datamodule = datamodule_from_configs([arg for config in args.config for arg in ("--config", config)] + overrides)
        hookpoints = requested_hookpoints(args.hookpoints, args.layers, datamodule)
        outs = output_folders(args.out, hookpoints)
        records = write_caches(datamodule, outs, hookpoints, args.train_tokens, args.val_tokens,
                               args.shard_tokens, args.dtype, device)
    except FileExistsError as error:  # raised before the LM loads
        parser.error(f"--out {error}")
    except (UnknownHookpointError, ValueError) as error:
        parser.error(str(error))
    for out, metadata in zip(outs, records):
        print(f"Cached {metadata['train_tokens']:,} train and {metadata['val_tokens']:,} validation tokens of "
              f"{metadata['model']} {metadata['hookpoint']} (layer {metadata['layer']}) in {out}")
    if records[0]["train_tokens"] < args.train_tokens:
        print(f"The training documents hold only {records[0]['train_tokens']:,} tokens (one pass, never repeated).")
    print(f"Train from it with: --data datamodules.ActivationFileDataModule --data.init_args.path {outs[0]}")


def requested_hookpoints(hookpoints: list[str] | None, layers: list[int] | None,
                         datamodule: LMActivationDataModule) -> list[tuple[str, int | None]] | None:
    """The (hookpoint, layer) pairs that --hookpoints and --layers ask for, in order; None for neither (the
    config's own hookpoint, or transcoder pair). A TransformerLens name carries its own layer."""
    if hookpoints is None and layers is None:
        return None
    names = hookpoints or [datamodule.hparams.hookpoint]
    pairs = []
    for name in names:
        hookpoint, named_layer = parse_hookpoint(name, None)
        for layer in ([named_layer] if named_layer is not None else layers or [datamodule.hparams.layer]):
            pairs.append((hookpoint, layer))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"--hookpoints and --layers name a hookpoint twice: {pairs}")
    return pairs


def output_folders(pattern: str, hookpoints: list[tuple[str, int | None]] | None) -> list[Path]:
    """One folder per (hookpoint, layer), from --out's {hookpoint} and {layer}; a plain --out serves one."""
    if hookpoints is None or len(hookpoints) == 1 and "{" not in pattern:
        return [Path(pattern)]
    try:
        outs = [Path(pattern.format(hookpoint=hookpoint, layer=layer)) for hookpoint, layer in hookpoints]
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"--out {pattern!r} may hold only {{hookpoint}} and {{layer}}: {error}") from None
    if len(set(outs)) != len(outs):
        raise ValueError(f"--out {pattern!r} gives several hookpoints one folder: put {{hookpoint}} in it, and "
                         f"{{layer}} for several layers")
    return outs
