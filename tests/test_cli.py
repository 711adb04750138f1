"""The whole path through `python -m sagsae`: a tiny random Llama saved locally, a local JSON dataset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from callbacks.run_info import git_state, settle_line
from sagsae.commands.train import run

pytestmark = pytest.mark.slow(41)  # seconds in all: the longest files run first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]


def tiny_args(model: Path, data: Path, root: Path, steps: int = 30) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "default.yaml"),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "10",
        "--trainer.default_root_dir", str(root),
        "--model.sae.width", "64",
        "--model.lr", "0.01",
        "--model.sparsity_coefficient", "0.5",
        "--model.sparsity_warmup_steps", "10",
        "--model.lr_warmup_steps", "5",
        "--model.dead_window_tokens", "2048",
        "--data.init_args.model", str(model),
        "--data.init_args.dataset", "json",
        "--data.init_args.data_files", str(data),
        "--data.init_args.layer", "2",
        "--data.init_args.context_length", "32",
        "--data.init_args.lm_batch_size", "16",
        "--data.init_args.batch_size", "256",
        "--data.init_args.shuffle_buffer_tokens", "1024",
        "--data.init_args.val_fraction", "0.1",
        "--data.init_args.val_tokens", "512",
        "--data.init_args.normalization_tokens", "512",
    ]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def fitted_run(tiny_llama, text_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    run(["fit", *tiny_args(tiny_llama, text_file, root)])
    return root


def test_fit_writes_finite_rising_metrics_config_and_checkpoint(fitted_run):
    version = fitted_run / "lightning_logs" / "version_0"
    logged = scalars(version)
    for tag in ("train/loss", "train/mse", "train/l0", "train/r2", "train/dead_fraction",
                "val/loss", "val/mse", "val/l0", "val/r2", "val/dead_fraction", "val/ce_recovered", "val/ce_sae"):
        assert tag in logged, f"missing TensorBoard tag {tag}; have {sorted(logged)}"
        assert all(math.isfinite(value) for _, value in logged[tag]), tag
    r2 = [value for _, value in logged["train/r2"]]
    assert len(r2) == 30
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    assert {"val/log10_firing_density", "train/threshold_rel_change"} <= set(events.Tags()["histograms"])
    for tag in ("train/threshold_abs_change", "train/threshold_rel_change", "train/reset_latents"):
        assert len(logged[tag]) == 30 and all(math.isfinite(value) for _, value in logged[tag]), tag
    assert logged["train/threshold_rel_change"][-1][1] > 0, "the quantile-started thresholds moved"
    learning_rates = {tag for tag in logged if tag.startswith("lr-")}
    assert learning_rates == {"lr-Adam/weights", "lr-Adam/thresholds"}  # the groups named, not pg1 and pg2
    assert "config/text_summary" in events.Tags()["tensors"]
    assert sum(r2[-5:]) / 5 > sum(r2[:5]) / 5 + 0.1, f"R² did not rise: {r2}"
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["model"]["sae"]["init_args"]["width"] == 64
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert math.isfinite(json.loads((version / "run_metadata.json").read_text())["input_scale"])
    assert not (version / "metrics.json").exists(), "reports belong to stand-alone validate/test runs only"


def test_resume_replays_the_live_stream_exactly(tiny_llama, text_file, tmp_path):
    """12 steps, then resume to 20, gives the same weights as 20 steps straight: the resumed stream replays
    the 12 consumed batches and continues with the same batches, shuffle and guard state."""
    import torch

    def fit(root, steps, ckpt=None):
        run(["fit", *tiny_args(tiny_llama, text_file, root, steps=steps), *(["--ckpt_path", str(ckpt)] if ckpt else [])])
        return sorted((root / "lightning_logs").iterdir())[-1] / "checkpoints" / "last.ckpt"

    straight = torch.load(fit(tmp_path / "straight", 20), weights_only=False)
    first = fit(tmp_path / "split", 12)
    assert torch.load(first, weights_only=False)["LMActivationDataModule"]["batches_consumed"] == 12
    resumed = torch.load(fit(tmp_path / "split", 20, ckpt=first), weights_only=False)
    assert resumed["global_step"] == 20
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)


def test_resume_from_last_checkpoint_continues_the_step_count(fitted_run, tiny_llama, text_file, capsys):
    """The step count, the normalization and the held-out checks that the settle reading judges all carry on."""
    import torch

    last = fitted_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    run(["fit", *tiny_args(tiny_llama, text_file, fitted_run, steps=40), "--ckpt_path", str(last)])
    resumed = fitted_run / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    state = torch.load(resumed, map_location="cpu", weights_only=False)
    assert state["global_step"] == 40
    original = torch.load(last, map_location="cpu", weights_only=False)
    assert float(state["state_dict"]["state.sae.input_scale"]) == float(original["state_dict"]["state.sae.input_scale"])
    checks = state["callbacks"]["RunInfo"]["checks"]
    assert [check["tokens_seen"] for check in checks] == [256 * step for step in (10, 20, 30, 40)]
    assert settle_line(checks, 64) in capsys.readouterr().out.splitlines()


def test_the_demo_config_trains_on_a_cache_and_says_whether_it_settled(cache_dir, tmp_path, capsys):
    """`make demo`'s fit (configs/demo.yaml over default.yaml), shrunk to the tiny cache: it trains on the cache,
    writes its checkpoint where the Makefile's `inspect` reads it, and ends with the settle line."""
    run(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--config", str(REPO / "configs" / "demo.yaml"),
         "--data.init_args.path", str(cache_dir), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.max_steps", "9", "--trainer.val_check_interval", "3", "--model.sae.init_args.width", "64",
         "--model.target_l0", "8", "--model.sparsity_warmup_steps", "2", "--data.init_args.batch_size", "128",
         "--data.init_args.val_tokens", "400", "--data.init_args.shuffle_buffer_tokens", "1000",
         "--data.init_args.normalization_tokens", "500"])
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert config["data"]["class_path"] == "datamodules.ActivationFileDataModule"
    assert config["model"]["lr_decay_fraction"] > 0 and config["model"]["sae"]["init_args"]["width"] == 64
    assert "Settled at target L0 8:" in capsys.readouterr().out


