"""Peak memory of one sweep step and one validation, against the number of members, on CPU.

    python -m benchmarks.memory [--d 256 --width 2048 --batch 1024 --members 1 2 4 8 --json out.json]
    python -m benchmarks.memory --predict configs/sweeps/paper_pythia1b.yaml --predict_d 2048

Each point runs in a fresh process: a sweep of N SA-GSAE members trains 3 steps through `Trainer.fit` on random
activations, then validates once. Memory is the process's resident set (Linux /proc): "resting" after the
second step (weights, gradients freed, Adam state), and the high-water mark above it during the third step and
during the validation (the peak is reset before each with /proc/self/clear_refs). A sweep back-propagates member
by member, so the step's peak should grow with N by the members' gradients only (one member's activations are
alive at a time); `--predict` extrapolates the measured per-member and per-activation costs to the sweep configs named
(members counted on the meta device at `--predict_d`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 2**20
# glibc keeps freed heap memory in the resident set: with every block over 64 KiB mapped on its own, a freed
# tensor leaves it at once, so the resident set follows the live tensors.
UNCACHED_MALLOC = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def resident_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def in_fresh_process(arguments: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.memory", *arguments]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=UNCACHED_MALLOC).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(d: int, width: int, batch: int, members: int) -> dict[str, float]:
    """One point, in this process (run it in a fresh one)."""
    import lightning as L
    import torch

    from datamodules import TensorActivationDataModule
    from lightning_modules import SweepModule

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.values: dict[str, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:
                self.values["resting"] = resident_bytes("VmRSS")
                reset_peak()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 2:
                self.values["step_peak"] = resident_bytes("VmHWM") - self.values["resting"]

        def on_validation_start(self, trainer, pl_module) -> None:
            self.values["validation_resting"] = resident_bytes("VmRSS")
            reset_peak()

        def on_validation_end(self, trainer, pl_module) -> None:
            self.values["validation_peak"] = resident_bytes("VmHWM") - self.values["validation_resting"]

    torch.manual_seed(0)
    data = torch.randn(4 * batch, d)
    from sagsae.training import TrainingPlan

    sweep = SweepModule({f"m{i}": TrainingPlan.from_arguments("sagsae", width=width, init_seed=i, theta_init_quantile=0.9)
                         for i in range(members)}, gradient_clip_val=1.0)
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[probe])
    trainer.fit(sweep, TensorActivationDataModule(data, data[:batch], batch_size=batch))
    parameters = sum(p.numel() * p.element_size() for p in next(iter(sweep.members.values())).parameters())
    return {**probe.values, "member_parameter_bytes": parameters}


def predict(config_path: Path, d: int, resting_ratio: float, step_ratio: float, per_code: float) -> dict:
    """A sweep config's memory for one cell from the measured costs: every member's weights, Adam state and
    gradients (ratios × its parameter bytes, counted on the meta device), and the largest member's activations."""
    import torch
    import yaml

    from lightning_modules import SAEModule
    from sagsae.commands.sweep import expand_members

    config = yaml.safe_load(config_path.read_text())
    batch = next(iter(config["cells"].values()))["init_args"]["batch_size"]
    parameter_bytes, widths = 0, []
    for spec in expand_members(config["members"]).values():
        with torch.device("meta"):
            member = SAEModule.from_arguments(spec["sae"], d_in=d, **spec["init_args"])
        parameter_bytes += sum(p.numel() * 4 for p in member.sae.parameters())  # fp32
        widths.append(member.sae.width)
    total = (resting_ratio + step_ratio) * parameter_bytes + per_code * batch * max(widths)
    print(f"{config_path}: {len(widths)} members at d {d}, batch {batch}: {total / 2**30:.1f} GiB "
          f"(parameters {parameter_bytes / 2**30:.1f} GiB; weights, Adam state, gradients and the largest member's "
          f"activations; the LM and the shuffle buffer come on top)")
    return {"members": len(widths), "parameter_bytes": parameter_bytes, "predicted_bytes": total}


