"""The precision that a run takes when its config leaves `trainer.precision` unset (sagsae/precision.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from sagsae.commands.train import run
from sagsae.precision import CPU_BF16_FEATURES, accelerator_device_type, automatic_precision, fast_bf16
from tests.conftest import REPO
from tests.test_cli import tiny_args


@pytest.mark.parametrize("present", [(), ("AMX",), ("AVX512-BF16",), ("AMX", "AVX512-BF16")])
def test_a_cpu_is_fast_in_bf16_when_it_has_amx_or_avx512_bf16(monkeypatch, present):
    for name, probe in CPU_BF16_FEATURES:
        monkeypatch.setattr(torch.cpu, probe, lambda name=name: name in present)
    precision, reason = automatic_precision("cpu")
    assert precision == ("bf16-mixed" if present else "32-true")
    assert all(name in reason for name in present), reason
    assert (fast_bf16("cpu") is None) == (not present)


def test_a_cpu_without_the_probes_counts_as_slow(monkeypatch):
    for _, probe in CPU_BF16_FEATURES:
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    assert automatic_precision("cpu")[0] == "32-true"


def test_devices_without_a_known_fast_bf16_stay_in_fp32():
    assert automatic_precision("mps")[0] == "32-true"
    if not torch.cuda.is_available():
        assert fast_bf16("cuda") is None


def test_the_accelerator_setting_names_the_device_type():
    assert accelerator_device_type("cpu") == "cpu"
    assert accelerator_device_type("auto") == ("cuda" if torch.cuda.is_available() else
                                               "mps" if torch.backends.mps.is_available() else "cpu")


@pytest.mark.parametrize("fast", [True, False])
def test_fit_records_the_automatic_choice_and_keeps_an_explicit_one(fast, monkeypatch, tiny_llama, text_file,
                                                                    tmp_path, caplog):
    monkeypatch.setattr("sagsae.commands.train.automatic_precision",
                        lambda device: ("bf16-mixed", "fast") if fast else ("32-true", "slow"))
    run(["fit", *tiny_args(tiny_llama, text_file, tmp_path / "auto", steps=3)])
    expected = "bf16-mixed" if fast else "32-true"
    assert f"precision: {expected}" in caplog.text
    version = tmp_path / "auto" / "lightning_logs" / "version_0"
    assert yaml.safe_load((version / "config.yaml").read_text())["trainer"]["precision"] == expected
    assert json.loads((version / "run_metadata.json").read_text())["precision"] == expected
    run(["fit", *tiny_args(tiny_llama, text_file, tmp_path / "set", steps=3), "--trainer.precision", "32-true"])
    version = tmp_path / "set" / "lightning_logs" / "version_0"
    assert json.loads((version / "run_metadata.json").read_text())["precision"] == "32-true"


def test_the_cpu_bf16_benchmark_times_both_precisions_under_each_onednn_cap(tmp_path):
    out = tmp_path / "cpu_bf16.json"
    subprocess.run([sys.executable, "-m", "benchmarks.cpu_bf16", "--d_in", "8", "--width", "16", "--batch", "16",
                    "--rounds", "1", "--isa", "ALL", "AVX512_CORE", "--json", str(out)], check=True, cwd=REPO)
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["ALL", "AVX512_CORE"]
    for seconds in results.values():
        assert seconds["fp32"] > 0 and seconds["bf16"] > 0
        assert seconds["bf16_speedup"] == pytest.approx(seconds["fp32"] / seconds["bf16"])
