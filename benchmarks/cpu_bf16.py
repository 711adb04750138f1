"""Which CPUs train faster under bf16 autocast: the default SA-GSAE's bare step in fp32 and in bf16, with oneDNN
(torch's CPU matmul library) capped at each instruction set in turn, one process per cap.

    python -m benchmarks.cpu_bf16 [--isa ALL AVX512_CORE_BF16 AVX512_CORE --d_in 576 --width 4608 --batch 4096
                                   --rounds 3 --json out.json]

`ONEDNN_MAX_CPU_ISA` makes a CPU with AMX run as one without it: ALL is the machine itself, AVX512_CORE_BF16 a
CPU with AVX512-BF16 but no AMX (Cooper Lake, AMD Zen 4), AVX512_CORE one with neither (AVX2, too, can be asked
for; its bf16 matmuls are emulated and take minutes a step). Within each process the fp32 and bf16 steps
alternate (`alternating_medians`). sagsae/precision.py takes bf16-mixed only on the CPUs where this measured it
faster; docs/performance.md, "Mixed precision", records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import alternating_medians
from benchmarks.sae_step import training_step
from sagsae.precision import fast_bf16
from sagsae.saes import build_sae

DEFAULT_CAPS = ["ALL", "AVX512_CORE_BF16", "AVX512_CORE"]


def measure(d_in: int, width: int, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of the fp32 step and of the bf16-autocast step, in this process (its oneDNN cap)."""
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    fp32_step = training_step(build_sae("sagsae", d_in=d_in, width=width, theta_init_quantile=0.9), x)
    bf16_step = training_step(build_sae("sagsae", d_in=d_in, width=width, theta_init_quantile=0.9), x)

    def bf16_call():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_step()
    return alternating_medians({"fp32": fp32_step, "bf16": bf16_call}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", default=DEFAULT_CAPS, help="oneDNN caps (ONEDNN_MAX_CPU_ISA values)")
    parser.add_argument("--d_in", type=int, default=576)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one cap, run by main itself
    args = parser.parse_args()
    sizes = [str(value) for value in ("--d_in", args.d_in, "--width", args.width, "--batch", args.batch,
                                      "--rounds", args.rounds)]
    if args.worker:
        print(json.dumps(measure(args.d_in, args.width, args.batch, args.rounds)))
        return
    print(f"SA-GSAE step, d {args.d_in}, width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {fast_bf16('cpu') or 'no AMX or AVX512-BF16 on this CPU'}")
    results = {}
    for cap in args.isa:
        worker = subprocess.run([sys.executable, "-m", "benchmarks.cpu_bf16", "--worker", *sizes],
                                env={**os.environ, "ONEDNN_MAX_CPU_ISA": cap}, capture_output=True, text=True,
                                check=True)
        seconds = json.loads(worker.stdout.strip().splitlines()[-1])
        results[cap] = {**seconds, "bf16_speedup": seconds["fp32"] / seconds["bf16"]}
        print(f"oneDNN cap {cap:17s} fp32 {seconds['fp32'] * 1e3:8.0f} ms   bf16 {seconds['bf16'] * 1e3:8.0f} ms   "
              f"bf16 speed-up {results[cap]['bf16_speedup']:.2f}×")
    if args.json:
        args.json.write_text(json.dumps({"sizes": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
