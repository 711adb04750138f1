"""Would a prefetch thread (issue "Speed", item 4) help here? The LM's truncated forward and the default SA-GSAE step,
each timed at half and at all of this machine's threads, in one process.

    python -m benchmarks.prefetch_overlap

On a machine with T threads, overlapping the next batch's LM forward with the SAE step (each on half the cores)
takes max(LM at T/2, SAE at T/2) per batch; taking turns, as `fit` does, takes LM at T + SAE at T. The ratio
printed is the first over the second: below 1, a prefetch thread would pay. Written for 2 cores (T/2 = 1).
"""

from __future__ import annotations

import itertools
import json

import torch

from benchmarks import alternating_medians, device_name
from benchmarks.sae_step import training_step
from datamodules import LMActivationDataModule
from sagsae.saes import build_sae


def main() -> None:
    data = LMActivationDataModule(model="embedded:smollm2-135m", hookpoint="mlp_out", layer=15)
    data.load_language_model(torch.device("cpu"))
    contexts = list(itertools.islice(data.lm.contexts(data.documents(validation=False)), data.hparams.lm_batch_size))
    tokens = torch.tensor(contexts)
    x = torch.randn(4096, 576)
    sae = build_sae("sagsae", d_in=576, width=4608, theta_init_quantile=0.9)
    sae.initialize_from_batch(x)
    step = training_step(sae, x)
    full = torch.get_num_threads()
    half = max(1, full // 2)
    seconds = {}
    for threads in (half, full):
        torch.set_num_threads(threads)
        timing = alternating_medians({"lm": lambda: data.lm.reader(tokens), "sae": step}, rounds=5)
        seconds[threads] = {"lm_forward_per_batch_s": timing["lm"] * len(x) / tokens.numel(),
                            "sae_step_s": timing["sae"]}
    taking_turns = sum(seconds[full].values())
    overlapped = max(seconds[half].values())
    print(f"SmolLM2-135M mlp_out layer 15 and SA-GSAE width 4608, batch {len(x)}, {device_name()}")
    print(json.dumps(seconds, indent=1))
    print(f"per batch: taking turns on {full} threads {taking_turns:.2f} s, overlapped on {half} each "
          f"{overlapped:.2f} s; overlapped / taking turns {overlapped / taking_turns:.2f}")


if __name__ == "__main__":
    main()
