"""Is bf16-mixed harmless? Every architecture trained twice through `fit` on the same cached activations and
from the same seed, once in fp32 and once in bf16-mixed; the held-out R² and L0 of `validate` side by side.

    python -m benchmarks.precision_compare --cache cache/smollm2_l15_attn_out_v10 [--steps 500 --width 1152 --batch 2048]
    python -m benchmarks.precision_compare --cache … --architectures default gated --steps 2000 --validate_every 250
    python -m benchmarks.precision_compare --cache … --architectures default gated --compare sparse_decode
    python -m benchmarks.precision_compare --cache … --architectures default --steps 4000 --validate_every 500 --target_l0 40

The goal's 500 steps are shorter than SA-GSAE's and Gated's own seed spread can resolve (docs/performance.md,
"Mixed precision"); a longer budget with `--validate_every` shows whether the two precisions part as training
goes on, and `--seed` gives the fp32 runs' spread to read a gap against.

The goal (issue "Speed"): |ΔR²| ≤ 0.003 and |ΔL0| ≤ 3% for every architecture. `--compare sparse_decode` trains
the same pairs in fp32, decoded densely and from the non-zero codes alone (`sparse_decode_below` 1.0): the same
math, so their held-out R² and L0 should agree within float rounding. Each architecture trains with its
own config (configs/<name>.yaml, warmups shortened to the budget); `--target_l0` steers λ to an L0, so that
the comparison is made at the end of a run that settles there (docs/method.md, "Asking for an L0"). Runs on the
GPU where there is one; on CPU, bf16-mixed is what `--trainer.precision bf16-mixed` gives (autocast to bf16 where
the CPU supports it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L

from benchmarks import DEVICE, device_name
from benchmarks.zoo_short_runs import ARCHITECTURES, short_run_config
from callbacks import SAEMetrics
from datamodules import ActivationFileDataModule
from lightning_modules import SAEModule

# what each comparison trains twice: variant → (Lightning precision, the SAE module's overrides)
COMPARISONS = {"precision": {"32-true": ("32-true", {}), "bf16-mixed": ("bf16-mixed", {})},
               "sparse_decode": {"dense": ("32-true", {"sparse_decode_below": None}),
                                 "sparse": ("32-true", {"sparse_decode_below": 1.0})}}
R2_TOLERANCE, L0_TOLERANCE = 0.003, 0.03


class HeldOutTrace(L.Callback):
    """The held-out R² and L0 at every validation during `fit`: whether the two precisions part as training goes
    on, and whether the budget has stopped moving them."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.points.append({"step": trainer.global_step, "r2": float(metrics["val/r2"]),
                                "l0": float(metrics["val/l0"])})


def late_mean(trace: list[dict[str, float]]) -> dict[str, float] | None:
    """Mean held-out R² and L0 over the trace's second half: where a run jitters along a plateau, one final point
    can land anywhere in its jitter, and the plateau's mean is the figure to compare."""
    late = trace[len(trace) // 2:]
    if not late:
        return None
    return {key: sum(point[key] for point in late) / len(late) for key in ("r2", "l0")}


def train_and_validate(name: str, precision: str, args: argparse.Namespace, overrides: dict | None = None) -> dict:
    sae_class, init_args = short_run_config(name, args.steps, args.width)
    if args.target_l0:
        init_args["target_l0"] = args.target_l0
    L.seed_everything(args.seed)
    module = SAEModule.from_arguments(sae_class, **init_args, **(overrides or {}))
    data = ActivationFileDataModule(args.cache, batch_size=args.batch, val_tokens=args.val_tokens, seed=args.seed)
    trace = HeldOutTrace()
    validation = ({"val_check_interval": args.validate_every, "check_val_every_n_epoch": None}
                  if args.validate_every else {"limit_val_batches": 0})
    trainer = L.Trainer(max_steps=args.steps, precision=precision, accelerator=DEVICE.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[SAEMetrics(), trace],
                        **validation)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    validator = L.Trainer(precision=precision, accelerator=DEVICE.type, devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[SAEMetrics()])
    metrics = validator.validate(module, data, verbose=False)[0]
    for point in trace.points:
        print(f"  {name} {precision} {overrides or ''} step {point['step']}: R² {point['r2']:.4f}, "
              f"L0 {point['l0']:.2f}", flush=True)
    return {"r2": metrics["val/r2"], "l0": metrics["val/l0"], "fit_seconds": seconds, "trace": trace.points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a `sagsae cache` folder")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--val_tokens", type=int, default=32_768)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order (another seed gives the "
                                                            "fp32 runs' own spread, against which to read a gap)")
    parser.add_argument("--validate_every", type=int, default=0,
                        help="also validate every N steps during fit and print the trace (0: only at the end)")
    parser.add_argument("--target_l0", type=float, help="steer λ to this L0 (`model.target_l0`; λ-sparse "
                                                          "architectures only): a run that settles, to compare at its end")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="precision",
                        help="fp32 against bf16-mixed, or the dense decode against the sparse one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"{device_name()}: seed {args.seed}, {args.steps} steps of {args.batch} tokens, width {args.width}, "
          f"{args.cache}", flush=True)
    results, passed = {}, True
    for name in args.architectures:
        runs = {variant: train_and_validate(name, precision, args, overrides)
                for variant, (precision, overrides) in COMPARISONS[args.compare].items()}
        full, mixed = runs.values()  # the reference, then the variant under test
        r2_gap = mixed["r2"] - full["r2"]
        l0_gap = (mixed["l0"] - full["l0"]) / max(full["l0"], 1e-9)
        ok = abs(r2_gap) <= R2_TOLERANCE and abs(l0_gap) <= L0_TOLERANCE
        passed &= ok
        results[name] = {**runs, "r2_gap": r2_gap, "l0_relative_gap": l0_gap, "within_goal": ok}
        print(f"{name:<10} R² {full['r2']:.4f} → {mixed['r2']:.4f} ({r2_gap:+.4f})  L0 {full['l0']:.2f} → "
              f"{mixed['l0']:.2f} ({l0_gap:+.1%})  fit {full['fit_seconds']:.0f} s → {mixed['fit_seconds']:.0f} s  "
              f"{'within' if ok else 'OUTSIDE'} the goal", flush=True)
        late = {variant: late_mean(run["trace"]) for variant, run in runs.items()}
        late_full, late_mixed = late.values()
        if late_full and late_mixed:
            results[name]["late_mean"] = late
            print(f"{'':<10} the trace's second half, mean: R² {late_full['r2']:.4f} → {late_mixed['r2']:.4f} "
                  f"({late_mixed['r2'] - late_full['r2']:+.4f})  L0 {late_full['l0']:.2f} → {late_mixed['l0']:.2f} "
                  f"({(late_mixed['l0'] - late_full['l0']) / late_full['l0']:+.1%})", flush=True)
    print(f"goal |ΔR²| ≤ {R2_TOLERANCE}, |ΔL0| ≤ {L0_TOLERANCE:.0%}: {'met' if passed else 'missed'} for every "
          f"architecture" if passed else f"goal missed for {[n for n, r in results.items() if not r['within_goal']]}")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