def concatenate_then_permute(chunks, batch_size: int, buffer_tokens: int, generator):
    """The shuffle buffer's definition, as the datamodules computed it before: the baseline of the buffer row."""
    import torch

    pending, filled = [], 0
    for chunk in chunks:
        pending.append(chunk)
        filled += len(chunk)
        if filled < buffer_tokens:
            continue
        pool = torch.cat(pending)
        pool = pool[torch.randperm(len(pool), generator=generator)]
        emitted = (len(pool) - buffer_tokens // 2) // batch_size * batch_size
        yield from pool[:emitted].split(batch_size)
        pending, filled = [pool[emitted:]], len(pool) - emitted


def measure_buffer(d: int, batch: int, buffer_tokens: int, baseline: bool) -> dict[str, float]:
    """Peak resident memory above the start while 4 buffers' worth of tokens stream through the shuffle buffer,
    in units of one buffer (buffer_tokens × d fp32)."""
    import torch

    from datamodules.activation_stream import shuffled_batches

    shuffle = concatenate_then_permute if baseline else shuffled_batches
    chunks = (torch.randn(4096, d) for _ in range(4 * buffer_tokens // 4096))
    resting = resident_bytes("VmRSS")
    reset_peak()
    for _ in shuffle(chunks, batch, buffer_tokens, torch.Generator().manual_seed(0)):
        pass
    return {"buffer_peak": (resident_bytes("VmHWM") - resting) / (buffer_tokens * d * 4)}


def slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--buffer_tokens", type=int, default=262_144)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one point, print JSON
    parser.add_argument("--one_buffer", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--predict", type=Path, nargs="*", default=[],
                        help="sweep configs whose memory to predict from the measured costs")
    parser.add_argument("--predict_d", type=int, default=2048, help="the activation size of their model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.d, args.width, args.batch, args.one)))
        return
    if args.one_buffer is not None:
        print(json.dumps(measure_buffer(args.d, args.batch, args.buffer_tokens, args.one_buffer == "baseline")))
        return
    common = ["--d", str(args.d), "--width", str(args.width), "--batch", str(args.batch),
              "--buffer_tokens", str(args.buffer_tokens)]
    points = {members: in_fresh_process([*common, "--one", str(members)]) for members in args.members}
    buffers = {kind: in_fresh_process([*common, "--one_buffer", kind])["buffer_peak"] for kind in ("ours", "baseline")}
    member_bytes = points[args.members[0]]["member_parameter_bytes"]
    print(f"SA-GSAE sweeps, d {args.d}, H {args.width}, batch {args.batch}, CPU, fp32; one member's parameters "
          f"{member_bytes / MIB:.1f} MiB")
    print(f"{'members':>8} {'resting MiB':>12} {'step peak above it':>19} {'validation peak':>16}")
    for members, point in points.items():
        print(f"{members:>8} {point['resting'] / MIB:>12.1f} {point['step_peak'] / MIB:>19.1f} "
              f"{point['validation_peak'] / MIB:>16.1f}")
    ns = list(points)
    resting_per_member = slope(ns, [p["resting"] for p in points.values()])
    step_per_member = slope(ns, [p["step_peak"] for p in points.values()])
    first = points[ns[0]]
    activations = first["step_peak"] - ns[0] * step_per_member  # one member's step activations (the intercept)
    print(f"per member: resting +{resting_per_member / member_bytes:.2f}× its parameters (weights and Adam's two "
          f"moments: 3×), step peak +{step_per_member / member_bytes:.2f}× (its gradients: 1×; its activations "
          f"would add {activations / member_bytes:.2f}× if they stayed alive)")
    per_code = activations / (args.batch * args.width)  # bytes of step activations per token × latent
    print(f"one member's step activations: {per_code:.1f} bytes per token × latent")
    predictions = {}
    for config in args.predict:
        predictions[str(config)] = predict(config, args.predict_d, resting_per_member / member_bytes,
                                           step_per_member / member_bytes, per_code)
    print(f"shuffle buffer of {args.buffer_tokens:,} tokens × d {args.d}: peak {buffers['ours']:.2f} buffers "
          f"(concatenate-then-permute baseline {buffers['baseline']:.2f}; ratio {buffers['ours'] / buffers['baseline']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k not in ("json", "predict", "one")}, "points": points,
                                         "per_member": {"resting": resting_per_member, "step_peak": step_per_member},
                                         "activations_per_code": per_code, "predictions": predictions,
                                         "shuffle_buffer_peak_in_buffers": buffers}, indent=2))


if __name__ == "__main__":
    main()
