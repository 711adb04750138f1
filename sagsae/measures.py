"""The metric math of docs/method.md on plain tensors (no Lightning, no torchmetrics): the normalization scalar,
R² of a batch, and the held-out window's summary from its sums. lightning_modules/reconstruction_metrics.py
accumulates the sums across batches and ranks; sweeps, reports and exports read the same definitions from here."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalization_scales(rows: Tensor) -> list[float]:
    """`normalization_scale` of activations [n, d] (one scalar), or of each side of (source, target) pairs
    [n, 2, d] (two), from these rows alone."""
    sums = rows.double().pow(2).sum(-1).sum(0).reshape(-1)
    return [normalization_scale(float(total), len(rows), rows.shape[-1]) for total in sums]


def normalization_scale(sum_of_squares: float, tokens: int, d_in: int) -> float:
    """The scalar s with E‖s·x‖² = d, from Σ‖x‖² over `tokens` activations (docs/method.md)."""
    if tokens <= 0 or not sum_of_squares > 0:
        raise ValueError(f"Cannot estimate the normalization scalar from {tokens} tokens of total energy "
                         f"{sum_of_squares}: the activations are empty or all zero")
    return math.sqrt(d_in / (sum_of_squares / tokens))


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """R² of one batch (window = the batch): 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², in float64."""
    x = x.double()
    return 1 - (x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def step_summary(x: Tensor, squared_error: Tensor, firing: Tensor, gate_squared_error: Tensor | None = None,
                 prefix_squared_errors: dict[int, Tensor] | None = None) -> dict[str, Tensor]:
    """R², MSE and L0 (and the gate path's R², and a Matryoshka SAE's R² per prefix width, where given) of one
    training batch, from what its loss already computed: `squared_error` = ‖x − x̂‖² averaged over the batch, and
    each latent's firing count [H]. Only x's variance is a new pass, over [B, d]: float64 passes over x̂ and a
    count over the [B, H] codes were most of what the metrics cost a step through `fit` (docs/performance.md)."""
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    summary = {"r2": 1 - squared_error / variance, "mse": squared_error / x.shape[-1], "l0": firing.sum() / len(x)}
    if gate_squared_error is not None:
        summary["aux_r2"] = 1 - gate_squared_error / variance
    for width, error in (prefix_squared_errors or {}).items():
        summary[f"r2_prefix_{width}"] = 1 - error / variance
    return summary


def window_summary(squared_error: Tensor, sum_x: Tensor, sum_squares: Tensor, active: Tensor, tokens: Tensor,
                   positive: Tensor, negative: Tensor, gate_squared_error: Tensor | None = None,
                   skip_squared_error: Tensor | None = None,
                   prefix_squared_errors: dict[int, Tensor] | None = None) -> dict[str, Tensor]:
    """R², MSE, L0, silent and bipolar fractions and per-latent firing density from a window's sums: R² divides
    summed errors by summed variance (never a mean of per-batch ratios); a latent is bipolar when its minority
    sign is ≥ 10% of its firings (docs/results.md). With the gate path's summed squared error (non-zero), its R² too,
    and the same for a skip-transcoder's skip path (`skip_r2`: its share of the explained variance is skip_r2 / r2)."""
    total_variance = sum_squares - sum_x.pow(2).sum() / tokens
    firings = positive + negative
    alive = firings > 0
    minority = torch.minimum(positive, negative) / firings.clamp(min=1)
    summary = {
        "r2": 1 - squared_error / total_variance,
        "mse": squared_error / (tokens * sum_x.numel()),
        "l0": active / tokens,
        "silent_fraction": (firings == 0).double().mean(),
        "bipolar_fraction": (minority[alive] >= 0.1).double().mean() if alive.any() else alive.double().sum(),
        "firing_density": firings / tokens,
    }
    if gate_squared_error is not None and gate_squared_error > 0:
        summary["aux_r2"] = 1 - gate_squared_error / total_variance
    if skip_squared_error is not None and skip_squared_error > 0:
        summary["skip_r2"] = 1 - skip_squared_error / total_variance
    for width, error in (prefix_squared_errors or {}).items():  # a Matryoshka SAE's prefixes
        summary[f"r2_prefix_{width}"] = 1 - error / total_variance
    return summary


def deciles(values: Tensor, name: str) -> dict[str, Tensor]:
    """A distribution in three numbers, `name`_q10, _q50 and _q90: its 10%, 50% and 90% quantiles (the held-out
    firing densities over latents, the thresholds)."""
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=values.device))
    return {f"{name}_q10": q[0], f"{name}_q50": q[1], f"{name}_q90": q[2]}
