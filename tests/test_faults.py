"""Faults injected and survived: SIGKILL at random moments of a fit (and in the middle of a checkpoint write), and
writes that fail (a file-size limit stands in for a full disk) during a checkpoint, a cache and an export.
Each asserts that nothing already written was lost and that the error names the file (docs/reliability.md).

The 20-trial SIGKILL run is opt-in (`pytest -m faults`, about 10 minutes on 2 cores); CI runs 2 of its trials."""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.checkpoint_io import AtomicCheckpointIO, partial_path
from tests.conftest import REPO

pytestmark = pytest.mark.slow(73)  # seconds in all: the longest files run first (tests/conftest.py)

LIMIT_BYTES = 40_000  # larger than configs, logs and events of the runs below, smaller than their checkpoints


def limit_file_size(limit: int = LIMIT_BYTES):
    """A preexec_fn: writes past `limit` bytes in any file fail with EFBIG, as on a full disk (SIGXFSZ ignored,
    so the write reports the error instead of killing the process)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.zeros(100)}, path)
    code = ("import torch, sys; from callbacks.checkpoint_io import AtomicCheckpointIO\n"
            f"AtomicCheckpointIO().save_checkpoint({{'step': 2, 'weights': torch.ones(100_000)}}, {str(path)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size())
    assert result.returncode != 0
    assert f"Could not write checkpoint {path} ([Errno 27] File too large); the previous checkpoint there is intact" \
        in result.stderr
    assert torch.load(path)["step"] == 1 and torch.equal(torch.load(path)["weights"], torch.zeros(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial file was removed


def test_a_stray_partial_file_from_a_kill_is_replaced_by_the_next_save(tmp_path):
    path = tmp_path / "last.ckpt"
    partial_path(path).write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3 and not partial_path(path).exists()


def fit_config(tmp_path: Path, cache: Path, width: int, steps: int) -> Path:
    """The default config on the tiny cache, checkpointing every step (last.ckpt and step-N files)."""
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    config["trainer"].update(max_steps=steps, val_check_interval=5, default_root_dir=str(tmp_path / "run"),
                             callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"save_last": True, "every_n_train_steps": 1}}])
    config["model"]["sae"]["init_args"]["width"] = width
    config["model"].update(sparsity_warmup_steps=2, lr_warmup_steps=2, dead_window_tokens=2048)
    config["data"] = {"class_path": "datamodules.ActivationFileDataModule",
                      "init_args": {"path": str(cache), "batch_size": 128, "shuffle_buffer_tokens": 512,
                                    "val_tokens": 256, "normalization_tokens": 256}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_stops_with_one_line_when_a_checkpoint_cannot_be_written(cache_dir, tmp_path):
    config = fit_config(tmp_path, cache_dir, width=512, steps=4)
    result = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size())
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("sagsae fit: Could not write checkpoint ") and "File too large" in last_line
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.ckpt"))


def test_a_failed_cache_write_leaves_no_folder(tiny_llama, text_file, tmp_path):
    out = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "sagsae", "cache", "--config", "configs/default.yaml", "--out",
                             str(out), "--train_tokens", "3000", "--val_tokens", "400", "--shard_tokens", "1000",
                             "--data.init_args.model", str(tiny_llama), "--data.init_args.dataset", "json",
                             "--data.init_args.data_files", str(text_file), "--data.init_args.layer", "2",
                             "--data.init_args.context_length", "32", "--data.init_args.val_fraction", "0.1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(20_000))
    assert result.returncode != 0
    assert "File too large" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_a_failed_export_write_leaves_no_folder(cache_dir, tmp_path):
    config = fit_config(tmp_path, cache_dir, width=512, steps=2)
    trained = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--config", str(config)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "sagsae", "export", "--ckpt_path", str(ckpt), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size())
    assert result.returncode != 0 and "File too large" in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2  # the checkpoint it read is untouched


def kill_trial(config: Path, mid_write: bool, rng: random.Random, timeout: float = 120) -> dict:
    """Start a fit, SIGKILL it once it has a checkpoint (at a random moment, or in the middle of a checkpoint
    write), then check every checkpoint left loads. Returns what happened.

    A mid-write kill is made certain, and it hits last.ckpt (the file a resume reads): when last.ckpt's partial
    file appears the process is frozen (SIGSTOP); if the partial is still there, the write is in progress and the
    kill catches it, else that write had just finished, the process goes on (SIGCONT) and the next step's write is
    tried."""
    run = config.parent / "run"
    process = subprocess.Popen([sys.executable, "-m", "sagsae", "fit", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, partial_seen = time.time() + timeout, False

    def partial_on_disk() -> bool:
        return any(run.rglob(partial_path(Path("last.ckpt")).name))

    try:
        while not list(run.rglob("last.ckpt")):  # the first step's checkpoint
            assert process.poll() is None and time.time() < deadline, "fit ended before its first checkpoint"
            time.sleep(0.02)
        if mid_write:
            while not partial_seen and process.poll() is None and time.time() < deadline:
                if partial_on_disk():
                    process.send_signal(signal.SIGSTOP)
                    partial_seen = partial_on_disk()
                    if not partial_seen:
                        process.send_signal(signal.SIGCONT)
        else:
            time.sleep(rng.uniform(0.0, 3.0))
            partial_seen = partial_on_disk()
    finally:
        process.kill()
        process.wait()
    checkpoints = [p for p in run.rglob("*.ckpt")]
    steps = {p.name: torch.load(p, weights_only=False)["global_step"] for p in checkpoints}  # each one loads
    return {"partial_seen": partial_seen, "steps": steps,
            "last": next((p for p in checkpoints if p.name == "last.ckpt"), None)}


def resume_to_the_end(config: Path, last: Path, steps: int) -> int:
    result = subprocess.run([sys.executable, "-m", "sagsae", "fit", "--config", str(config), "--ckpt_path", str(last)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    finished = max((p for p in (config.parent / "run").rglob("last.ckpt")), key=lambda p: p.stat().st_mtime)
    return torch.load(finished, weights_only=False)["global_step"]


def run_kill_trials(cache: Path, tmp_path: Path, trials: int) -> None:
    rng, steps, outcomes = random.Random(0), 12, []
    for trial in range(trials):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        config = fit_config(folder, cache, width=16_384, steps=steps)  # checkpoints of about 13 MB
        outcome = kill_trial(config, mid_write=trial % 2 == 1, rng=rng)
        assert outcome["last"] is not None and resume_to_the_end(config, outcome["last"], steps) == steps
        outcomes.append(outcome)
    mid_write = sum(o["partial_seen"] for o in outcomes)
    print(f"{trials} SIGKILL trials, {mid_write} during a checkpoint write; every checkpoint left loaded and "
          f"every run resumed from last.ckpt to step {steps}")
    assert all(o["partial_seen"] for o in outcomes[1::2]), "every mid-write trial must catch a write in progress"


def test_sigkill_during_fit_and_checkpoint_writes_loses_nothing(cache_dir, tmp_path):
    run_kill_trials(cache_dir, tmp_path, trials=2)


@pytest.mark.faults
def test_sigkill_twenty_trials(cache_dir, tmp_path):
    run_kill_trials(cache_dir, tmp_path, trials=20)
