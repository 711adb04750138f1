"""Fixtures: tiny random causal LMs with their own tokenizer, and a small local text dataset (no hub needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

IN_CI = os.environ.get("CI") == "true"  # .ci/run installs every optional dependency that a test names


def needs(available: bool, reason: str) -> pytest.MarkDecorator:
    """Skip where an optional dependency is missing, saying which; under CI, which installs them all, run anyway,
    so that a dropped dependency fails instead of turning into a silent skip."""
    return pytest.mark.skipif(not available and not IN_CI, reason=reason)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def slow_seconds(item: pytest.Item) -> float:
    """The seconds that the item's file takes in all, as its `slow` marker states them (0 without one)."""
    marker = item.get_closest_marker("slow")
    return marker.args[0] if marker is not None else 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, as their `slow` markers state. `make test` hands whole files to its workers in this
    order (--no-loadscope-reorder): a long file handed out last would leave the other worker idle."""
    items.sort(key=slow_seconds, reverse=True)


def pytest_terminal_summary(terminalreporter):
    """The machine the suite ran on, under its timings: CI's duration depends on it, and so does the precision that
    every `fit` in the suite takes (sagsae/precision.py)."""
    from sagsae.precision import automatic_precision

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    precision, reason = automatic_precision("cpu")
    terminalreporter.write_line(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
                                f"{torch.get_num_threads()} threads; fit on cpu takes {precision} ({reason})")


WORDS = ("the of and a to in is was for on as with by he at from his an were are which this be or had not "
         "first one their its new after who they have her she two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many "
         "can state about national out known university united then made").split()


def sample_texts(count: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(count):
        length = int(torch.randint(20, 80, (1,), generator=generator))
        ids = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        texts.append(" ".join(WORDS[i] for i in ids) + ".")
    return texts


def save_word_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", ".", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(kind: str, folder: Path) -> Path:
    """A random 4-layer model of the given family, saved with a tokenizer as a local HF folder."""
    import transformers

    tokenizer = save_word_tokenizer(folder)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, **common)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, **common)
    elif kind in ("mistral", "qwen2", "qwen3", "smollm3"):
        config_class = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
                        "qwen3": transformers.Qwen3Config, "smollm3": transformers.SmolLM3Config}[kind]
        config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    elif kind in ("gemma2", "gemma3_text"):
        config_class = transformers.Gemma2Config if kind == "gemma2" else transformers.Gemma3TextConfig
        config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common)
    elif kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, use_parallel_residual=True, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": text}) for text in sample_texts(400)))
    return path


@pytest.fixture(scope="session")
def cache_dir(tiny_llama, text_file, tmp_path_factory) -> Path:
    """A `sagsae cache` folder of the tiny Llama's mlp_out: 3 training shards of 1,000 tokens, 400 held out."""
    out = tmp_path_factory.mktemp("cache") / "tiny"
    overrides = ["--data.init_args.model", str(tiny_llama), "--data.init_args.dataset", "json",
                 "--data.init_args.data_files", str(text_file), "--data.init_args.layer", "2",
                 "--data.init_args.context_length", "32", "--data.init_args.lm_batch_size", "16",
                 "--data.init_args.val_fraction", "0.1"]
    result = subprocess.run([sys.executable, "-m", "sagsae", "cache", "--config", "configs/default.yaml",
                             "--out", str(out), "--train_tokens", "3000", "--val_tokens", "400",
                             "--shard_tokens", "1000", *overrides], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def perturbed_sae(architecture: str, d_in: int, width: int, threshold_spread: float = 0.5, **kwargs):
    """An SAE with generic, non-initial weights (so that every term matters) and thresholds in [0.2, 0.2 + spread]."""
    from sagsae.saes import build_sae

    torch.manual_seed(0)
    sae = build_sae(architecture, d_in=d_in, width=width, **kwargs)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if "threshold" in name:
                parameter.copy_(0.2 + threshold_spread * torch.rand(width))
            else:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return sae


@pytest.fixture(scope="session")
def exported_sae(tiny_llama, tmp_path_factory):
    """An SA-GSAE on the tiny Llama's layer-2 mlp_out, started as training starts it (normalization scalar, b_dec
    and θ at the 0.8-quantile of |π| from a first batch), exported with its metadata."""
    from datamodules.hooked_lm import HookedLanguageModel
    from datamodules.text import TextSource
    from sagsae.measures import normalization_scale
    from sagsae.saes import build_sae
    from sagsae.formats.serialization import export

    root = tmp_path_factory.mktemp("inspect")
    texts = root / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": text}) for text in sample_texts(120, seed=3)))
    lm = HookedLanguageModel(str(tiny_llama), None, "mlp_out", 2, "float32", torch.device("cpu"), 24)
    first = lm.activations(torch.tensor(list(lm.contexts(TextSource("json", data_files=str(texts)).documents()))[:16]))
    torch.manual_seed(0)
    sae = build_sae("sagsae", d_in=32, width=48, theta_init_quantile=0.8)
    sae.input_scale.fill_(normalization_scale(float(first.pow(2).sum()), len(first), 32))
    sae.initialize_from_batch(sae.normalize(first))
    export(sae, root / "sae", {"model_name": str(tiny_llama), "hook_name": "blocks.2.hook_mlp_out",
                               "context_size": 24})
    return root, texts
