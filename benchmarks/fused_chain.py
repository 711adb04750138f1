"""The elementwise chains fused into one autograd function, against the composed torch ops.

    python -m benchmarks.fused_chain [--d_in 576 --width 4608 --batch 4096 --rounds 8 --autocast bf16 --json out.json]

For Gated and SA-GSAE (the default config's θ start, the 0.9-quantile), in one process: the chain alone (from u to
both paths' codes and the weighted L1, forward and backward with random upstream gradients), and one training
step (loss, backward, Adam) with `use_fused_chain` on and off; for JumpReLU (θ from the 0.9-quantile too), whose
codes and L0 come from one function (`jump_relu_with_counts`), the training step. The two forms alternate call by
call, so that the machine's drift reaches both alike; each figure is the median of `--rounds` calls. With
`--compile`, the fused chain through torch.compile joins them (`compile_gated_chain`). sagsae/saes/gated_chain.py says why
the fused form exists; docs/performance.md records what this measured.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import add_step_shape_arguments, DEVICE, alternating_medians, device_name
from benchmarks.sae_step import training_step
from sagsae.saes.gated_chain import CHAIN_BODIES, EAGER_BODIES, compiled_bodies, gated_chain
from sagsae.saes import build_sae
from sagsae.saes.gated_paths import GatedPathsSAE

STARTS = {"sagsae": {"theta_init_quantile": 0.9}, "gated": {}, "jumprelu": {"theta_init_quantile": 0.9}}


def chain_call(sae: GatedPathsSAE, u: torch.Tensor, upstream: list[torch.Tensor], fused: bool):
    """Forward and backward of the chain alone, from a leaf u, as the SAE's loss runs it."""
    norms = sae.W_dec.detach().norm(dim=0)

    def call():
        if fused:
            codes, gate_codes, gate_l1 = gated_chain(u, sae.b_gate, **sae.fused_chain_arguments())
            l1 = gate_l1 @ norms
        else:
            pi = u + sae.b_gate
            codes, gate_codes = sae.codes_from_paths(u, pi), sae.gate_activation(pi)
            l1 = (gate_codes.abs() @ norms).sum()
        torch.autograd.backward([codes, gate_codes, l1], [upstream[0], upstream[1], torch.ones_like(l1)])
        u.grad = None
        sae.zero_grad(set_to_none=True)
    return call


def with_bodies(bodies: dict, call):
    """`call` with the gated chain's bodies swapped in for its duration (the compiled ones, `--compile`)."""
    def swapped():
        CHAIN_BODIES.update(bodies)
        try:
            call()
        finally:
            CHAIN_BODIES.update(EAGER_BODIES)
    return swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_arguments(parser)
    parser.add_argument("--autocast", choices=["bf16"], help="run under bf16 autocast")
    parser.add_argument("--compile", action="store_true",
                        help="also the fused chain through torch.compile (compiled in the warm-up call)")
    args = parser.parse_args()
    compiled = compiled_bodies() if args.compile else None
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=DEVICE)
    upstream = [torch.randn(args.batch, args.width, device=DEVICE) for _ in range(2)]
    print(f"{device_name()}, {torch.get_num_threads()} threads, d {args.d_in}, width {args.width}, batch "
          f"{args.batch}, {args.autocast or 'fp32'}, median of {args.rounds}")
    results = {"device": device_name(), "threads": torch.get_num_threads(), "precision": args.autocast or "fp32"}
    for name, start in STARTS.items():
        saes = {}
        for fused in (True, False):
            sae = build_sae(name, d_in=args.d_in, width=args.width, **start).to(DEVICE)
            sae.initialize_from_batch(x)
            sae.use_fused_chain = fused
            saes[fused] = sae
        results[name] = {}
        if isinstance(saes[True], GatedPathsSAE):
            u = saes[True].projection(x).detach().float().requires_grad_()
            chain = {"fused": chain_call(saes[True], u, upstream, True),
                     "composed": chain_call(saes[False], u, upstream, False)}
            if compiled and name != "jumprelu":
                chain["compiled"] = with_bodies(compiled, chain_call(saes[True], u, upstream, True))
            results[name]["chain"] = alternating_medians(chain, args.rounds, bool(args.autocast))
        step = {"fused": training_step(saes[True], x), "composed": training_step(saes[False], x)}
        if compiled and isinstance(saes[True], GatedPathsSAE):
            step["compiled"] = with_bodies(compiled, training_step(saes[True], x))
        results[name]["step"] = alternating_medians(step, args.rounds, bool(args.autocast))
        for part, timing in results[name].items():
            line = (f"{name:<7} {part:<6} fused {timing['fused'] * 1e3:7.0f} ms   composed {timing['composed'] * 1e3:7.0f}"
                    f" ms   fused/composed {timing['fused'] / timing['composed']:.2f}")
            if "compiled" in timing:
                line += f"   compiled {timing['compiled'] * 1e3:7.0f} ms, compiled/fused {timing['compiled'] / timing['fused']:.2f}"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
