"""Short runs of every architecture's config on the same cached activations: held-out L0, R², dead fraction.

    python -m benchmarks.zoo_short_runs --steps 200 --activations /tmp/acts_mlp_out.pt

Activations come from `--activations` (a torch file with "train" and "val" tensors, as written by
`--save`) or are computed live from the default config's datamodule. Each architecture trains with its own
config's coefficients (configs/<name>.yaml), overriding only the schedule lengths for the short budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from callbacks import SAEMetrics
from datamodules import LMActivationDataModule, TensorActivationDataModule
from datamodules.activation_stream import take_tokens
from lightning_modules import SAEModule
from sagsae.commands.sweep import import_class

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARCHITECTURES = ("default", "gated", "relu", "jumprelu", "topk", "batchtopk", "abstopk")


def model_config(name: str) -> tuple[type, dict]:
    """(SAE class, its init_args and the config's training arguments as one flat set) of configs/<name>.yaml."""
    config = dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])
    sae = config.pop("sae")
    return import_class(sae["class_path"]), {**(sae.get("init_args") or {}), **config}


def short_run_config(name: str, steps: int, width: int | None = None) -> tuple[type, dict]:
    """`model_config`, with the warmups shortened to fit `steps` (half for λ, a tenth for the LR) and the width
    overridden where given."""
    sae_class, init_args = model_config(name)
    init_args.update(sparsity_warmup_steps=min(init_args.get("sparsity_warmup_steps", 200), steps // 2),
                     lr_warmup_steps=min(init_args.get("lr_warmup_steps", 50), steps // 10))
    if width:
        init_args["width"] = width
    return sae_class, init_args


def live_activations(tokens: int, val_tokens: int, hookpoint: str) -> dict[str, torch.Tensor]:
    data = LMActivationDataModule(hookpoint=hookpoint, layer=15, val_tokens=val_tokens)
    data.setup()
    return {"train": take_tokens(data.training_chunks(), tokens), "val": data.held_out_rows()}


def evaluate(module, val: torch.Tensor) -> dict[str, float]:
    sae = module.sae.eval()
    with torch.no_grad():
        x = sae.normalize(val)
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    return {
        "l0": float((codes != 0).sum(1).float().mean()),
        "r2": float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "dead_train_window": float(module.state.dead_latents.dead_mask().float().mean()),
        "silent_on_val": float(((codes != 0).sum(0) == 0).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", type=Path)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--hookpoint", default="mlp_out")
    parser.add_argument("--tokens", type=int, default=160_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    activations = torch.load(args.activations) if args.activations else live_activations(args.tokens, 16_384, args.hookpoint)
    if args.save:
        torch.save(activations, args.save)
    results = {}
    for name in args.architectures:
        sae_class, init_args = short_run_config(name, args.steps, args.width)
        L.seed_everything(0)
        module = SAEModule.from_arguments(sae_class, **init_args)
        trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                            callbacks=[SAEMetrics()])
        start = time.perf_counter()
        trainer.fit(module, TensorActivationDataModule(activations["train"], batch_size=4096))
        results[name] = evaluate(module, activations["val"]) | {"seconds": time.perf_counter() - start}
        print(f"{name:<10} " + "  ".join(f"{k} {v:.4g}" for k, v in results[name].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
