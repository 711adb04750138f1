"""Loading the frozen LM and its tokenizer: an embedded GGUF model, any HF hub name, or a local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.embedded import embedded_model_files, is_embedded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow on most machines)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown lm_dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def prefetch_model(source: str, gguf_file: str | None) -> None:
    """Download a hub model's files into the local cache (a local folder or an embedded model needs nothing)."""
    if is_embedded(source) or Path(source).exists():
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, allow_patterns=[gguf_file, "*.json", "*.model", "*.txt"] if gguf_file else None)
    except (OSError, ValueError):  # not a hub name, offline, missing: setup's load says what was looked for
        return


def load_language_model(source: str, gguf_file: str | None, dtype: torch.dtype, device: torch.device,
                        context_length: int | None = None):
    """(model in eval mode with gradients off, tokenizer). Fails with what was looked for; a context longer than
    the model's positions fails on its config, before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if is_embedded(source):
        folder, gguf_file = embedded_model_files(source)
        location = str(folder)
    else:
        location = source
        if gguf_file is not None and not (Path(source) / gguf_file).is_file() and Path(source).is_dir():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {source}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(location, **extra)
        positions = getattr(config, "max_position_embeddings", None)
        if context_length is not None and positions is not None and context_length > positions:
            raise ValueError(f"data.context_length {context_length} exceeds the {positions} positions of {source!r}: "
                             f"set data.context_length to at most {positions}")
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype, **extra)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load the language model {source!r} (looked for a local folder or a hub model of that "
            f"name{', GGUF file ' + repr(gguf_file) if gguf_file else ''}): {error}"
        ) from error
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
