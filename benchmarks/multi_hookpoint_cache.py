"""Several hookpoints from one LM forward against the cache of one of them.

    python -m benchmarks.multi_hookpoint_cache [--tokens 65536 --rounds 3 --json out.json]

Writes a cache of SmolLM2-135M-Instruct (`SmolLM2-135M-Instruct.Q4_1.gguf`) layer 15 from the embedded Wikipedia
summaries, for mlp_out alone and for mlp_out, attn_out and resid_mid together (`write_caches`), in turn, round
after round, in one process with the LM loaded once; prints the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import device_name
from datamodules import LMActivationDataModule
from datamodules.activation_cache import write_caches

HOOKPOINTS = [("mlp_out", 15), ("attn_out", 15), ("resid_mid", 15)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = LMActivationDataModule(model="embedded:smollm2-135m", hookpoint="mlp_out", layer=15, lm_dtype="float32")
    data.setup()
    forms = {"one": HOOKPOINTS[:1], "three": HOOKPOINTS}
    times: dict[str, list[float]] = {form: [] for form in forms}
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.rounds + 1):  # the first round warms up
            for form, hookpoints in forms.items():
                outs = [Path(root) / f"{form}{round_}_{name}" for name, _ in hookpoints]
                started = time.perf_counter()
                write_caches(data, outs, hookpoints, args.tokens, 4096, 65_536, "float16")
                if round_:
                    times[form].append(time.perf_counter() - started)
                for out in outs:
                    shutil.rmtree(out)
    medians = {form: statistics.median(values) for form, values in times.items()}
    ratio = medians["three"] / medians["one"]
    print(f"{device_name()}, {torch.get_num_threads()} threads, {args.tokens:,} train tokens, median of {args.rounds}")
    print(f"mlp_out alone {medians['one']:.1f} s; mlp_out, attn_out and resid_mid from one forward "
          f"{medians['three']:.1f} s; ratio {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(), "threads": torch.get_num_threads(),
                                         "tokens": args.tokens, "seconds": times, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
