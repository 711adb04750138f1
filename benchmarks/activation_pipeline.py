"""Tokens/s of the activation datamodule against the bare truncated LM forward over the same tokens, and of
the truncated forward against the full-depth one (all in this process).

    python -m benchmarks.activation_pipeline [--lm_batches 8] [--hookpoint mlp_out --layer 15]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks import DEVICE, clock, device_name
from datamodules import LMActivationDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--hookpoint", default="mlp_out")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--lm_batches", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = LMActivationDataModule(model=args.model, hookpoint=args.hookpoint, layer=args.layer)
    data.load_language_model(DEVICE)
    hp = data.hparams
    contexts = list(itertools.islice(data.lm.contexts(data.documents(validation=False)),
                                     args.lm_batches * hp.lm_batch_size))
    batches = [torch.tensor(contexts[i : i + hp.lm_batch_size]) for i in range(0, len(contexts), hp.lm_batch_size)]
    total = sum(b.numel() for b in batches)

    def timed(function) -> float:
        start = clock()
        function()
        return clock() - start

    data.lm.reader(batches[0])  # warm-up
    truncated = timed(lambda: [data.lm.reader(b) for b in batches])
    with torch.inference_mode():
        full = timed(lambda: [data.lm.logits(b) for b in batches])
    trained_tokens = 0

    def pipeline() -> None:
        nonlocal trained_tokens
        for batch in itertools.islice(data.training_batches(), total // hp.batch_size):
            trained_tokens += len(batch)
    stream = timed(pipeline)
    rows = {"truncated_forward": total / truncated, "full_forward": total / full,
            "datamodule (trained tokens)": trained_tokens / stream}
    print(f"{args.model} {args.hookpoint} layer {args.layer}, {len(batches)} LM batches of "
          f"{hp.lm_batch_size}×{hp.context_length} tokens, {torch.get_num_threads()} threads, {device_name()}")
    for name, value in rows.items():
        print(f"{name:<28} {value:>10,.0f} tokens/s")
    print(f"ratios: datamodule / truncated forward {rows['datamodule (trained tokens)'] / rows['truncated_forward']:.2f}, "
          f"truncated / full forward {rows['truncated_forward'] / rows['full_forward']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
