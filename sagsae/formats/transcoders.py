"""A transcoder's export folder: the SAELens layout of its architecture, plus what makes it a transcoder.

SAELens 6.54 has transcoder classes for two of the layouts we write: "standard" (our ReLU-L1) loads as its
Transcoder / SkipTranscoder and "jumprelu" (our JumpReLU and BatchTopK) as JumpReLUTranscoder /
JumpReLUSkipTranscoder. Those classes neither center their input nor take a source mean, so the source centering
is folded into b_enc: x W_enc + b_enc − m W_enc is exactly W_enc (x − m) + b_enc. Every other architecture
(SA-GSAE, Gated, the TopK family) is written under `<architecture>_transcoder` or `<architecture>_skip_transcoder`
with its source mean as a tensor, which `sagsae.load` reads and SAELens does not.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sagsae.saes import SparseAutoencoder

SAELENS_TRANSCODERS = {"standard": ("transcoder", "skip_transcoder"),
                       "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}
TRANSCODER_SUFFIX, SKIP_TRANSCODER_SUFFIX = "_transcoder", "_skip_transcoder"


def transcoder_layout(sae: SparseAutoencoder, tensors: dict[str, Tensor],
                      cfg: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A transcoder's tensors and cfg fields from its architecture's (`to_saelens`, whose decoder is already in
    the target's raw units): the skip connection in raw units (W_skip · s_source / s_target) and the source mean,
    folded into b_enc where SAELens has the class."""
    source_scale, target_scale = float(sae.input_scale), float(sae.output_scale)
    source_mean = sae.source_mean.detach().float().cpu() / source_scale
    skip = sae.W_skip is not None
    if skip:
        tensors["W_skip"] = sae.W_skip.detach().float().cpu() * (source_scale / target_scale)
    names = SAELENS_TRANSCODERS.get(cfg["architecture"])
    if names is not None:
        tensors["b_enc"] = tensors["b_enc"] - source_mean @ tensors["W_enc"]
        architecture = names[skip]
    else:
        tensors["source_mean"] = source_mean
        architecture = cfg["architecture"] + (SKIP_TRANSCODER_SUFFIX if skip else TRANSCODER_SUFFIX)
    return tensors, {**cfg, "architecture": architecture, "d_out": sae.d_in, "apply_b_dec_to_input": False}


def transcoder_architecture(architecture: str) -> tuple[str, dict[str, bool] | None]:
    """(the autoencoder layout's architecture, `make_transcoder`'s arguments) of an export's `architecture`;
    (architecture, None) for an autoencoder."""
    for layout, names in SAELENS_TRANSCODERS.items():
        if architecture in names:
            return layout, {"skip": architecture == names[1]}
    for suffix, skip in ((SKIP_TRANSCODER_SUFFIX, True), (TRANSCODER_SUFFIX, False)):
        if architecture.endswith(suffix):
            return architecture.removesuffix(suffix), {"skip": skip}
    return architecture, None


def load_transcoder_tensors(sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
    """A loaded transcoder's own tensors (raw units: its normalization scalars are 1): the skip connection and the
    source mean (zero where it was folded into b_enc)."""
    if sae.W_skip is not None:
        sae.W_skip.data.copy_(tensors["W_skip"])
    if "source_mean" in tensors:
        sae.source_mean.copy_(tensors["source_mean"])
    sae.target_scale.fill_(1.0)
