"""Loading the frozen LM and its tokenizer: an embedded GGUF model, any HF hub name, or a local folder.

A local GGUF file is converted once into a folder of config, tokenizer and float32 safetensors under
$SAGSAE_CACHE_DIR (default ~/.cache/sagsae): transformers re-parses a GGUF file for each of config, tokenizer and
weights, many times slower than reading safetensors. The weights are the GGUF's own dequantized values, bit for
bit (tests/test_smollm2.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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


CACHE_HOME = "SAGSAE_CACHE_DIR"


def converted_folder(gguf_path: Path) -> Path:
    """Where a GGUF file's conversion lives: keyed by its path, size and time and by the transformers version that
    dequantizes it, so a changed file or dequantizer converts again."""
    import transformers

    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    identity = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    home = Path(os.environ.get(CACHE_HOME) or Path.home() / ".cache" / "sagsae")
    return home / "gguf" / f"{gguf_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def convert_gguf(folder: Path, gguf_file: str) -> Path | None:
    """The converted folder of `folder/gguf_file`, converting it on first use; None (with one line that says why)
    where it cannot be written, and the GGUF file loads as it is."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_folder(folder / gguf_file)
    if target.is_dir():  # complete: it appears only by the rename below
        return target
    print(f"Converting {gguf_file} once into {target} (float32 safetensors; {CACHE_HOME} moves it)", flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    except OSError as error:
        print(f"Cannot write {target.parent} ({error.strerror}); loading the GGUF file directly. Set {CACHE_HOME} "
              "to a writable folder to load it faster.", flush=True)
        return None
    try:
        AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
        model.config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
        staging.rename(target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if target.is_dir():  # another process (a DDP rank, a test worker) converted it first
            return target
        print(f"Cannot write {target} ({error.strerror}); loading the GGUF file directly.", flush=True)
        return None
    return target


def load_language_model(source: str, gguf_file: str | None, dtype: torch.dtype, device: torch.device,
                        context_length: int | None = None):
    """(model in eval mode with gradients off, tokenizer). Fails with what was looked for; a context longer than
    the model's positions fails on its config, before the weights load (a local GGUF file converts first, once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if is_embedded(source):
        folder, gguf_file = embedded_model_files(source)
        location = str(folder)
    else:
        location = source
        if gguf_file is not None and not (Path(source) / gguf_file).is_file() and Path(source).is_dir():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {source}")
    if gguf_file is not None and (Path(location) / gguf_file).is_file():
        converted = convert_gguf(Path(location), gguf_file)
        if converted is not None:
            location, gguf_file = str(converted), None
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
