"""The wheel a pip user gets: built from this checkout, installed into a fresh virtual environment (no network:
it reuses the test environment's packages), and run from site-packages, with its browser app and configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_the_wheel_runs_help_configs_and_inspect_from_site_packages(tiny_llama, exported_sae, tmp_path):
    source = tmp_path / "source"  # a clean copy: no build/ or egg-info left by earlier builds to leak files in
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source)
    for name in ("sagsae", "lightning_modules", "datamodules", "callbacks", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
         tmp_path / "dist", source], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("sagsae-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    # torch & co., not sagsae: every site-packages folder the tests import from (a venv's own, and the system's or
    # another environment's that it layers over), never the checkout
    package_folders = [path for path in sys.path if Path(path).name in ("site-packages", "dist-packages")]
    (site / "test_environment.pth").write_text("\n".join(package_folders) + "\n")
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
         "--quiet", wheel], cwd=tmp_path)
    sagsae = venv / "bin" / "sagsae"

    located = run([venv / "bin" / "python", "-c", "import sagsae; print(sagsae.__file__)"], cwd=tmp_path).stdout
    assert Path(located.strip()).is_relative_to(site), "the installed wheel, not the checkout, is imported"
    assert "usage: sagsae COMMAND" in run([sagsae, "--help"], cwd=tmp_path).stdout
    listed = run([sagsae, "configs"], cwd=tmp_path).stdout
    assert str(site / "sagsae" / "configs") in listed and "  default\n" in listed and "  sweeps/synth\n" in listed
    printed = run([sagsae, "fit", "--config", "default", "--print_config"], cwd=tmp_path).stdout
    assert "SignAwareGatedSAE" in printed and "gate_path: soft" in printed
    run([sagsae, "configs", "--out", tmp_path / "mine"], cwd=tmp_path)
    assert (tmp_path / "mine" / "default.yaml").read_text() == (REPO / "configs" / "default.yaml").read_text()

    root, texts = exported_sae
    out = tmp_path / "browser"
    run([sagsae, "inspect", "--sae", root / "sae", "--out", out, "--dataset", "json", "--data_files", texts,
         "--tokens", "500"], cwd=tmp_path)
    assert (REPO / "sagsae" / "analysis" / "browser_app.html").read_text() in (out / "index.html").read_text()
    assert json.loads((out / "data" / "index.json").read_text())["about"]["tokens"] >= 500
