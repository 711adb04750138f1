"""The elementwise chain against its memory floor: how close SA-GSAE's, Gated's and JumpReLU's chains come to the
time a copy of the same bytes takes.

    python -m benchmarks.chain_floor [--d_in 576 --width 4608 --batch 4096 --rounds 8 --json out.json]

The floor counts what a chain must move, forward and backward, each input read once and each output written once:
- the gated chains (u → codes, gate codes and their L1): forward reads u and writes both codes; backward reads
  both codes' gradients and u (for the masks) and writes u's gradient: 3 [B, H] tensors of u's dtype and 4 of the
  codes' (the per-latent vectors are negligible);
- JumpReLU (z → codes and firing counts): forward reads z and writes the codes; backward reads their gradient
  and z and writes z's gradient: 5 [B, H] tensors.
It divides those bytes by the bandwidth of a plain copy of one [B, H] fp32 tensor, measured in the same process.
Each chain runs eagerly (the fused autograd functions) and, for the gated chains, compiled (`traceable_chain`
through torch.compile, forward and backward) and, on CPU, as the C++ kernel (sagsae/saes/native_chain.py), in fp32
and with bf16 codes, as autocast gives them. The kernel also runs "in cache": the same rows in slices of
IN_CACHE_ROWS that stay in the CPU's cache, one autograd call each, which times its arithmetic (and those calls)
without the trips to memory. Where that alone exceeds the floor's multiple, the chain is bound by its arithmetic,
not by the bytes it moves.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks import add_step_shape_arguments, DEVICE, alternating_medians, device_name
from sagsae.saes import build_sae
from sagsae.saes.gated_chain import eager_gated_chain, traceable_chain
from sagsae.saes.native_chain import native_chain_applies, native_gated_chain
from sagsae.saes.straight_through import jump_relu_with_counts

IN_CACHE_ROWS = 256  # 4608 latents: 6 arrays of 256 rows are 28 MB in fp32, within a 32 MB L3
STARTS = {"sagsae": {"theta_init_quantile": 0.9}, "gated": {"gate_init_quantile": 0.9},
          "jumprelu": {"theta_init_quantile": 0.9}}


def copy_bandwidth(batch: int, width: int, rounds: int) -> float:
    """Bytes per second of `dst.copy_(src)` for one [batch, width] fp32 tensor (read once, written once)."""
    source = torch.randn(batch, width, device=DEVICE)
    target = torch.empty_like(source)
    seconds = alternating_medians({"copy": lambda: target.copy_(source)}, rounds)["copy"]
    return 2 * source.numel() * source.element_size() / seconds


def floor_bytes(architecture: str, batch: int, width: int, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    tensors = 5 if architecture == "jumprelu" else 7
    return tensors * batch * width * size


def gated_call(chain, sae, u: torch.Tensor, upstream: list[torch.Tensor]):
    arguments = sae.fused_chain_arguments()

    def call():
        codes, gate_codes, gate_l1 = chain(u, sae.b_gate, **arguments)
        torch.autograd.backward([codes, gate_codes, gate_l1.sum()], [upstream[0], upstream[1], None])
        u.grad = None
        sae.zero_grad(set_to_none=True)
    return call


def in_cache_call(sae, leaf: torch.Tensor, upstream: list[torch.Tensor]):
    """The native chain over the batch's worth of elements, as repeated passes over one cache-sized slice."""
    rows = min(IN_CACHE_ROWS, leaf.shape[0])
    piece = leaf.detach()[:rows].clone().requires_grad_()
    one_pass = gated_call(native_gated_chain, sae, piece, [grad[:rows] for grad in upstream])

    def call():
        for _ in range(leaf.shape[0] // rows):
            one_pass()
    return call


def jump_call(sae, z: torch.Tensor, upstream: list[torch.Tensor]):
    def call():
        codes, counts = jump_relu_with_counts(z, sae.threshold, sae.bandwidth)
        torch.autograd.backward([codes, counts.sum()], [upstream[0], None])
        z.grad = None
        sae.zero_grad(set_to_none=True)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=DEVICE)
    bandwidth = copy_bandwidth(args.batch, args.width, args.rounds)
    print(f"{device_name()}, {torch.get_num_threads()} threads, d {args.d_in}, width {args.width}, batch "
          f"{args.batch}, median of {args.rounds}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = {"device": device_name(), "threads": torch.get_num_threads(), "copy_bytes_per_s": bandwidth,
               "shape": [args.batch, args.width], "chains": {}}
    compiled = torch.compile(traceable_chain, fullgraph=True, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        for name, start in STARTS.items():
            sae = build_sae(name, d_in=args.d_in, width=args.width, **start).to(DEVICE)
            sae.initialize_from_batch(x)
            with torch.no_grad():
                pre = (sae.projection(x) if name != "jumprelu" else sae.pre_activation(x)).to(dtype)
            leaf = pre.clone().requires_grad_()
            upstream = [torch.randn(args.batch, args.width, device=DEVICE, dtype=dtype) for _ in range(2)]
            if name == "jumprelu":
                calls = {"eager": jump_call(sae, leaf, upstream)}
            else:
                calls = {"eager": gated_call(eager_gated_chain, sae, leaf, upstream),
                         "compiled": gated_call(compiled, sae, leaf, upstream)}
                if native_chain_applies(leaf):
                    calls["native"] = gated_call(native_gated_chain, sae, leaf, upstream)
                    calls["native_in_cache"] = in_cache_call(sae, leaf, upstream)
            started = time.perf_counter()
            if "compiled" in calls:
                calls["compiled"]()  # the compilation, timed apart
            compile_seconds = time.perf_counter() - started
            timings = alternating_medians(calls, args.rounds)
            floor = floor_bytes(name, args.batch, args.width, dtype) / bandwidth
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            results["chains"][key] = {"floor_s": floor, **{f"{form}_s": t for form, t in timings.items()},
                                      "compile_s": compile_seconds if "compiled" in calls else None}
            line = f"{key:<18} floor {floor * 1e3:6.1f} ms"
            for form, seconds in timings.items():
                line += f"   {form} {seconds * 1e3:6.1f} ms ({seconds / floor:4.1f}× floor)"
            if "compiled" in calls:
                line += f"   compiled in {compile_seconds:.0f} s"
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
