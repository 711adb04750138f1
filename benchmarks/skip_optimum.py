"""How far is a trained skip-transcoder's skip connection from its best linear map?

    python -m benchmarks.skip_optimum --cache cache/smollm2_l15_mlp_pairs_v10 \
        runs/sweeps/smollm2_l15_transcoder_s0a/mlp_in-mlp_out/checkpoints/last.ckpt [more sweep checkpoints]

A skip-transcoder decodes ŷ = W_dec f(x) + W_skip x + b_dec, and W_skip learns by Adam from the reconstruction
alone, starting at zero or at one batch's least-squares map (`skip_start`). Its best value given the codes is a
least-squares problem with a closed form, and so is the best purely linear map y ≈ W x + b (the ceiling of the
skip alone). This prints, on the cache's held-out verdict half, that map's R² and the R² of the least-squares
start at each ridge, then for each transcoder in the checkpoints: R² of the whole map, of the skip path alone
(W_skip x + b_dec), of the codes alone (W_dec f + b_dec), the R² after W_skip and b_dec are replaced by their
least-squares values with the codes kept (a skip at its optimum; a transcoder without a skip gets one here), and
the share of the codes' output that a linear map of x explains (a part the skip could carry without a sparsity
cost). The least squares use the first `--fit_tokens` training tokens, in float64 (docs/method.md,
"Transcoders").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from datamodules.activation_files import leading_rows, shard_files
from datamodules.activation_stream import held_out_part
from sagsae.measures import explained_variance
from sagsae.formats.serialization import sae_from_spec
from sagsae.saes import SparseAutoencoder
from sagsae.saes.base import ridge_least_squares

START_BATCH = 2048  # the transcoder sweep's batch, whose first one the least-squares start fits


def cached_pairs(cache: Path, split: str, tokens: int) -> Tensor:
    """The first `tokens` finite (source, target) rows of a pair cache's split, [n, 2, d] float32 (raw scale)."""
    pairs = leading_rows(shard_files(cache, split), tokens)
    if pairs.dim() != 3:
        raise SystemExit(f"--cache {cache}: not a pair cache (rows are {tuple(pairs.shape[1:])}, not (2, d))")
    return pairs


def transcoders(checkpoint: Path) -> dict[str, SparseAutoencoder]:
    """Every member of a sweep checkpoint that is a transcoder, with its trained weights and scales."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {name: sae_from_spec(spec, state["state_dict"], f"members.{name}.sae.").eval()
            for name, spec in state["sweep_members"].items() if spec.get("transcoder") is not None}


def least_squares(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(W, b) minimizing Σ‖y − W x − b‖², in float64 (a 1e-8 relative ridge keeps it solvable)."""
    return ridge_least_squares(x.double(), y.double(), 1e-8)


def linear_map(fit: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    weight, bias = fit
    return x.double() @ weight.T + bias


def linear_r2(fit: tuple[Tensor, Tensor], x: Tensor, y: Tensor) -> float:
    return float(explained_variance(y, linear_map(fit, x)))


@torch.no_grad()
def diagnose(sae: SparseAutoencoder, train: Tensor, held_out: Tensor) -> dict[str, float]:
    """The R² readings described in the module docstring, for one transcoder."""
    def normalized(pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, y = sae.normalize(pairs[:, 0]), sae.normalize_target(pairs[:, 1])
        return x, y, sae.decode(sae.encode(x)) - sae.b_dec

    x, y, codes_out = normalized(held_out)
    skip = sae.skip(x)
    summary = {"r2": float(explained_variance(y, sae(x))),
               "skip_r2": float("nan") if skip is None else float(explained_variance(y, skip + sae.b_dec)),
               "codes_r2": float(explained_variance(y, codes_out + sae.b_dec))}
    x_fit, y_fit, codes_fit = normalized(train)
    best_skip = linear_map(least_squares(x_fit, y_fit - codes_fit), x)
    summary["r2_skip_at_optimum"] = float(explained_variance(y, codes_out.double() + best_skip))
    summary["codes_linear_share"] = linear_r2(least_squares(x_fit, codes_fit), x, codes_out)
    return summary


def linear_baselines(sae: SparseAutoencoder, train: Tensor, held_out: Tensor) -> None:
    """The best linear map's held-out R² (fitted on all the fitting tokens), and that of the least-squares start
    (`skip_start: least_squares`) fitted on one batch of 2,048 of them at each ridge (SKIP_START_RIDGE)."""
    x, y = sae.normalize(train[:, 0]), sae.normalize_target(train[:, 1])
    x_held, y_held = sae.normalize(held_out[:, 0]), sae.normalize_target(held_out[:, 1])
    print(f"The best linear map (y ≈ W x + b): held-out R² {linear_r2(least_squares(x, y), x_held, y_held):.3f}")
    batch = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:START_BATCH]
    starts = {ridge: linear_r2(ridge_least_squares(x[batch].double(), y[batch].double(), ridge), x_held, y_held)
              for ridge in (1e-8, 1e-2, 1e-1, 1.0)}
    print(f"The least-squares start from {START_BATCH:,} tokens, held-out R² by ridge: "
          + ", ".join(f"{ridge:g}: {r2:.3f}" for ridge, r2 in starts.items()) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="sweep checkpoints (last.ckpt)")
    parser.add_argument("--cache", type=Path, required=True, help="the pair cache the transcoders trained on")
    parser.add_argument("--fit_tokens", type=int, default=131_072, help="training tokens for the least squares")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = cached_pairs(args.cache, "train", args.fit_tokens)
    held_out = held_out_part(cached_pairs(args.cache, "val", 10**9), "verdict")
    print(f"{len(train):,} fitting tokens, {len(held_out):,} held-out tokens (verdict half) of {args.cache}")
    found = {name: sae for checkpoint in args.checkpoints for name, sae in transcoders(checkpoint).items()}
    if not found:
        raise SystemExit("No transcoder in the checkpoints given")
    linear_baselines(next(iter(found.values())), train, held_out)  # in the first one's normalization
    print("| transcoder | R² | skip alone | codes alone | R², skip at its optimum | codes' output a linear map "
          "of x explains |\n|---|---|---|---|---|---|")
    for name, sae in found.items():
        r = diagnose(sae, train, held_out)
        skip_r2 = "–" if r["skip_r2"] != r["skip_r2"] else f"{r['skip_r2']:.3f}"  # NaN: no skip
        print(f"| {name} | {r['r2']:.3f} | {skip_r2} | {r['codes_r2']:.3f} | "
              f"{r['r2_skip_at_optimum']:.3f} | {r['codes_linear_share']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
