"""The metrics against direct NumPy computations, and their DDP synchronization (2 gloo processes)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import Logger

from lightning_modules.reconstruction_metrics import ReconstructionMetrics
from sagsae.training.state import FIRING_ROWS, firing_counts
from sagsae.measures import step_summary


def sample(seed: int = 0, n: int = 300, d: int = 6, h: int = 10):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator) * 3 + 1
    x_hat = x + 0.5 * torch.randn(n, d, generator=generator)
    codes = torch.randn(n, h, generator=generator) * (torch.rand(n, h, generator=generator) < 0.2)
    codes[:, 0] = 0.0  # a silent latent
    codes[:, 1] = codes[:, 1].abs()  # a strictly positive one
    codes[:, 2] = torch.where(torch.arange(n) % 20 == 0, -1.0, 1.0) * (codes[:, 2] != 0)  # ~5% negative
    return x, x_hat, codes


def numpy_metrics(x, x_hat, codes):
    x, x_hat, codes = (np.asarray(t, dtype=np.float64) for t in (x, x_hat, codes))
    r2 = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    positive, negative = (codes > 0).sum(0), (codes < 0).sum(0)
    alive = positive + negative > 0
    minority = np.minimum(positive, negative)[alive] / (positive + negative)[alive]
    return {"r2": r2, "mse": ((x - x_hat) ** 2).mean(), "l0": (codes != 0).sum(1).mean(),
            "silent_fraction": (~alive).mean(), "bipolar_fraction": (minority >= 0.1).mean(),
            "firing_density": list((positive + negative) / len(codes))}


def as_floats(values: dict) -> dict:
    return {k: (v.tolist() if v.dim() else float(v)) for k, v in values.items()}


def assert_matches(ours: dict, expected: dict) -> None:
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-9), name


def test_metrics_match_numpy_over_several_batches():
    x, x_hat, codes = sample()
    metric = ReconstructionMetrics(6, 10)
    for rows in torch.arange(300).split(64):
        metric.update(x[rows], x_hat[rows], codes[rows])
    ours = as_floats(metric.compute())
    expected = numpy_metrics(x, x_hat, codes)
    assert_matches(ours, expected)
    assert 0 < expected["bipolar_fraction"] < 1 and expected["silent_fraction"] == pytest.approx(0.1)


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, x_hat, codes = sample()
    metric = ReconstructionMetrics(6, 10)
    mine = torch.arange(300)[rank::2]  # uneven halves of different content
    metric.update(x[mine], x_hat[mine], codes[mine])
    queue.put((rank, as_floats(metric.compute())))
    dist.destroy_process_group()


def test_ddp_synchronized_metrics_equal_one_process():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, port, queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    expected = numpy_metrics(*sample())
    for rank in (0, 1):
        assert_matches(results[rank], expected)


class RecordingLogger(Logger):
    """What Lightning writes at each step."""

    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list = []

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        self.rows.append((step, dict(metrics)))



def test_training_metrics_are_written_on_the_steps_lightning_writes():
    """With log_every_n_steps 4 over 12 steps, every step Lightning writes carries L0 and R² (none is missing or
    stale), and they equal the step's own summary."""
    import lightning as L

    from callbacks import SAEMetrics
    from datamodules import TensorActivationDataModule
    from lightning_modules import SAEModule

    class KeepSummaries(L.Callback):
        def __init__(self) -> None:
            self.summaries = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.summaries.append({key: float(value) for key, value in outputs["summary"].items()})

    logger, kept = RecordingLogger(), KeepSummaries()
    module = SAEModule.from_arguments("sagsae", d_in=8, width=16, init_seed=0)
    L.Trainer(max_steps=12, logger=logger, log_every_n_steps=4, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0, callbacks=[SAEMetrics(), kept]).fit(
        module, TensorActivationDataModule(torch.randn(4096, 8), batch_size=256))
    written = [(step, row) for step, row in logger.rows if "train/loss" in row]
    assert [step for step, _ in written] == [3, 7, 11]  # Lightning's 0-based steps 4, 8 and 12
    for step, row in written:
        assert row["train/l0"] == pytest.approx(kept.summaries[step]["l0"], rel=1e-6)
        assert row["train/r2"] == pytest.approx(kept.summaries[step]["r2"], rel=1e-6)
        assert row["train/aux_r2"] == pytest.approx(kept.summaries[step]["aux_r2"], rel=1e-6)
        assert "train/dead_fraction" in row


def test_step_summary_against_direct_computations():
    """A training step's R², MSE, L0 and gate-path R² (sagsae.measures.step_summary, from the loss's squared error
    and the firing counts), and the window metric over the same single batch gives the same three numbers."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=generator)
    x_hat = x + 0.3 * torch.randn(40, 6, generator=generator)
    gate_x_hat = x + 0.6 * torch.randn(40, 6, generator=generator)
    codes = torch.relu(torch.randn(40, 10, generator=generator) - 0.5)
    got = step_summary(x, ((x - x_hat) ** 2).sum(1).mean(), firing_counts(codes), ((x - gate_x_hat) ** 2).sum(1).mean())
    r2 = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    aux_r2 = 1 - ((x - gate_x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(got["r2"], r2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["aux_r2"], aux_r2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["mse"], ((x - x_hat) ** 2).mean(), rtol=1e-6, atol=1e-6)
    assert float(got["l0"]) == pytest.approx(sum(int((row != 0).sum()) for row in codes) / 40)
    window = ReconstructionMetrics(6, 10)
    window.update(x, x_hat, codes)
    summary = window.compute()
    for key in ("r2", "mse", "l0"):
        assert float(got[key]) == pytest.approx(float(summary[key]), rel=1e-6)


def test_firing_counts_in_row_blocks_match_a_direct_count():
    """Per-latent firing counts over a batch that is not a whole number of blocks, with signed codes."""
    _, _, codes = sample(n=2 * FIRING_ROWS + 37)
    direct = [sum(1 for row in codes if row[j] != 0) for j in range(codes.shape[1])]
    assert firing_counts(codes).tolist() == direct


def test_token_reuse_gap_scores_a_window_as_the_direct_formula():
    """benchmarks.token_reuse_gap's R² and L0, summed chunk by chunk, equal 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² and the mean
    count of non-zero codes computed at once, in the normalized scale the SAE trains in."""
    from benchmarks.token_reuse_gap import window_fit
    from sagsae.saes import build_sae

    sae = build_sae("topk", d_in=8, width=32, k=3)
    sae.set_scales([0.5])
    rows = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)) + 2.0
    fit = window_fit(sae, rows, chunk=96)
    x = 0.5 * rows.double()
    codes = sae.encode(0.5 * rows)
    x_hat = sae(0.5 * rows).double()
    assert fit["r2"] == pytest.approx(float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6)
    assert fit["l0"] == pytest.approx(3.0) and fit["l0"] == float((codes != 0).sum()) / len(rows)
