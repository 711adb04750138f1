"""Every shipped architecture config trains through `python -m sagsae fit` and reports through `validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sagsae.cli import run
from tests.test_cli import REPO, tiny_args

CONFIGS = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml") if p.name != "default.yaml")


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_config_fits_and_validates(config: Path, tiny_llama, text_file, tmp_path):
    args = [*tiny_args(tiny_llama, text_file, tmp_path, steps=6), "--config", str(REPO / "configs" / config),
            "--model.init_args.width", "64"]
    run(["fit", *args])
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    run(["validate", *args, "--ckpt_path", str(checkpoint)])
    report = json.loads((tmp_path / "lightning_logs" / "version_1" / "metrics.json").read_text())
    assert {"val/r2", "val/l0", "val/ce_recovered"} <= set(report["metrics"])
