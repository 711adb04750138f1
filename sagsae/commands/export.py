"""`python -m sagsae export --ckpt_path CKPT --out FOLDER`: a trained SAE in SAELens's v6 folder layout, with its
run's metadata, firing frequencies and a model card (see sagsae.formats.serialization). `--split_signs` writes a signed
SAE (SA-GSAE, AbsTopK) as the exactly equivalent unsigned SAE of twice the width (sagsae.formats.split_signs), for tools
that count only positive codes."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datamodules.hookpoints import transformer_lens_name
from sagsae.formats.serialization import export, read_checkpoint, sae_from_checkpoint


def export_checkpoint(ckpt_path: str | Path, out: str | Path, split_signs: bool = False) -> Path:
    """Export the SAE of a training checkpoint (`last.ckpt`), with its run's metadata and a model card."""
    state = read_checkpoint(ckpt_path)
    sae = sae_from_checkpoint(state)
    activations = state.get("activations") or {}
    layer, hookpoint, target = (activations.get(key) for key in ("layer", "hookpoint", "target_hookpoint"))
    metadata = {
        "model_name": activations.get("model"),
        "hook_name": transformer_lens_name(hookpoint, layer) if hookpoint else None,
        **({"hook_name_out": transformer_lens_name(target, layer)} if target else {}),
        "hook_layer": layer,
        "dataset_path": activations.get("dataset"),
        "context_size": activations.get("context_length"),
        "training_tokens": int(state["state_dict"].get("state.tokens_seen", torch.tensor(0))),
        "global_step": state.get("global_step"),
        "normalization_scalar_folded": float(sae.input_scale),
        **({"target_normalization_scalar_folded": float(sae.output_scale)} if sae.is_transcoder else {}),
        "sagsae_architecture": sae.architecture,
        "sagsae_config": sae.config(),
    }
    if split_signs:
        metadata["sagsae_split_signs"] = (f"latent i < {sae.width} is the positive part of signed latent i, latent "
                                          f"{sae.width} + i its negative part's magnitude")
    card = model_card(sae, metadata, state.get("sae_metrics", {}), split_signs)
    return export(sae, out, metadata, state["state_dict"].get("state.dead_latents.firing_frequency"), card, split_signs)


def model_card(sae, metadata: dict, metrics: dict, split_signs: bool = False) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in metadata.items())
    shown = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (none recorded) | |"
    split = (f" Split signs: written as an unsigned SAE of width {2 * sae.width} whose codes are all ≥ 0 (latent i "
             f"is signed latent i's positive part, latent {sae.width} + i its negative part), with the same "
             f"reconstructions; `import sagsae.formats.saelens` before SAELens loads it." if split_signs else "")
    kind = (f"{'skip-' if sae.W_skip is not None else ''}transcoder, width {sae.width}, on "
            f"{metadata.get('model_name')} {metadata.get('hook_name')} → {metadata.get('hook_name_out')}"
            if sae.is_transcoder else f"SAE, width {sae.width}, on {metadata.get('model_name')} {metadata.get('hook_name')}")
    return (f"# {sae.architecture} {kind}\n\nTrained with sagsae.{split} Load with `sagsae.load(folder)` (torch only) or "
            f"`sae_lens.SAE.load_from_disk(folder)` (shared architectures). Inputs are raw activations: the "
            f"normalization scalar is folded into the weights.\n\n| field | value |\n|---|---|\n{rows}\n\n"
            f"## Latest metrics at export\n\n| metric | value |\n|---|---|\n{shown}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagsae export", description=__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a training checkpoint, e.g. .../checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--split_signs", action="store_true",
                        help="write a signed SAE as the equivalent unsigned one of twice the width")
    args = parser.parse_args(argv)
    try:
        folder = export_checkpoint(args.ckpt_path, args.out, args.split_signs)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"export failed: {error}\n")
    print(f"Exported to {folder}")
