"""Resume time of the live activation stream after N and after 4N consumed batches: from the checkpoint's
shuffle-buffer fill (what `fit` does now) against replaying every batch consumed (what it did before), both
measured in this process with the same LM, plus the size of the stream state a checkpoint holds.

    python -m benchmarks.resume [--batches 4] [--model embedded:smollm2-135m --hookpoint mlp_out --layer 15]

Defaults are the default config's stream (contexts of 128, 32 per LM forward, batches of 4,096 tokens, a
32,768-token shuffle buffer).
"""

from __future__ import annotations

import argparse
import io
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
    parser.add_argument("--batches", type=int, default=4, help="N: resumes after N and after 4N batches")
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--shuffle_buffer_tokens", type=int, default=32_768)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = dict(model=args.model, hookpoint=args.hookpoint, layer=args.layer, batch_size=args.batch_size,
                    shuffle_buffer_tokens=args.shuffle_buffer_tokens)
    first = LMActivationDataModule(**settings)
    first.load_language_model(DEVICE)

    def datamodule() -> LMActivationDataModule:
        data = LMActivationDataModule(**settings)
        data.lm = first.lm  # the LM loads once: only the stream is timed
        return data

    counts = (args.batches, 4 * args.batches)
    states, straight = {}, []
    batches = first.training_batches()
    for consumed in range(counts[1] + 1):  # the batch after `consumed` fetched: one ahead, as Lightning's fetcher is
        straight.append(next(batches))
        if consumed in counts:
            states[consumed] = first.stream.state(consumed)

    results = {"device": device_name(), "model": args.model, "batch_size": args.batch_size,
               "shuffle_buffer_tokens": args.shuffle_buffer_tokens}
    for consumed in counts:
        saved = io.BytesIO()
        torch.save(states[consumed], saved)
        resumed = datamodule()
        resumed.resume_state = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
        start = clock()
        batch = next(resumed.training_batches())
        from_fill = clock() - start
        assert torch.equal(batch, straight[consumed]), "the resumed stream must continue exactly"
        replayed = datamodule()
        replayed.resume_batches = consumed
        start = clock()
        batch = next(replayed.training_batches())
        replay = clock() - start
        assert torch.equal(batch, straight[consumed])
        results[f"after_{consumed}"] = {"from_fill_s": round(from_fill, 2), "replay_s": round(replay, 2),
                                        "state_mb": round(len(saved.getvalue()) / 2**20, 2)}
        print(f"resume after {consumed:3d} batches ({consumed * args.batch_size:,} tokens): from the buffer fill "
              f"{from_fill:6.2f} s, replaying {replay:6.2f} s; stream state {len(saved.getvalue()) / 2**20:.1f} MB")
    low, high = (results[f"after_{c}"] for c in counts)
    results["ratio_4n_over_n"] = {"from_fill": round(high["from_fill_s"] / low["from_fill_s"], 2),
                                  "replay": round(high["replay_s"] / low["replay_s"], 2)}
    print(f"resume time at 4N / at N: from the buffer fill {results['ratio_4n_over_n']['from_fill']:.2f}×, "
          f"replaying {results['ratio_4n_over_n']['replay']:.2f}× (on {device_name()})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
