"""One SAE training step (forward, loss, backward, Adam) per architecture, against the matmul floor.

    python -m benchmarks.sae_step [--d_in 576 --width 4608 --batch 4096 --repeats 5 --json out.json]

The floor is the bare encoder and decoder matmuls, forward and backward, in plain torch: what any SAE of
this width must compute. Ratios are floor time / step time (1.0 = at the floor), measured in this process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sagsae.saes import SAE_REGISTRY, build_sae


def seconds_per_call(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def floor_step(x: torch.Tensor, width: int):
    encoder = torch.randn(width, x.shape[1], requires_grad=True)
    decoder = torch.randn(x.shape[1], width, requires_grad=True)

    def step():
        codes = torch.relu(x @ encoder.T)
        ((codes @ decoder.T - x) ** 2).sum().backward()
        encoder.grad = decoder.grad = None
    return step


def sae_step(name: str, x: torch.Tensor, width: int):
    sae = build_sae(name, d_in=x.shape[1], width=width, **({"k": 64} if "topk" in name else {}))
    sae.initialize_from_batch(x)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(width, dtype=torch.bool)

    def step():
        out = sae.loss(x, 1.0, dead=dead)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_in", type=int, default=576)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    floor = seconds_per_call(floor_step(x, args.width), args.repeats)
    rows = {"floor": floor} | {name: seconds_per_call(sae_step(name, x, args.width), args.repeats)
                               for name in SAE_REGISTRY}
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"d_in {args.d_in}, width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads, {device}")
    print(f"{'step':<12} {'ms':>10} {'tokens/s':>12} {'floor/step':>11}")
    for name, seconds in rows.items():
        print(f"{name:<12} {seconds * 1e3:>10.1f} {args.batch / seconds:>12,.0f} {floor / seconds:>11.2f}")
    print("ratios vs floor: " + ", ".join(f"{name} {floor / s:.2f}" for name, s in rows.items() if name != "floor"))
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None}, "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
