"""How much a cache read many times is learned by heart: each SAE's R² and L0 on training tokens against held-out ones.

    python -m benchmarks.token_reuse_gap --checkpoint runs/sweeps/<sweep>/<cell>/checkpoints/last.ckpt \\
        --cache cache/smollm2_l15_mlp_out_v10 [--held_out verdict --tokens 32768 --json out.json]

Reads every SAE of a sweep's checkpoint (or the one of a `fit` checkpoint) and scores it, at its saved weights, on
the cache's first `--tokens` training tokens and on its held-out tokens (`--held_out`: the sweeps' verdict half),
with the same formula: R² = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the window. The gap train − held-out R² is what
reading the same tokens again bought that new tokens would not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from datamodules.activation_files import ActivationFileDataModule, leading_rows
from lightning_modules.reconstruction_metrics import ReconstructionMetrics
from sagsae.formats.serialization import read_checkpoint, sae_from_checkpoint, sae_from_spec
from sagsae.saes import SparseAutoencoder


def trained_saes(checkpoint: Path) -> dict[str, SparseAutoencoder]:
    """name → SAE: a sweep's members, or a fit's one SAE (named "fit")."""
    state = read_checkpoint(checkpoint)
    if "sweep_members" not in state:
        return {"fit": sae_from_checkpoint(state)}
    return {name: sae_from_spec(spec, state["state_dict"], prefix=f"members.{name}.sae.")
            for name, spec in state["sweep_members"].items()}


@torch.no_grad()
def window_fit(sae: SparseAutoencoder, rows: Tensor, chunk: int = 4096) -> dict[str, float]:
    """R² and L0 of `sae` over `rows` (raw activations [n, d]), by the sweeps' own held-out window metric."""
    sae.eval()
    metric = ReconstructionMetrics(sae.d_in, sae.width)
    for x in rows.split(chunk):
        normalized = sae.normalize(x)
        codes = sae.encode(normalized)
        metric.update(normalized, sae.decode(codes), codes)
    values = metric.compute()
    return {"r2": float(values["r2"]), "l0": float(values["l0"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a sweep cell's or a fit's .ckpt")
    parser.add_argument("--cache", required=True, help="the `sagsae cache` folder it trained on")
    parser.add_argument("--held_out", default="verdict", help="all, selection or verdict (the sweeps' half)")
    parser.add_argument("--tokens", type=int, default=32_768, help="tokens in each window")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = ActivationFileDataModule(args.cache, held_out=args.held_out, val_tokens=args.tokens)
    if data.pairs:
        parser.error(f"--cache {args.cache} holds transcoder pairs; this compares autoencoders")
    windows = {"train": leading_rows(data.shards, args.tokens), "held_out": torch.cat(list(data.val_dataloader()))}
    rows = {}
    for name, sae in trained_saes(args.checkpoint).items():
        fits = {window: window_fit(sae, window_rows) for window, window_rows in windows.items()}
        rows[name] = {"train_r2": fits["train"]["r2"], "held_out_r2": fits["held_out"]["r2"],
                      "gap_r2": fits["train"]["r2"] - fits["held_out"]["r2"],
                      "train_l0": fits["train"]["l0"], "held_out_l0": fits["held_out"]["l0"]}
        row = rows[name]
        print(f"{name:>24}: R² train {row['train_r2']:.4f}, held-out {row['held_out_r2']:.4f}, gap "
              f"{row['gap_r2']:+.4f}; L0 train {row['train_l0']:.1f}, held-out {row['held_out_l0']:.1f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "cache": args.cache,
                                         "held_out": args.held_out, "tokens": {k: len(v) for k, v in windows.items()},
                                         "train_tokens_in_cache": data.metadata.get("train_tokens"),
                                         "members": rows}, indent=1))


if __name__ == "__main__":
    main()
