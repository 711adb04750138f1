"""Export (SAELens v6 layout, normalization folded) and torch-only loading, for every architecture."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import REPO, needs

import sagsae
from callbacks import SAEMetrics
from datamodules import TensorActivationDataModule
from lightning_modules import SAEModule
from sagsae.commands.export import export_checkpoint

MODULES = {
    "sagsae": ("sagsae", {}),
    "sagsae-untied": ("sagsae", {"tie_r": False, "tie_theta": False, "log_theta": True}),
    "sagsae-one-sided": ("sagsae", {"one_sided_gate": True}),
    "relu": ("relu", {}),
    "gated": ("gated", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 4}),
    "batchtopk": ("batchtopk", {"k": 4}),
    "abstopk": ("abstopk", {"k": 4}),
}
D = 16


def raw_activations(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 7.0 * torch.randn(n, D, generator=generator) + 2.0  # far from E‖x‖² = d, so the scale matters


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, (architecture, switches) in MODULES.items():
        L.seed_everything(0)
        module = SAEModule.from_arguments(architecture, width=32, sparsity_coefficient=0.1, sparsity_warmup_steps=2, lr=1e-2, **switches)
        trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[SAEMetrics()])
        trainer.fit(module, TensorActivationDataModule(raw_activations(2048, 0), batch_size=256))
        paths[name] = (root / f"{name}.ckpt", module)
        trainer.save_checkpoint(paths[name][0])
    return paths


@pytest.mark.parametrize("name", list(MODULES))
def test_round_trip_reproduces_codes_and_reconstructions(name, checkpoints, tmp_path):
    ckpt, module = checkpoints[name]
    folder = export_checkpoint(ckpt, tmp_path / "export")
    assert {p.name for p in folder.iterdir()} == {"sae_weights.safetensors", "cfg.json", "sparsity.safetensors",
                                                  "README.md"}
    loaded = sagsae.load(folder)
    trained = module.sae.eval()
    x = raw_activations(512, 1)
    scale = float(trained.input_scale)
    assert abs(scale - 1) > 0.5
    with torch.no_grad():
        codes = trained.encode(trained.normalize(x))
        torch.testing.assert_close(loaded.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), trained.decode(codes) / scale, rtol=1e-5, atol=1e-4)
    assert (codes != 0).any()
    cfg = json.loads((folder / "cfg.json").read_text())
    expected = {"relu": "standard", "batchtopk": "jumprelu"}.get(name, name.split("-")[0])
    assert cfg["architecture"] == expected and cfg["d_in"] == D and cfg["d_sae"] == 32


def test_export_refuses_existing_folders_and_broken_checkpoints(checkpoints, tmp_path):
    ckpt, _ = checkpoints["sagsae"]
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_checkpoint(ckpt, tmp_path / "taken")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="Could not read checkpoint"):
        export_checkpoint(broken, tmp_path / "out")
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"]["state.sae.W_dec"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match="non-finite"):
        export_checkpoint(tmp_path / "nan.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no half-written folder is left"


class RunsCode:
    """A pickle that would run `touch <marker>` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_in_one_line(checkpoints, tmp_path):
    """Checkpoints open with weights_only=True: ours load (the other tests here), a crafted one is refused by
    `export` and `inspect` with one line naming the file, and its code never runs."""
    state = torch.load(checkpoints["sagsae"][0], weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "sae": RunsCode(marker)}, tmp_path / "crafted.ckpt")
    for command in ("export", "inspect"):
        result = subprocess.run([sys.executable, "-m", "sagsae", command, "--ckpt_path", str(tmp_path / "crafted.ckpt"),
                                 "--out", str(tmp_path / command)], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and not marker.exists()
        message = result.stderr.strip().splitlines()
        assert len(message) == 1 and "Refusing to open" in message[0] and "crafted.ckpt" in message[0]
        assert "posix.system" in message[0] and not (tmp_path / command).exists()
    torch.load(tmp_path / "crafted.ckpt", weights_only=False)  # the positive control: unpickled, the code runs
    assert marker.exists()


def test_validate_and_resume_refuse_a_checkpoint_whose_pickle_runs_code(tiny_llama, text_file, tmp_path):
    """`validate` and `fit --ckpt_path` read checkpoints through Lightning, whose torch.load refuses the pickle
    (weights_only=True); the refusal is one line and the code never runs."""
    from tests.test_cli import REPO, tiny_args

    marker = tmp_path / "code-ran"
    torch.save({"hyper_parameters": RunsCode(marker), "state_dict": {}}, tmp_path / "crafted.ckpt")
    for command in ("validate", "fit"):
        result = subprocess.run([sys.executable, "-m", "sagsae", command, *tiny_args(tiny_llama, text_file, tmp_path),
                                 "--ckpt_path", str(tmp_path / "crafted.ckpt")], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0 and not marker.exists()
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"sagsae {command}: Refusing to open the --ckpt_path checkpoint") and "posix.system" in last, \
            result.stderr[-2000:]


def test_load_needs_neither_lightning_nor_transformers(checkpoints, tmp_path):
    folder = export_checkpoint(checkpoints["sagsae"][0], tmp_path / "export")
    code = (f"import sys, torch, sagsae; sae = sagsae.load({str(folder)!r}); sae(torch.randn(3, {D})); "
            "bad = [m for m in ('lightning', 'transformers', 'pytorch_lightning') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_export_cli_writes_the_folder_without_lightning(checkpoints, tmp_path):
    code = (f"import sys; from sagsae.__main__ import main; "
            f"main(['export', '--ckpt_path', {str(checkpoints['gated'][0])!r}, '--out', {str(tmp_path / 'cli')!r}]); "
            "assert 'lightning' not in sys.modules, 'export imported Lightning'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gated SAE, width 32" in (tmp_path / "cli" / "README.md").read_text()


@needs(importlib.util.find_spec("sae_lens") is not None,
       reason="sae-lens is not installed (optional; `pip install sae-lens` to run this check)")
@pytest.mark.parametrize("name", ["relu", "gated", "jumprelu", "topk", "batchtopk", "sagsae", "sagsae-untied",
                                  "sagsae-one-sided", "abstopk"])
def test_saelens_loads_our_exports(name, checkpoints, tmp_path):
    from sae_lens import SAE

    import sagsae.formats.saelens  # noqa: F401  (registers sagsae and, where SAELens lacks it, abstopk)

    ckpt, module = checkpoints[name]
    folder = export_checkpoint(ckpt, tmp_path / "export")
    theirs = SAE.load_from_disk(str(folder))
    x = raw_activations(256, 2)
    ours = sagsae.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-5, atol=1e-4)
        if name in SIGNED_FORMULAS:  # our SAELens classes for these reuse our code: check them against the formula
            codes = SIGNED_FORMULAS[name](folder, x)
            assert (codes < 0).any() == (name != "sagsae-one-sided") and (codes != 0).any()
            torch.testing.assert_close(theirs.encode(x), codes, rtol=1e-5, atol=1e-5)


def exported_tensors(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((folder / "cfg.json").read_text()), load_file(str(folder / "sae_weights.safetensors"))


def sagsae_codes_from_formula(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SA-GSAE's codes written out from the exported tensors alone (docs/method.md, "Forward"), none of our code:
    u = (x − b_dec) W_enc, π = u + b_gate; the gate opens on π > θ⁺ or π < −θ⁻; the code is the signed magnitude
    exp(r^sign(π)) u + b_mag where the gate is open and the magnitude has π's sign."""
    cfg, t = exported_tensors(folder)
    assert cfg["signed_magnitude"] and cfg["sign_consistency"]
    u = (x - t["b_dec"]) @ t["W_enc"]
    pi = u + t["b_gate"]
    open_ = (pi > t["threshold_pos"]) | (pi < -t["threshold_neg"])
    magnitude = torch.exp(torch.where(pi > 0, t["r_pos"], t["r_neg"])) * u + t["b_mag"]
    agrees = torch.sign(magnitude) == torch.sign(pi)
    return torch.where(open_ & agrees, magnitude, torch.zeros(()))


def abstopk_codes_from_formula(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """AbsTopK's codes from the exported tensors alone: the k pre-activations of largest |π|, signs kept."""
    cfg, t = exported_tensors(folder)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    chosen = pre.abs().topk(int(cfg["k"]), dim=1).indices
    return torch.zeros_like(pre).scatter(1, chosen, pre.gather(1, chosen))


SIGNED_FORMULAS = {"sagsae": sagsae_codes_from_formula, "sagsae-untied": sagsae_codes_from_formula,
                   "sagsae-one-sided": sagsae_codes_from_formula, "abstopk": abstopk_codes_from_formula}


SIGNED = ["sagsae", "sagsae-untied", "abstopk"]  # the one-sided gate ablation codes one sign only


@pytest.mark.parametrize("name", SIGNED)
def test_split_sign_export_reconstructs_identically_with_codes_of_one_sign(name, checkpoints, tmp_path):
    ckpt, module = checkpoints[name]
    signed = sagsae.load(export_checkpoint(ckpt, tmp_path / "signed"))
    split = sagsae.load(export_checkpoint(ckpt, tmp_path / "split", split_signs=True))
    x = raw_activations(256, 3)
    with torch.no_grad():
        codes, split_codes = signed.encode(x), split.encode(x)
        width = signed.width
        assert split.width == 2 * width and split_codes.min() >= 0
        assert torch.equal(split_codes[:, :width] - split_codes[:, width:], codes)
        assert ((split_codes[:, :width] > 0) & (split_codes[:, width:] > 0)).sum() == 0
        assert (split_codes > 0).sum() == (codes != 0).sum() > 0
        assert (codes < 0).any(), "the check needs negative firings to mean anything"
        torch.testing.assert_close(split(x), signed(x), rtol=1e-6, atol=1e-5)  # fp32 summation order only
        direct = split_codes @ torch.cat([signed.W_dec, -signed.W_dec], dim=1).T + signed.b_dec
        torch.testing.assert_close(split(x), direct, rtol=1e-6, atol=1e-5)
    cfg = json.loads((tmp_path / "split" / "cfg.json").read_text())
    assert cfg["d_sae"] == 2 * width and cfg["architecture"].endswith("_split")
    assert not (tmp_path / "split" / "sparsity.safetensors").exists()


def test_split_signs_refuses_an_unsigned_sae(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="split_signs needs a signed SAE"):
        export_checkpoint(checkpoints["gated"][0], tmp_path / "out", split_signs=True)
    with pytest.raises(ValueError, match="split_signs needs a signed SAE"):
        export_checkpoint(checkpoints["sagsae-one-sided"][0], tmp_path / "out", split_signs=True)
    assert not (tmp_path / "out").exists()


@needs(importlib.util.find_spec("sae_lens") is not None,
       reason="sae-lens is not installed (optional; `pip install sae-lens` to run this check)")
@pytest.mark.parametrize("name", SIGNED)
def test_saelens_loads_split_sign_exports_with_codes_of_one_sign(name, checkpoints, tmp_path):
    from sae_lens import SAE

    import sagsae.formats.saelens  # noqa: F401  (registers the split forms)

    ckpt, _ = checkpoints[name]
    folder = export_checkpoint(ckpt, tmp_path / "split", split_signs=True)
    theirs, ours = SAE.load_from_disk(str(folder)), sagsae.load(folder)
    x = raw_activations(256, 4)
    with torch.no_grad():
        codes = theirs.encode(x)
        assert codes.shape[-1] == theirs.cfg.d_sae == ours.width and codes.min() >= 0
        torch.testing.assert_close(codes, ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(codes), ours.sae(x), rtol=1e-5, atol=1e-4)
