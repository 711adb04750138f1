"""One SAE training step (forward, loss, backward, Adam) per architecture, against the matmul floor.

    python -m benchmarks.sae_step [--d_in 576 --width 4608 --batch 4096 --repeats 5 --json out.json]
                                  [--autocast bf16]      # on the GPU when one is present

The floor is the bare encoder and decoder matmuls, forward and backward, in plain torch: what any SAE of
this width must compute. Ratios are floor time / step time (1.0 = at the floor), measured in this process: every
step, ours and the peers', is taken in turn for `--repeats` rounds and each figure is its median, so that the
machine's drift and a stray slow call reach them all alike.
Where SAELens (`pip install sagsae[bench]`) or sparsify (eai-sparsify) import, their training steps for the
same architecture, width and batch run too (forward with their losses, backward, Adam), and the last line
gives our speed-up over each: SA-GSAE is set against SAELens's Gated step, TopK against sparsify's. SA-GSAE and
Gated also run started at about 1% density (`name@1%`), decoded densely and from the non-zero codes alone
(`name@1%:sparse`, `sparse_decode_below`).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import add_step_shape_arguments, DEVICE, alternating_medians, device_name
from sagsae.saes import SAE_REGISTRY, SparseAutoencoder, build_sae, sae_class

K = 64  # active latents of the TopK family, ours and the peers'


def floor_step(x: torch.Tensor, width: int):
    encoder = torch.randn(width, x.shape[1], device=x.device, requires_grad=True)
    decoder = torch.randn(x.shape[1], width, device=x.device, requires_grad=True)

    def step():
        codes = torch.relu(x @ encoder.T)
        ((codes @ decoder.T - x) ** 2).sum().backward()
        encoder.grad = decoder.grad = None
    return step


def sae_step(name: str, x: torch.Tensor, width: int):
    sae = build_sae(name, d_in=x.shape[1], width=width, **({"k": K} if sae_class(name).k_sparse else {})).to(x.device)
    sae.initialize_from_batch(x)
    return training_step(sae, x)


# Starts at which about 1% of the codes are non-zero, the density of the default SA-GSAE at L0 ≈ 46 of 4,608
SPARSE_STARTS = {"sagsae": {"theta_init_quantile": 0.99}, "gated": {"gate_init_quantile": 0.99}}


def density_step(name: str, x: torch.Tensor, width: int, sparse_decode_below: float | None):
    """A step of `name` started at about 1% density (SPARSE_STARTS), decoded densely (None) or from the non-zero
    codes alone (1.0)."""
    sae = build_sae(name, d_in=x.shape[1], width=width, **SPARSE_STARTS[name]).to(x.device)
    sae.initialize_from_batch(x)
    sae.sparse_decode_below = sparse_decode_below
    return training_step(sae, x)


def training_step(sae: SparseAutoencoder, x: torch.Tensor, sparsity_coefficient: float = 1.0):
    """One bare step of `sae` on `x`: loss, backward, the SAE's gradient projections, Adam, its after-step
    projections (no dead latents)."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(sae.width, dtype=torch.bool, device=x.device)

    def step():
        out = sae.loss(x, sparsity_coefficient, dead=dead)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return step


SAELENS = {"relu": "Standard", "gated": "Gated", "jumprelu": "JumpReLU", "topk": "TopK", "batchtopk": "BatchTopK",
           "abstopk": "AbsTopK"}  # our architecture → SAELens's <name>TrainingSAE


def saelens_step(name: str, x: torch.Tensor, width: int):
    """SAELens's training forward pass (its own losses) with backward and Adam; None if not installed."""
    try:
        import sae_lens
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    prefix = SAELENS[name]
    config_class = getattr(sae_lens, f"{prefix}TrainingSAEConfig")
    options = {"k": K} if "TopK" in prefix else {}
    sae = getattr(sae_lens, f"{prefix}TrainingSAE")(config_class(d_in=x.shape[1], d_sae=width, **options)).to(x.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    coefficients = {key: 1.0 for key in sae.get_coefficients()}
    step_input = TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=torch.zeros(width, dtype=torch.bool, device=x.device),
                                n_training_steps=0, is_logging_step=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        sae.training_forward_pass(step_input).loss.backward()
        optimizer.step()
    return step


def sparsify_step(x: torch.Tensor, width: int):
    """sparsify's TopK SparseCoder (k = 64, unit-norm decoder kept as its trainer does); None if not installed."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=width, k=K), device=x.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=torch.zeros(width, dtype=torch.bool, device=x.device))
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_arguments(parser, "repeats")
    parser.add_argument("--autocast", choices=["bf16"], help="run every step (the floor's too) under bf16 autocast")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=DEVICE)
    steps = {"floor": floor_step(x, args.width)} | {name: sae_step(name, x, args.width) for name in SAE_REGISTRY}
    for name in SPARSE_STARTS:
        steps |= {f"{name}@1%": density_step(name, x, args.width, None),
                  f"{name}@1%:sparse": density_step(name, x, args.width, 1.0)}
    steps |= {f"saelens:{name}": saelens_step(name, x, args.width) for name in SAELENS}
    steps["sparsify:topk"] = sparsify_step(x, args.width)
    rows = alternating_medians({name: step for name, step in steps.items() if step is not None}, args.repeats,
                               autocast=args.autocast == "bf16")
    floor = rows["floor"]
    device = device_name()
    print(f"d_in {args.d_in}, width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads, {device}, "
          f"{'bf16 autocast' if args.autocast else 'fp32'}")
    print(f"{'step':<18} {'ms':>10} {'tokens/s':>12} {'floor/step':>11}")
    for name, seconds in rows.items():
        print(f"{name:<18} {seconds * 1e3:>10.1f} {args.batch / seconds:>12,.0f} {floor / seconds:>11.2f}")
    ours = [name for name in rows if name != "floor" and ":" not in name]
    print("ratios vs floor: " + ", ".join(f"{name} {floor / rows[name]:.2f}" for name in ours))
    pairs = [(name, f"saelens:{name}") for name in SAELENS] + [("sagsae", "saelens:gated"), ("topk", "sparsify:topk")]
    pairs += [(f"{name}@1%:sparse", f"{name}@1%") for name in SPARSE_STARTS]  # the sparse decode at 1% density
    pairs += [("sagsae@1%:sparse", "saelens:gated")]
    speedups = [f"{ours_} vs {theirs} {rows[theirs] / rows[ours_]:.2f}×" for ours_, theirs in pairs if theirs in rows]
    if speedups:
        print("speed-up: " + ", ".join(speedups))
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None}, "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
