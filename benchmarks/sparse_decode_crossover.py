"""Where the sparse decode starts to pay: dense against sparse training steps of SA-GSAE and Gated over densities.

    python -m benchmarks.sparse_decode_crossover [--d_in 576 --batch 4096 --repeats 3 --json out.json]
                                                 [--width 4608 --more_widths 16384] [--autocast bf16]

Each SAE starts with its gate thresholds at the (1 − density)-quantile of its pre-activations, so that about that
share of the codes is non-zero; the measured share is printed. The same SAE then takes full training steps
(forward, loss, backward, Adam) decoded densely and from the non-zero codes alone (`sparse_decode_below` 1.0),
taken in turn (`alternating_medians`). The crossover is the density where dense/sparse falls through 1, read by
linear interpolation between the two measured densities around it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy as copy_module
import json

import torch

from benchmarks import DEVICE, add_step_shape_arguments, alternating_medians, device_name
from benchmarks.sae_step import training_step
from sagsae.saes import build_sae

DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
QUANTILE_ARGUMENT = {"sagsae": "theta_init_quantile", "gated": "gate_init_quantile"}


def crossover(densities: list[float], ratios: list[float]) -> float | None:
    """The density where dense/sparse first drops below 1: None if it never does, 0 if it is below 1 already at
    the lowest density."""
    for index, ratio in enumerate(ratios):
        if ratio < 1:
            if index == 0:
                return 0.0
            low, high = densities[index - 1], densities[index]
            before = ratios[index - 1]
            return low + (high - low) * (before - 1) / (before - ratio)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_arguments(parser, repeats="repeats")
    parser.add_argument("--more_widths", type=int, nargs="*", default=[16384], help="widths measured after --width")
    parser.add_argument("--autocast", choices=["bf16"], help="run every step under bf16 autocast")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=DEVICE)
    precision = "bf16" if args.autocast else "fp32"
    print(f"{device_name()}, {torch.get_num_threads()} threads, d {args.d_in}, batch {args.batch}, {precision}, "
          f"median of {args.repeats}", flush=True)
    results = {"device": device_name(), "threads": torch.get_num_threads(), "precision": precision, "rows": []}
    autocast = (torch.autocast(DEVICE.type, dtype=torch.bfloat16) if args.autocast
                else contextlib.nullcontext())
    widths = [args.width, *args.more_widths]
    for width in widths:
        for name, quantile in QUANTILE_ARGUMENT.items():
            if name == "gated" and width != widths[0]:
                continue  # Gated at the first width only: its chain is SA-GSAE's, so its crossover follows
            measured, ratios = [], []
            for density in DENSITIES:
                sae = build_sae(name, d_in=args.d_in, width=width, **{quantile: 1 - density}).to(DEVICE)
                sae.initialize_from_batch(x)
                with torch.no_grad():
                    actual = (sae.encode(x) != 0).float().mean().item()
                steps = {}
                for form, below in (("dense", None), ("sparse", 1.0)):
                    copy = copy_module.deepcopy(sae)  # one SAE per form: each step reads its own switch
                    copy.sparse_decode_below = below
                    step = training_step(copy, x)

                    def timed(step=step):
                        with autocast:
                            step()
                    steps[form] = timed
                timings = alternating_medians(steps, args.repeats)
                ratio = timings["dense"] / timings["sparse"]
                measured.append(actual)
                ratios.append(ratio)
                results["rows"].append({"sae": name, "width": width, "density": actual,
                                        **{f"{form}_s": t for form, t in timings.items()}, "dense_over_sparse": ratio})
                print(f"{name:<7} width {width:>6}  density {actual:6.3%}  dense {timings['dense'] * 1e3:7.1f} ms  "
                      f"sparse {timings['sparse'] * 1e3:7.1f} ms  dense/sparse {ratio:5.2f}", flush=True)
            point = crossover(measured, ratios)
            results.setdefault("crossover", {})[f"{name}/{width}"] = point
            verdict = ("wins at every measured density" if point is None else
                       "loses at every measured density" if point == 0 else f"wins below {point:.1%} density")
            print(f"{name} width {width}: the sparse decode {verdict}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
