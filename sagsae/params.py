"""`python -m sagsae params`: exact trainable-parameter counts per architecture (SPEC §3 accounting), and the
width at which each architecture matches SA-GSAE's count at the given width."""

from __future__ import annotations

import argparse

from sagsae.saes import SAE_REGISTRY, build_sae


def count_parameters(architecture: str, d_in: int, width: int) -> int:
    sae = build_sae(architecture, d_in=d_in, width=width, **_small_k(architecture, width))
    return sum(p.numel() for p in sae.parameters() if p.requires_grad)


def _small_k(architecture: str, width: int) -> dict:
    """TopK-family k does not change the count; pick one that is valid at any width."""
    return {"k": 1} if "topk" in architecture else {}


def matching_width(architecture: str, d_in: int, target: int) -> float:
    """Counts are affine in the width (a·H + b): solve a·H + b = target."""
    b = count_parameters(architecture, d_in, 2) - 2 * (count_parameters(architecture, d_in, 3) - count_parameters(architecture, d_in, 2))
    a = count_parameters(architecture, d_in, 3) - count_parameters(architecture, d_in, 2)
    return (target - b) / a


def table(d_in: int, width: int) -> list[tuple[str, int, float]]:
    target = count_parameters("sagsae", d_in, width)
    return [(name, count_parameters(name, d_in, width), matching_width(name, d_in, target))
            for name in SAE_REGISTRY]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sagsae params", description=__doc__)
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
