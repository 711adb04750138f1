"""N SAEs trained from one activation stream (`SweepModule`) against N separate runs, on live activations.

    python -m benchmarks.sweep_throughput [--members 4 --width 1152 --steps 6 --json out.json]
    python -m benchmarks.sweep_throughput --members 1 --more_hookpoints attn_out resid_mid

Each separate run pays the LM forward for every batch; the sweep pays it once per batch for all members. The
ratio is the sweep's throughput in SAE-tokens/s (tokens × members) over the separate runs' combined one. With
`--more_hookpoints`, the same members also train on those hookpoints of the layer: one sweep per hookpoint, one
after another, against one `one_forward` sweep of them all (SAE-tokens/s over every hookpoint's members).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import device_name
from benchmarks.end_to_end import add_common_arguments, datamodule, fit_tokens_per_second
from datamodules import LMActivationDataModule
from lightning_modules import SAEModule, SweepModule
from sagsae.training import TrainingPlan


def member(seed: int, width: int) -> TrainingPlan:
    return TrainingPlan.from_arguments("sagsae", width=width, sparsity_coefficient=8.0, init_seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--more_hookpoints", nargs="+", help="compare one forward for them all against apart")
    args = parser.parse_args()
    if args.more_hookpoints:
        return compare_one_forward(args)
    separate = [fit_tokens_per_second(SAEModule.from_plan(member(seed, args.width)), datamodule(args), args.steps)
                for seed in range(args.members)]
    separate_rate = args.members / sum(1 / rate for rate in separate)  # N runs one after another
    sweep = SweepModule({f"s{seed}": member(seed, args.width) for seed in range(args.members)})
    sweep_rate = args.members * fit_tokens_per_second(sweep, datamodule(args), args.steps)
    print(f"{args.members} SA-GSAE(width {args.width}) on {args.model} {args.hookpoint} layer {args.layer}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads, {device_name()}")
    print(f"{'separate runs':<16} {separate_rate:>10,.0f} SAE-tokens/s")
    print(f"{'one sweep':<16} {sweep_rate:>10,.0f} SAE-tokens/s")
    print(f"ratio: sweep / separate {sweep_rate / separate_rate:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"separate": separate_rate, "sweep": sweep_rate}, indent=2))


def compare_one_forward(args) -> None:
    hookpoints = [args.hookpoint, *args.more_hookpoints]
    members = {f"s{seed}": member(seed, args.width) for seed in range(args.members)}
    apart = []
    for hookpoint in hookpoints:
        args.hookpoint = hookpoint
        apart.append(len(members) * fit_tokens_per_second(SweepModule(dict(members)), datamodule(args), args.steps))
    apart_rate = len(hookpoints) / sum(1 / rate for rate in apart)  # one sweep per hookpoint, in turn
    args.hookpoint = hookpoints[0]
    data = LMActivationDataModule(model=args.model, hookpoint=hookpoints[0], layer=args.layer, batch_size=args.batch,
                                  more_hookpoints=[[hookpoint, args.layer] for hookpoint in hookpoints[1:]])
    placed = {f"{hookpoint}/{name}": (site, plan) for site, hookpoint in enumerate(hookpoints)
              for name, plan in members.items()}
    sweep = SweepModule({key: plan for key, (_, plan) in placed.items()},
                        sites={key: site for key, (site, _) in placed.items()})
    together_rate = len(placed) * fit_tokens_per_second(sweep, data, args.steps)
    print(f"{args.members} SA-GSAE(width {args.width}) on each of {', '.join(hookpoints)} of {args.model} layer "
          f"{args.layer}, batch {args.batch}, {torch.get_num_threads()} threads, {device_name()}")
    print(f"{'apart':<16} {apart_rate:>10,.0f} SAE-tokens/s")
    print(f"{'one forward':<16} {together_rate:>10,.0f} SAE-tokens/s")
    print(f"ratio: one forward / apart {together_rate / apart_rate:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"hookpoints": hookpoints, "members": args.members, "width": args.width,
                                         "apart": apart_rate, "one_forward": together_rate, "device": device_name()},
                                        indent=2))


if __name__ == "__main__":
    main()
