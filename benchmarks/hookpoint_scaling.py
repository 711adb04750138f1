"""The LM's loss with a cached hookpoint scaled, mean-ablated or noised: does the LM prefer a smaller activation there?

    python -m benchmarks.hookpoint_scaling --cache cache/smollm2_l15_attn_out_v10 [--contexts 256 --json out.json]

On the cache's own LM and held-out contexts (the verdict half, as the sweeps' ΔCE), it prints the next-token CE
with the hookpoint's activation x replaced by α·x for each α, by the training mean of x (mean ablation), and by
x plus Gaussian noise whose energy is (1 − R²) of x's for each R² asked (an error of an SAE's size, but in no
preferred direction), and by x's projection on its top principal components, as many as explain that R² of the
training tokens (an error that drops the low-variance directions, as a sparse dictionary of few latents tends to).
Each row gives ΔCE = CE − CE_clean in nats. An SAE whose ΔCE is below zero lowers the LM's loss; if some α < 1
does too, a reconstruction that shrinks x can gain from the shrinking alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from datamodules.activation_files import ActivationFileDataModule, leading_rows

ALPHAS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
NOISE_R2 = (0.9, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a `sagsae cache` folder")
    parser.add_argument("--contexts", type=int, default=256, help="held-out contexts scored")
    parser.add_argument("--held_out", default="verdict", help="all, selection or verdict (the sweeps' ΔCE half)")
    parser.add_argument("--mean_tokens", type=int, default=131_072, help="training tokens for the mean")
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--noise_r2", type=float, nargs="+", default=NOISE_R2)
    parser.add_argument("--pca_r2", type=float, nargs="*", default=NOISE_R2)
    parser.add_argument("--skip_scaling", action="store_true", help="only the PCA rows (and clean, zero)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = ActivationFileDataModule(args.cache, held_out=args.held_out)
    sample = leading_rows(data.shards, args.mean_tokens)  # raw scale
    mean, energy = sample.mean(0), sample.pow(2).sum(-1).mean()
    generator = torch.Generator().manual_seed(args.seed)

    def noised(r2: float):
        def replace(x: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(x.shape, generator=generator)
            return x + noise * ((1 - r2) * x.pow(2).sum(-1, keepdim=True) / x.shape[-1]).sqrt()
        return replace

    centered = (sample - mean).double()
    variances, directions = torch.linalg.eigh(centered.T @ centered / len(sample))  # ascending
    variances, directions = variances.flip(0), directions.flip(1).float()
    explained = variances.cumsum(0) / variances.sum()

    def components(r2: float) -> int:
        """The fewest leading principal components that explain `r2` of the variance."""
        return int((explained < r2).sum()) + 1

    def projected(r2: float):
        kept = directions[:, : components(r2)]
        return lambda x: mean + (x - mean) @ kept @ kept.T

    replacements = {} if args.skip_scaling else {f"alpha {alpha:g}": (lambda a: lambda x: a * x)(alpha)
                                                 for alpha in args.alphas}
    if not args.skip_scaling:
        replacements["mean ablation"] = lambda x: mean.expand_as(x)
        replacements.update({f"noise R2 {r2:g}": noised(r2) for r2 in args.noise_r2})
    replacements.update({f"PCA R2 {r2:g} ({components(r2)} components)": projected(r2)
                         for r2 in args.pca_r2})
    rows = {}
    for name, replace in replacements.items():
        result = data.spliced_cross_entropy(replace, args.contexts)
        rows[name] = {"ce": result["ce_sae"], "ce_delta": result["ce_delta"]}
        print(f"{name:>16}: CE {result['ce_sae']:.4f}, ΔCE {result['ce_delta']:+.4f} nats", flush=True)
    summary = {"cache": args.cache, "metadata": data.metadata, "contexts": args.contexts, "held_out": args.held_out,
               "ce_clean": result["ce_clean"], "ce_zero": result["ce_zero"], "mean_norm": float(mean.norm()),
               "rms_norm": float(energy.sqrt()), "rows": rows}
    scaled = [r for r in rows if r.startswith("alpha")]
    print(f"clean CE {result['ce_clean']:.4f}, zeroed {result['ce_zero']:.4f}")
    if scaled:
        best = min(scaled, key=lambda r: rows[r]["ce"])
        print(f"lowest over α at {best} (ΔCE {rows[best]['ce_delta']:+.4f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
