"""What Matryoshka nesting costs a training step: each architecture plain against nested, in one process.

    python -m benchmarks.matryoshka_cost [--d_in 576 --width 4608 --batch 4096 --repeats 5 --json out.json]

The nested SAE has the levels [width/8, width/2, width], the weights of the plain one, and takes full training
steps (forward, loss, backward, Adam) in turn with it (`alternating_medians`). SA-GSAE and Gated start at about
1% density (their thresholds at the 0.99-quantile of the first batch's pre-activations), where the default's
`sparse_decode_below` decodes sparsely on CPU.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import json

import torch

from benchmarks import DEVICE, add_step_shape_arguments, alternating_medians, device_name
from benchmarks.sae_step import training_step
from sagsae.saes import build_sae

ARCHITECTURES = {"sagsae": {"theta_init_quantile": 0.99}, "gated": {"gate_init_quantile": 0.99},
                 "topk": {"k": 64}, "batchtopk": {"k": 64}, "relu": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_arguments(parser, repeats="repeats")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=DEVICE)
    levels = [args.width // 8, args.width // 2, args.width]
    print(f"{device_name()}, {torch.get_num_threads()} threads, d {args.d_in}, width {args.width}, batch "
          f"{args.batch}, levels {levels}, fp32, median of {args.repeats}", flush=True)
    rows = []
    for name, switches in ARCHITECTURES.items():
        plain = build_sae(name, d_in=args.d_in, width=args.width, **switches).to(DEVICE)
        plain.sparse_decode_below = "auto"
        plain.initialize_from_batch(x)
        nested = copy_module.deepcopy(plain).make_matryoshka(levels)
        timings = alternating_medians({"plain": training_step(plain, x), "nested": training_step(nested, x)},
                                      args.repeats)
        row = {"architecture": name, "plain_ms": 1000 * timings["plain"], "nested_ms": 1000 * timings["nested"],
               "nested_over_plain": timings["nested"] / timings["plain"]}
        rows.append(row)
        print(f"{name:<10} plain {row['plain_ms']:8.1f} ms   nested {row['nested_ms']:8.1f} ms   "
              f"nested/plain {row['nested_over_plain']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name(), "threads": torch.get_num_threads(), "levels": levels,
                       "batch": args.batch, "d_in": args.d_in, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
