"""Export to SAELens's v6 disk format and load with torch alone (`sagsae.load`).

A folder holds `sae_weights.safetensors`, `cfg.json`, `sparsity.safetensors` (log10 firing frequency) and a
`README.md` model card. The normalization scalar is folded into the weights, so exported SAEs take raw
activations. Each architecture writes and reads its own tensors (`SparseAutoencoder.to_saelens` /
`from_saelens`); this module only handles folders and training checkpoints.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sagsae.saes import SparseAutoencoder, build_sae, sae_class_for_saelens
from sagsae.formats.split_signs import SPLIT_SUFFIX, SplitSigns, split_decoder
from sagsae.formats.staging import staged_folder
from sagsae.formats.transcoders import load_transcoder_tensors, transcoder_architecture, transcoder_layout
from sagsae.training.migrations import FIT_SAE_PREFIX, migrate_checkpoint

WEIGHTS, CONFIG, SPARSITY, CARD = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "README.md"


def export(sae: SparseAutoencoder, out: str | Path, metadata: dict | None = None,
           firing_frequency: Tensor | None = None, card: str = "", split_signs: bool = False) -> Path:
    """Write the folder atomically: everything goes to a temporary folder that is renamed at the end. With
    `split_signs`, a signed SAE is written as its unsigned form of twice the width (sagsae.formats.split_signs); its
    firing frequencies per sign are not known from training, so no sparsity file is written for it."""
    out = Path(out)
    if split_signs and sae.is_transcoder:
        raise ValueError("--split_signs is for autoencoders: SAELens has no transcoder class that a signed "
                         "transcoder's split form fits (its transcoders are ReLU and JumpReLU ones); export it "
                         "without --split_signs and load it with sagsae.load")
    if split_signs and not sae.signed_codes:
        raise ValueError(f"--split_signs needs a signed SAE (SA-GSAE, AbsTopK); {sae.architecture}'s codes are "
                         f"already ≥ 0")
    for name, parameter in sae.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ValueError(f"Refusing to export: parameter {name!r} has non-finite values")
    if not math.isfinite(float(sae.input_scale)):
        raise ValueError("Refusing to export: the normalization scalar was never estimated (input_scale is NaN)")
    tensors, architecture_cfg = saelens_layout(sae)
    width = sae.width
    if split_signs:
        tensors["W_dec"] = split_decoder(tensors["W_dec"], dim=0)
        architecture_cfg["architecture"] += SPLIT_SUFFIX
        width, firing_frequency = 2 * sae.width, None
    metadata = dict(metadata or {})
    if sae.nesting is not None and not split_signs:  # the split form's latents i and H + i are no prefix
        metadata["matryoshka"] = sae.matryoshka_config()
    cfg = {"d_in": sae.d_in, "d_sae": width, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", **architecture_cfg,
           "metadata": metadata}
    with staged_folder(out) as staging:
        save_file(tensors, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(cfg, indent=2))
        if firing_frequency is not None:
            log_density = firing_frequency.float().clamp(min=1e-10).log10().cpu()
            save_file({"sparsity": log_density}, str(staging / SPARSITY))
        (staging / CARD).write_text(card)
    return out


def saelens_layout(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and architecture cfg fields an export writes: the architecture's SAELens layout, and a
    transcoder's additions (sagsae.formats.transcoders)."""
    tensors, architecture_cfg = sae.to_saelens()
    if sae.is_transcoder:
        tensors, architecture_cfg = transcoder_layout(sae, tensors, architecture_cfg)
    return tensors, architecture_cfg


