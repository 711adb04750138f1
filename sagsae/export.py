"""Export to SAELens's v6 disk format and load with torch alone (`sagsae.load`).

A folder holds `sae_weights.safetensors`, `cfg.json`, `sparsity.safetensors` (log10 firing frequency) and a
`README.md` model card. The normalization scalar s (x_norm = s·x_raw) is folded into the weights, so exported
SAEs take raw activations: W_enc ← s·W_enc, b_dec ← b_dec/s, W_dec ← W_dec/s; biases and thresholds, which
live in code space, stay. Weights are stored in SAELens's layout (W_enc [d_in, d_sae], W_dec [d_sae, d_in]).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sagsae.saes import SparseAutoencoder, build_sae
from sagsae.staging import staged_folder

WEIGHTS, CONFIG, SPARSITY, CARD = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "README.md"

# our registry name → (SAELens architecture, {SAELens key: our attribute}); "W_enc"/"W_dec" are transposed
_LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    "relu": ("standard", {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}),
    "gated": ("gated", {"W_enc": "W_gate", "b_gate": "b_gate", "r_mag": "r_mag", "b_mag": "b_mag",
                        "W_dec": "W_dec", "b_dec": "b_dec"}),
    "jumprelu": ("jumprelu", {"W_enc": "W_enc", "b_enc": "b_enc", "threshold": "threshold", "W_dec": "W_dec",
                              "b_dec": "b_dec"}),
    "topk": ("topk", {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}),
    "abstopk": ("abstopk", {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}),
}
_SAGSAE_SWITCHES = ("sign_consistency", "one_sided_gate", "signed_magnitude", "gate_path")


def _folded(sae: SparseAutoencoder, name: str) -> Tensor:
    """Our parameter `name`, with the normalization scalar folded in."""
    value = getattr(sae, name).detach().float().cpu()
    scale = float(sae.input_scale)
    if name in ("W_enc", "W_gate"):
        return value * scale
    if name in ("W_dec", "b_dec"):
        return value / scale
    return value.clone()


def saelens_state(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict]:
    """(tensors, architecture-specific cfg fields) in SAELens's layout, normalization folded in."""
    def oriented(key: str, value: Tensor) -> Tensor:
        return value.T.contiguous() if key in ("W_enc", "W_dec") else value

    name = sae.architecture
    if name == "sagsae":
        theta_pos, theta_neg = (t.detach().float().cpu() for t in sae.thresholds())
        r_pos, r_neg = (t.detach().float().cpu() for t in sae.magnitude_rescales())
        tensors = {"W_enc": oriented("W_enc", _folded(sae, "W_gate")), "b_gate": _folded(sae, "b_gate"),
                   "b_mag": _folded(sae, "b_mag"), "r_pos": r_pos.clone(), "r_neg": r_neg.clone(),
                   "threshold_pos": theta_pos.clone(), "threshold_neg": theta_neg.clone(),
                   "W_dec": oriented("W_dec", _folded(sae, "W_dec")), "b_dec": _folded(sae, "b_dec")}
        return tensors, {"architecture": "sagsae"} | {s: getattr(sae, s) for s in _SAGSAE_SWITCHES}
    if name == "batchtopk":  # inference rule: a JumpReLU with the learned scalar threshold on every latent
        tensors = {key: oriented(key, _folded(sae, attr)) for key, attr in _LAYOUTS["topk"][1].items()}
        tensors["threshold"] = torch.full((sae.width,), float(sae.threshold.clamp(min=0)))
        return tensors, {"architecture": "jumprelu"}
    architecture, layout = _LAYOUTS[name]
    tensors = {key: oriented(key, _folded(sae, attr)) for key, attr in layout.items()}
    extra = {"k": sae.k} if name in ("topk", "abstopk") else {}
    return tensors, {"architecture": architecture} | extra


def export(sae: SparseAutoencoder, out: str | Path, metadata: dict | None = None,
           firing_frequency: Tensor | None = None, card: str = "") -> Path:
    """Write the folder atomically: everything goes to a temporary folder that is renamed at the end."""
    out = Path(out)
    for name, parameter in sae.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ValueError(f"Refusing to export: parameter {name!r} has non-finite values")
    if not math.isfinite(float(sae.input_scale)):
        raise ValueError("Refusing to export: the normalization scalar was never estimated (input_scale is NaN)")
    tensors, architecture_cfg = saelens_state(sae)
    cfg = {"d_in": sae.d_in, "d_sae": sae.width, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", **architecture_cfg,
           "metadata": metadata or {}}
    with staged_folder(out) as staging:
        save_file(tensors, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(cfg, indent=2))
        if firing_frequency is not None:
            log_density = firing_frequency.float().clamp(min=1e-10).log10().cpu()
            save_file({"sparsity": log_density}, str(staging / SPARSITY))
        (staging / CARD).write_text(card)
    return out