def test_the_spliced_lm_loss_runs_at_every_nth_validation_and_the_last(fitted_run, tiny_llama, text_file, tmp_path):
    """Every validation by default; with `every` 2, the 2nd and the last of three (the LM's forwards are most of a
    small run's validation time)."""
    every_one = scalars(fitted_run / "lightning_logs" / "version_0")["val/ce_sae"]
    run(["fit", *tiny_args(tiny_llama, text_file, tmp_path), "--trainer.callbacks.init_args.every", "2"])
    every_two = scalars(tmp_path / "lightning_logs" / "version_0")["val/ce_sae"]
    assert len(every_one) == 3 and [step for step, _ in every_two] == [step for step, _ in every_one[1:]]


def test_the_demo_prints_the_full_default_runs_committed_figures():
    """`make demo` ends with what the full default run reached, read from its committed metrics.json."""
    metrics = json.loads((REPO / "docs" / "results" / "default_run" / "metrics.json").read_text())["metrics"]
    done = subprocess.run(["make", "--no-print-directory", "full-run-figures", f"PY={sys.executable}"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert f"R² {metrics['val/r2']:.3f}" in done.stdout and f"L0 {metrics['val/l0']:.1f}" in done.stdout
    assert metrics["val/l0"] > 0 and 0 < metrics["val/r2"] < 1


def test_the_settle_line_reads_the_last_third_against_the_target():
    checks = [{"tokens_seen": 1_000_000 * i, "l0": 64 * (1.03 if i % 2 else 0.99), "r2": 0.7} for i in range(1, 10)]
    line = settle_line(checks, 64)
    assert line.startswith("Settled at target L0 64: yes;") and "(4 held-out checks)" in line and "within 3.0%" in line
    checks[-1]["l0"] = 70  # 9.4% above the target
    assert settle_line(checks, 64).startswith("Settled at target L0 64: no;")
    assert "not judged" in settle_line(checks[:1], 64)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_with_checkpoint_write_a_report(stage, fitted_run, tiny_llama, text_file, capsys, tmp_path):
    import json

    last = fitted_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    run([stage, *tiny_args(tiny_llama, text_file, tmp_path), "--ckpt_path", str(last)])
    prefix = "val" if stage == "validate" else "test"
    assert f"{prefix}/r2" in capsys.readouterr().out
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())
    assert report["ckpt_path"] == str(last) and report["trained_tokens"] == 30 * 256
    for name in ("r2", "l0", "mse", "dead_fraction", "bipolar_fraction", "loss"):
        assert f"{prefix}/{name}" in report["metrics"], sorted(report["metrics"])
    # the same weights on the same held-out tokens as the fit's last validation: the same numbers, λ included
    last_validation = scalars(fitted_run / "lightning_logs" / "version_0")
    for name in ("r2", "l0", "loss"):
        assert report["metrics"][f"{prefix}/{name}"] == pytest.approx(last_validation[f"val/{name}"][-1][1], rel=1e-4)


def test_git_state_names_the_commit_and_whether_tracked_files_were_edited(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}
    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "first")
    (tmp_path / "notes.txt").write_text("untracked files do not change a run\n")
    assert git_state(tmp_path) == {"git_commit": git("rev-parse", "HEAD"), "git_dirty": False}
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_state(tmp_path)["git_dirty"] is True