def load(folder: str | Path) -> SparseAutoencoder | SplitSigns:
    """A torch `nn.Module` with encode/decode/forward on raw activations, from a folder written by `export`
    (a split-sign export gives the SplitSigns form) or saved by SAELens (standard, gated, jumprelu, topk, and
    the transcoder, skip_transcoder, jumprelu_transcoder and jumprelu_skip_transcoder)."""
    folder = Path(folder)
    for required in (CONFIG, WEIGHTS):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing: is {folder} an exported SAE folder?")
    cfg = json.loads((folder / CONFIG).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    architecture = str(cfg.get("architecture"))
    if architecture.endswith(SPLIT_SUFFIX):
        signed_cfg = {**cfg, "architecture": architecture.removesuffix(SPLIT_SUFFIX), "d_sae": int(cfg["d_sae"]) // 2}
        signed_tensors = {**tensors, "W_dec": tensors["W_dec"][:signed_cfg["d_sae"]]}
        return SplitSigns(sae_from_saelens_layout(signed_cfg, signed_tensors)).eval()
    return sae_from_saelens_layout(cfg, tensors).eval()


def sae_from_saelens_layout(cfg: dict[str, Any], tensors: dict[str, Tensor]) -> SparseAutoencoder:
    architecture, transcoder = transcoder_architecture(str(cfg.get("architecture")))
    if transcoder is not None and int(cfg.get("d_out", cfg["d_in"])) != int(cfg["d_in"]):
        raise ValueError(f"A transcoder from d_in={cfg['d_in']} to d_out={cfg['d_out']}: sagsae's transcoders map "
                         f"between hookpoints of one size")
    sae = sae_class_for_saelens(architecture).from_saelens({**cfg, "architecture": architecture}, tensors)
    if transcoder is not None:
        sae.make_transcoder(**transcoder)
        load_transcoder_tensors(sae, tensors)
    levels = (cfg.get("metadata") or {}).get("matryoshka")
    if levels is not None:
        sae.make_matryoshka(**levels)
    return sae


def unsafe_checkpoint_message(error: pickle.UnpicklingError, name: str = "the checkpoint") -> str | None:
    """One line for a checkpoint that torch.load(weights_only=True) refused because its pickle holds objects
    beyond tensors and plain data (None for any other unpickling error)."""
    if "Weights only load failed" not in str(error):
        return None
    reasons = [line.strip().rstrip(".") for line in str(error).splitlines() if "nsupported" in line]
    refused = reasons[0] if reasons else "objects beyond tensors"
    return (f"Refusing to open {name}: it holds more than tensors and plain data ({refused}), and unpickling it "
            f"could run code. Open only checkpoints you trust; share SAEs as `sagsae export` folders (safetensors)")


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A sagsae training checkpoint's contents in the current layout (sagsae.training.migrations), with errors
    that name the file.

    It is read with `torch.load(weights_only=True)`: tensors and plain data only, which is all that `fit` and
    `sweep` write, so that a checkpoint from someone else cannot run code when it is opened."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt_path} does not exist")
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refusal = unsafe_checkpoint_message(error, str(ckpt_path))
        raise ValueError(refusal or f"Could not read checkpoint {ckpt_path}: {error}") from None
    except Exception as error:  # a truncated or foreign file: say which and why
        raise ValueError(f"Could not read checkpoint {ckpt_path}: {error}") from error
    if not isinstance(state, dict) or "state_dict" not in state or not ("sae" in state or "sweep_members" in state):
        raise ValueError(f"{ckpt_path} is not a sagsae training checkpoint (it has no 'sae' entry)")
    return migrate_checkpoint(state)


def sae_from_checkpoint(state: dict[str, Any]) -> SparseAutoencoder:
    """The trained SAE of a checkpoint read by `read_checkpoint`, with its normalization scalar."""
    if "sae" not in state:
        raise ValueError(f"This is a sweep's checkpoint, which holds several SAEs ({', '.join(state['sweep_members'])}): "
                         f"each member's results.json names its own `fit`-style export")
    return sae_from_spec(state["sae"], state["state_dict"])


def sae_from_spec(spec: dict[str, Any], state_dict: dict[str, Any], prefix: str = FIT_SAE_PREFIX) -> SparseAutoencoder:
    """An SAE rebuilt from its recorded spec (architecture, config, transcoder, Matryoshka levels) and the entries
    of `state_dict` under `prefix`: a `fit` checkpoint's "state.sae.", a sweep member's "members.<name>.sae."."""
    sae = build_sae(spec["architecture"], **spec["config"])
    if spec.get("transcoder") is not None:
        sae.make_transcoder(**spec["transcoder"])
    if spec.get("matryoshka") is not None:
        sae.make_matryoshka(**spec["matryoshka"])
    sae.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)})
    return sae
