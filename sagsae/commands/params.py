"""`python -m sagsae params`: exact trainable-parameter counts per architecture (docs/method.md, "Baselines"), and the
width at which each architecture matches SA-GSAE's count at the given width."""

from __future__ import annotations

import argparse

from sagsae.saes import SAE_REGISTRY, SparseAutoencoder


def matching_width(sae_class: type[SparseAutoencoder], d_in: int, width: int, target: int) -> float:
    """Counts are affine in the width (a·H + b): fit them at H and H + 1, then solve a·H + b = target."""
    at_width = sae_class.parameter_count(d_in, width)
    slope = sae_class.parameter_count(d_in, width + 1) - at_width
    return width + (target - at_width) / slope


def table(d_in: int, width: int) -> list[tuple[str, int, float]]:
    target = SAE_REGISTRY["sagsae"].parameter_count(d_in, width)
    return [(name, cls.parameter_count(d_in, width), matching_width(cls, d_in, width, target))
            for name, cls in SAE_REGISTRY.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagsae params", description=__doc__)
    parser.add_argument("--d_in", type=int, default=576, help="activation size d")
    parser.add_argument("--width", type=int, default=4608, help="number of latents H")
    args = parser.parse_args(argv)
    if args.d_in <= 0 or args.width <= 0:
        parser.error("--d_in and --width must be positive")
    print(f"Trainable parameters at d_in = {args.d_in}, width = {args.width} "
          f"(tied SA-GSAE; untied adds {2 * args.width} scalars)")
    print(f"{'architecture':<12} {'parameters':>14} {'width matching SA-GSAE':>24}")
    for name, count, width in table(args.d_in, args.width):
        print(f"{name:<12} {count:>14,} {width:>24,.1f}")
