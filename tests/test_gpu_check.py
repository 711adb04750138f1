"""The prepared GPU check runs end to end: its dry run on CPU (toy sizes) writes every figure it reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow(39)  # seconds in all: the longest files run first (tests/conftest.py)


def test_the_gpu_check_dry_run_reports_steps_cache_and_fit(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work"), "--quick"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["environment"]["torch"] == __import__("torch").__version__
    for precision in ("fp32", "bf16"):
        steps = report[f"sae_step_{precision}_ms"]
        assert {"floor", "sagsae", "gated", "sagsae@1%", "sagsae@1%:sparse"} <= set(steps)
        assert all(ms > 0 for ms in steps.values())
    chains = report["chain_floor"]
    assert {"sagsae/float32", "gated/float32", "sagsae/bfloat16"} <= set(chains)
    gated = [row for name, row in chains.items() if not name.startswith("jumprelu")]
    assert gated and all(row["floor_s"] > 0 and row["eager_s"] > 0 and row["compiled_s"] > 0 for row in gated)
    assert 10_000 < report["cache"]["tokens"] <= 20_000 and report["cache"]["tokens_per_s"] > 0  # one pass of 400 texts
    fit = report["fit_bf16"]
    assert fit["steps"] == 20 and fit["tokens_per_s"] > 0 and fit["peak_memory_gib"] > 0
    assert len(list((tmp_path / "out").iterdir())) <= 10  # what the device tool returns of a run