_FROM_SAELENS = {"standard": "relu", "gated": "gated", "jumprelu": "jumprelu", "topk": "topk",
                 "abstopk": "abstopk", "sagsae": "sagsae"}


def load(folder: str | Path) -> SparseAutoencoder:
    """A torch `nn.Module` with encode/decode/forward on raw activations, from a folder written by `export`
    or saved by SAELens (standard, gated, jumprelu, topk)."""
    folder = Path(folder)
    for required in (CONFIG, WEIGHTS):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing: is {folder} an exported SAE folder?")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("architecture") not in _FROM_SAELENS:
        raise ValueError(f"Unsupported architecture {cfg.get('architecture')!r}; supported: {sorted(_FROM_SAELENS)}")
    name = _FROM_SAELENS[cfg["architecture"]]
    tensors = load_file(str(folder / WEIGHTS))
    switches: dict = {}
    if name in ("topk", "abstopk"):
        switches["k"] = int(cfg["k"])
    if name == "sagsae":
        switches = {s: cfg[s] for s in _SAGSAE_SWITCHES if s in cfg} | {"tie_r": False, "tie_theta": False}
    sae = build_sae(name, d_in=int(cfg["d_in"]), width=int(cfg["d_sae"]), **switches)
    with torch.no_grad():
        if name == "sagsae":
            sae.W_gate.copy_(tensors["W_enc"].T)
            for key in ("b_gate", "b_mag", "r_pos", "r_neg", "W_dec", "b_dec"):
                getattr(sae, key).copy_(tensors[key].T if key == "W_dec" else tensors[key])
            for name_, key in zip(sae._threshold_names(), ("threshold_pos", "threshold_neg")):
                getattr(sae, name_).copy_(tensors[key])
        else:
            for key, attr in _LAYOUTS[name][1].items():
                getattr(sae, attr).copy_(tensors[key].T if key in ("W_enc", "W_dec") else tensors[key])
        sae.input_scale.fill_(1.0)
    return sae.eval()


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Export the SAE of a training checkpoint (`last.ckpt`), with its run's metadata and a model card."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt_path} does not exist")
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise ValueError(f"Could not read checkpoint {ckpt_path}: {error}") from error
    if not isinstance(state, dict) or "sae" not in state or "state_dict" not in state:
        raise ValueError(f"{ckpt_path} is not a sagsae training checkpoint (it has no 'sae' entry)")
    spec = state["sae"]
    sae = build_sae(spec["architecture"], d_in=spec["d_in"], width=spec["width"], **spec["switches"])
    weights = {k.removeprefix("sae."): v for k, v in state["state_dict"].items() if k.startswith("sae.")}
    sae.load_state_dict(weights)
    activations = state.get("activations") or {}
    layer, hookpoint = activations.get("layer"), activations.get("hookpoint")
    metadata = {
        "model_name": activations.get("model"),
        "hook_name": f"blocks.{layer}.hook_{hookpoint}" if hookpoint else None,
        "hook_layer": layer,
        "dataset_path": activations.get("dataset"),
        "context_size": activations.get("context_length"),
        "training_tokens": int(state["state_dict"].get("tokens_seen", torch.tensor(0))),
        "global_step": state.get("global_step"),
        "normalization_scalar_folded": float(sae.input_scale),
        "sagsae_architecture": spec["architecture"],
        "sagsae_switches": spec["switches"],
    }
    card = model_card(spec, metadata, state.get("sae_metrics", {}))
    return export(sae, out, metadata, state["state_dict"].get("firing_frequency"), card)


def model_card(spec: dict, metadata: dict, metrics: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in metadata.items())
    shown = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (none recorded) | |"
    return (f"# {spec['architecture']} SAE, width {spec['width']}, on {metadata.get('model_name')} "
            f"{metadata.get('hook_name')}\n\nTrained with sagsae. Load with `sagsae.load(folder)` (torch only) or "
            f"`sae_lens.SAE.load_from_disk(folder)` (shared architectures). Inputs are raw activations: the "
            f"normalization scalar is folded into the weights.\n\n| field | value |\n|---|---|\n{rows}\n\n"
            f"## Latest metrics at export\n\n| metric | value |\n|---|---|\n{shown}\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sagsae export", description=export_checkpoint.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a training checkpoint, e.g. .../checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="the folder to create")
    args = parser.parse_args(argv)
    try:
        folder = export_checkpoint(args.ckpt_path, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"export failed: {error}\n")
    print(f"Exported to {folder}")