def test_git_state_never_writes_the_index(tmp_path):
    """A plain `git status` refreshes .git/index under a lock; killed by git_state's timeout mid-write, it would leave
    .git/index.lock behind and block the user's next commit. So git_state must leave the index untouched."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "first")
    index = tmp_path / ".git" / "index"
    os.utime(tmp_path / "code.py", (1, 1))  # stale stat data: a plain `git status` would rewrite the index now
    before = index.stat().st_mtime_ns
    time.sleep(0.05)
    assert git_state(tmp_path)["git_dirty"] is False
    assert index.stat().st_mtime_ns == before


def test_print_config_prints_the_full_config():
    result = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--config", "configs/default.yaml",
                             "--print_config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["sae"]["class_path"] == "sagsae.saes.SignAwareGatedSAE"
    assert config["model"]["sae"]["init_args"]["width"] == 4608
    assert config["data"]["init_args"]["hookpoint"] == "mlp_out"
    assert "max_steps" in config["trainer"]


def test_unknown_hookpoint_fails_with_the_valid_names():
    result = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--config", "configs/default.yaml",
                             "--data.init_args.hookpoint", "resid_nonsense"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "resid_nonsense" in result.stderr
    for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        assert name in result.stderr


def test_layer_out_of_range_fails_before_training(tiny_llama, text_file, tmp_path):
    with pytest.raises(ValueError, match=r"Layer 9 is out of range: this model has layers 0\.\.3"):
        run(["fit", *tiny_args(tiny_llama, text_file, tmp_path), "--data.init_args.layer", "9"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_missing_model_names_what_was_looked_for(text_file, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        run(["fit", *tiny_args(missing, text_file, tmp_path)])


def test_ddp_fit_on_two_cpu_processes_with_gloo(tiny_llama, text_file, tmp_path):
    """DDP through the CLI: two gloo processes (Lightning re-launches `python -m sagsae` for rank 1)."""
    import json

    import torch

    result = subprocess.run([sys.executable, "-m", "sagsae", "fit", *tiny_args(tiny_llama, text_file, tmp_path, steps=10),
                             "--trainer.accelerator", "cpu",
                             "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # output to a pipe gets plain progress lines (every step of a 10-step run), from rank 0 only
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(",")[0] for line in progress] == [f"step {n}/10" for n in range(1, 11)], result.stdout[-2000:]
    assert "L0 " in progress[-1] and "R² " in progress[-1]
    assert "litlogger" not in result.stdout + result.stderr  # Lightning's logger advertisement is filtered out
    version = tmp_path / "lightning_logs" / "version_0"
    assert json.loads((version / "run_metadata.json").read_text())["world_size"] == 2
    state = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_sae_d_in_that_differs_from_the_activations_fails_before_training(tiny_llama, text_file, tmp_path):
    with pytest.raises(ValueError, match=r"d_in=48 but the hookpoint's activations have size 32.*d_in to 32"):
        run(["fit", *tiny_args(tiny_llama, text_file, tmp_path), "--model.d_in", "48"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cuda_matmuls_use_tensor_cores_and_cpu_arithmetic_stays_fp32():
    import torch

    from sagsae.__main__ import configure_torch

    configure_torch()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    assert torch.get_float32_matmul_precision() == "high"  # what Lightning's GPU tip reads


def test_tensorboard_opens_on_the_curves(tiny_llama, text_file, tmp_path):
    """No `epoch`, `hp_metric` or single-point `final/…` cards before the curves; a custom-scalars layout with
    train and val together; the final metrics in the HPARAMS tab, named by the curves' own tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.dashboard import LAYOUT

    run(["fit", *tiny_args(tiny_llama, text_file, tmp_path, steps=10)])  # a validation at step 10
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/l0", "train/r2", "val/l0", "val/r2", "val/ce_recovered"} <= scalars
    assert not [tag for tag in scalars if tag in ("epoch", "hp_metric") or tag.startswith("final/")], scalars
    assert events.PluginTagToContent("custom_scalars")
    charts = [tags for chart in LAYOUT["SAE"].values() for tags in chart[1]]
    assert "val/r2" in charts and "train/r2" in charts
    hparams = events.PluginTagToContent("hparams")
    experiment = next(content for tag, content in hparams.items() if tag.endswith("experiment"))
    assert b"val/r2" in experiment and b"sparsity_coefficient" in experiment and b"_instantiator" not in experiment
