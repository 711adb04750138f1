"""The layout's promises: an architecture is one math class, the core needs torch alone, layers import only
downwards, no module reaches into another's private names, and `sagsae --help` shows every command."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import sagsae
from sagsae.commands import COMMANDS
from sagsae.saes import SAE_REGISTRY, SAELoss, register
from sagsae.saes.base import LinearEncoderSAE, squared_error
from tests.test_cli import REPO, tiny_args

FOLDERS = ("sagsae", "datamodules", "lightning_modules", "callbacks", "benchmarks", "tests")


@register("toy")
class ToySAE(LinearEncoderSAE):
    """A toy architecture written only here: ReLU codes with a learned per-latent gain, plain L1.

    Args:
        d_in: activation size.
        width: number of latents.
        gain_init: starting gain of every latent.
    """

    saelens_tensors = {**LinearEncoderSAE.saelens_tensors, "gain": "gain"}

    def __init__(self, d_in: int, width: int, gain_init: float = 1.5) -> None:
        super().__init__(d_in, width)
        self.gain_init = gain_init
        self.gain = nn.Parameter(torch.full((width,), gain_init))

    def activation(self, pre: Tensor) -> Tensor:
        return self.gain * torch.relu(pre)

    def coding_loss(self, x: Tensor, target: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> SAELoss:
        codes = self.encode(x)
        x_hat = self.decode(codes)
        terms = {"recon": squared_error(target, x_hat), "sparsity": sparsity_coefficient * self.weighted_l1(codes)}
        return SAELoss(sum(terms.values()), terms, codes, x_hat)


def test_a_toy_architecture_trains_exports_reloads_and_counts_with_no_other_file(tiny_llama, text_file, tmp_path,
                                                                                 capsys):
    from sagsae.__main__ import main
    from sagsae.commands.export import export_checkpoint
    from sagsae.commands.train import run

    run(["fit", *tiny_args(tiny_llama, text_file, tmp_path, steps=8), "--model.sae", f"{__name__}.ToySAE",
         "--model.sae.width", "24", "--model.sae.gain_init", "0.5"])
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["sae"] == {"architecture": "toy", "config": {"d_in": 32, "width": 24, "gain_init": 0.5},
                            "transcoder": None, "matryoshka": None}
    trained_gain = state["state_dict"]["state.sae.gain"]
    assert not torch.equal(trained_gain, torch.full((24,), 0.5)), "the toy's own parameter trained"
    loaded = sagsae.load(export_checkpoint(checkpoint, tmp_path / "export"))
    assert isinstance(loaded, ToySAE) and torch.equal(loaded.gain.detach(), trained_gain)
    capsys.readouterr()
    main(["params", "--d_in", "32", "--width", "24"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("toy "))
    assert row.split()[1] == f"{2 * 24 * 32 + 32 + 2 * 24:,}"  # W_enc, W_dec, b_dec, b_enc, gain


@pytest.mark.parametrize("architecture", sorted(SAE_REGISTRY))
def test_config_rebuilds_every_architecture(architecture):
    """`type(sae)(**sae.config())` is the same architecture: what checkpoints and sweeps rely on."""
    sae = SAE_REGISTRY[architecture](d_in=8, width=40)
    rebuilt = type(sae)(**sae.config())
    assert rebuilt.config() == sae.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sae.state_dict().items()}


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# folder → the first-party packages it may import (the core is sagsae/ without its commands)
ALLOWED = {"core": {"sagsae"}, "datamodules": {"sagsae", "datamodules"},
           "lightning_modules": {"sagsae", "lightning_modules"}, "callbacks": {"sagsae", "lightning_modules", "callbacks"}}
FIRST_PARTY = ("sagsae", "datamodules", "callbacks", "lightning_modules", "benchmarks", "tests")


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(REPO).parts
    if parts[0] == "sagsae":
        return None if "commands" in parts or path.name == "__main__.py" else "core"
    return parts[0] if parts[0] in ALLOWED else None


def test_layers_import_only_downwards():
    wrong = []
    for folder in ("sagsae", "datamodules", "callbacks", "lightning_modules"):
        for path in python_files(folder):
            layer = layer_of(path)
            if layer is None:
                continue
            for module in imported_modules(path):
                top = module.split(".")[0]
                commands = module.startswith("sagsae.commands")
                if top in FIRST_PARTY and (top not in ALLOWED[layer] or commands):
                    wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, wrong


def test_the_core_imports_neither_lightning_nor_transformers():
    core = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for p in python_files("sagsae") if layer_of(p) == "core" and p.name != "saelens.py"]  # saelens: the SAELens plugin
    code = (f"import sys, importlib\nfor name in {core!r}: importlib.import_module(name)\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'torchmetrics') if m in sys.modules]\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert len(core) > 10 and result.returncode == 0, result.stderr


PRIVATE_USE = re.compile(r"\b(?!self\b|cls\b)(\w+)\._[a-z]\w*")


def test_no_module_uses_another_objects_private_names():
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for folder in FOLDERS for path in python_files(folder)
             for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE_USE.search(line)]
    assert not found, found


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for folder in FOLDERS:
        for path in python_files(folder):
            if path.name != "__init__.py":
                names.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
    assert not {name: paths for name, paths in names.items() if len(paths) > 1}


def test_top_level_help_lists_every_command_under_the_programs_name():
    result = subprocess.run([sys.executable, "-m", "sagsae", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: sagsae")
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS) == {"fit", "validate", "test", "cache", "sweep", "synth", "report", "export", "inspect",
                                       "params", "configs"}
    fit = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert fit.returncode == 0 and fit.stdout.startswith("usage: sagsae [options] fit") and "--model.sae" in fit.stdout
    unknown = subprocess.run([sys.executable, "-m", "sagsae", "predict"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode != 0 and "unknown command 'predict'" in unknown.stderr


def test_help_lists_an_architectures_switches_with_their_docstrings():
    result = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--model.sae.help", "SignAwareGatedSAE"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for switch, words in [("theta_init_quantile", "quantile of its |π|"), ("one_sided_gate", "ablation"),
                          ("tie_r", "one magnitude rescale")]:
        assert f"--model.sae.{switch}" in result.stdout and words in result.stdout, switch


def test_no_architecture_file_knows_about_transcoders():
    """Transcoding is the shared machinery's (base.py: make_transcoder, the loss's target and skip): an
    architecture file reconstructs the target it is handed and names neither the skip nor the source mean."""
    words = re.compile(r"transcod|W_skip|skip_connection|source_mean|target_scale", re.IGNORECASE)
    machinery = {"base.py", "__init__.py", "gated_chain.py", "sparse_codes.py", "straight_through.py"}
    architectures = [p for p in (REPO / "sagsae" / "saes").glob("*.py") if p.name not in machinery]
    assert len(architectures) >= 7
    found = [f"{p.name}:{n}" for p in architectures for n, line in enumerate(p.read_text().splitlines(), 1)
             if words.search(line)]
    assert not found, found
