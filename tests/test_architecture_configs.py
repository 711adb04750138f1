"""Every shipped architecture config trains through `python -m sagsae fit`, reports through `validate`, and
exports to a folder that reloads bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sagsae.commands.train import run
from tests.test_cli import REPO, tiny_args

# default.yaml too (tiny_args start from it); demo.yaml trains on a cache: its test is in tests/test_cli.py
CONFIGS = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")
                 if p.parent.name not in ("paper", "sweeps") and p.name != "demo.yaml")
PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
SWEEP_CONFIGS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_config_fits_and_validates(config: Path, tiny_llama, text_file, tmp_path):
    overlay = [] if config.name == "default.yaml" else ["--config", str(REPO / "configs" / config)]  # tiny_args has it
    tiny = tiny_args(tiny_llama, text_file, tmp_path, steps=6)
    tiny_overrides = tiny[2:]  # all but its leading --config default.yaml
    # the tiny model, data, budget and width again after the overlay, which may be a whole config (transcoder.yaml)
    args = [*tiny, *overlay, *tiny_overrides]
    run(["fit", *args])
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    run(["validate", *args, "--ckpt_path", str(checkpoint)])
    report = json.loads((tmp_path / "lightning_logs" / "version_1" / "metrics.json").read_text())
    assert {"val/r2", "val/l0", "val/ce_recovered"} <= set(report["metrics"])
    assert_export_reloads_bit_for_bit(checkpoint, tmp_path / "export")


def assert_export_reloads_bit_for_bit(checkpoint: Path, folder: Path) -> None:
    """The loaded SAE writes back exactly the tensors and cfg that were exported, and reconstructs raw
    activations as the trained one does (the normalization scalar folded in)."""
    from safetensors.torch import load_file

    import sagsae
    from sagsae.commands.export import export_checkpoint
    from sagsae.formats.serialization import read_checkpoint, sae_from_checkpoint, saelens_layout

    export_checkpoint(checkpoint, folder)
    loaded = sagsae.load(folder)
    saved = load_file(str(folder / "sae_weights.safetensors"))
    tensors, architecture_cfg = saelens_layout(loaded)
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], saved[k]) for k in saved)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert {k: cfg[k] for k in architecture_cfg} == architecture_cfg
    trained = sae_from_checkpoint(read_checkpoint(checkpoint)).eval()
    raw = torch.randn(64, trained.d_in, generator=torch.Generator().manual_seed(0)) / float(trained.input_scale)
    with torch.no_grad():
        torch.testing.assert_close(loaded(raw), trained.reconstruct_raw(raw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=[c.stem for c in PAPER_CONFIGS])
def test_paper_configs_parse(config: Path, capsys):
    """The paper cells need a hub and a GPU; here we check that they resolve to the intended cell."""
    import yaml

    with pytest.raises(SystemExit) as ended:  # --print_config prints and exits, as on the command line
        run(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--config", str(config), "--print_config"])
    assert ended.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    model, hookpoint = config.stem.rsplit("_", 2)[0], "_".join(config.stem.rsplit("_", 2)[1:])
    assert resolved["data"]["init_args"]["hookpoint"] == hookpoint
    assert resolved["data"]["init_args"]["model"] == {"pythia1b": "EleutherAI/pythia-1b",
                                                      "smollm3_3b": "HuggingFaceTB/SmolLM3-3B"}[model]
    assert resolved["model"]["sae"]["init_args"]["width"] == 16384
    # GPU-scale intervals, and default.yaml's callbacks otherwise kept
    assert resolved["trainer"]["log_every_n_steps"] == 50
    assert resolved["trainer"]["precision"] == "bf16-mixed"
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in resolved["trainer"]["callbacks"]}
    assert callbacks["LastCheckpoint"]["every_n_train_steps"] == 2000
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["trainer"]["callbacks"]
    assert set(callbacks) == {c["class_path"].rsplit(".", 1)[1] for c in default}


@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=[c.stem for c in SWEEP_CONFIGS])
def test_sweep_configs_expand(config: Path):
    """Every shipped sweep names importable datamodules and SAE modules, and its grid expands to distinct members
    that compare the series the config says."""
    import lightning as L
    import yaml

    from sagsae.commands.sweep import expand_members, import_class

    spec = yaml.safe_load(config.read_text())
    members = expand_members(spec["members"])
    series = {member["series"] for member in members.values()}
    assert all(a in series and b in series for a, b in spec.get("compare", []))
    assert all(issubclass(import_class(cell["class_path"]), L.LightningDataModule)
               for cell in (spec.get("cells") or {}).values())
    assert spec.get("cells") or spec.get("synthetic", {}).get("protocols")
    if config.stem.startswith("paper_"):
        widths = {m["series"]: m["init_args"]["width"] for m in members.values()}
        assert widths == {"SA-GSAE(H)": 16384, "Gated(2H)": 32768}
        assert len(members) == 24 and set(spec["cells"]) == {"resid_mid", "mlp_out", "attn_out"}


@pytest.mark.parametrize("jobs", sorted((REPO / "configs" / "sweeps").glob("*.jobs")), ids=lambda p: p.stem)
def test_queued_sweep_jobs_name_existing_configs_cells_and_series(jobs: Path):
    """Each line of a queue (configs/sweeps/queue.sh) names a sweep config, one of its cells and one of its
    series, and a lock name and output folder no other line takes."""
    import yaml

    lines = [line for line in jobs.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    fields = [line.split("|") for line in lines]
    assert lines and all(len(f) == 6 for f in fields)
    for name, config, cell, series, out, _ in fields:
        spec = yaml.safe_load((REPO / config).read_text())
        assert cell in spec["cells"] and series in {m["name"] for m in spec["members"]}, name
    assert len({f[0] for f in fields}) == len(fields)
    assert len({(f[4], f[2], f[5]) for f in fields}) == len(fields)  # two jobs never train one cell folder


def test_the_paper_configs_precision_trains_a_sweep_of_their_architectures_on_cpu():
    """bf16-mixed (the paper configs' precision) through the sweep path on CPU autocast: SA-GSAE and Gated train
    3 steps each, with finite weights that stay fp32."""
    import lightning as L
    import torch

    from datamodules import TensorActivationDataModule
    from lightning_modules import SweepModule
    from sagsae.training import TrainingPlan

    members = {name: TrainingPlan.from_arguments(name, width=32, init_seed=0) for name in ("sagsae", "gated")}
    data = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0).fit(
        sweep := SweepModule(members), TensorActivationDataModule(data, batch_size=256))
    for name, member in sweep.members.items():
        assert int(member.steps_trained) == 3, name
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in member.parameters()), name
