"""When did a training run stop moving? Two rules of docs/method.md ("Convergence").

`converged_at` is the issue's fixed rule: the first budget from which held-out R² stays within `r2_tolerance`
of its final value and L0 within `l0_tolerance` (relative), at every later budget checkpoint too.

`plateau` sets the band from the member's own checkpoint-to-checkpoint jitter instead, like a control chart:
at λ ≥ 6 on attn_out, L0 jitters by ±10% between 0.5M-token checkpoints, so the fixed 5% band reads "not
converged" on runs that sit on a plateau. A wider band could hide a slow drift, so a plateau also has to show no
fitted trend larger than its band, and a band more than ten times the fixed tolerances (R² ±0.05, L0 ±50%) is
too noisy to call: 20 of the 21 unclipped runs that broke down reach it, and one of 30 clipped ones."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

R2_TOLERANCE = 0.005
L0_TOLERANCE = 0.05
NOISE_MULTIPLE = 3.0
MAX_BAND_MULTIPLE = 10.0
REFERENCE_POINTS = 3
MIN_PLATEAU_POINTS = 3


def converged_at(history: list[dict[str, float]], r2_tolerance: float = R2_TOLERANCE,
                 l0_tolerance: float = L0_TOLERANCE) -> float | None:
    """`tokens_seen` of the first checkpoint of `history` (budget order) from which every later one stays within
    the tolerances of the last; None ("not converged") when only the last does, since one point shows no
    plateau."""
    if not history:
        return None
    first = _first_settled(history, history[-1]["r2"], history[-1]["l0"], r2_tolerance, l0_tolerance)
    return history[first]["tokens_seen"] if first < len(history) - 1 else None


@dataclass(frozen=True)
class Plateau:
    """The noise-aware rule's reading of one member. `start` is the first checkpoint (tokens) from which every
    later one stays within the bands of the mean of the last few, None when fewer than three do. The drifts are
    the least-squares trend across the second half of the budget (R² in absolute terms, L0 relative to its mean
    there): measured across the plateau alone, a steady drift would always look small, since the plateau of a
    drifting run is just its last band's worth of points."""
    start: float | None
    r2_band: float
    l0_band: float
    r2_drift: float
    l0_drift: float
    too_noisy: bool

    @property
    def drifting(self) -> bool:
        return abs(self.r2_drift) > self.r2_band or abs(self.l0_drift) > self.l0_band

    @property
    def converged_at(self) -> float | None:
        return None if self.too_noisy or self.drifting else self.start


def plateau(history: list[dict[str, float]], r2_tolerance: float = R2_TOLERANCE,
            l0_tolerance: float = L0_TOLERANCE, noise_multiple: float = NOISE_MULTIPLE) -> Plateau | None:
    """The bands are `noise_multiple` times the jitter of the history's second half (`_jitter`), never narrower
    than the tolerances nor, without being too noisy, wider than MAX_BAND_MULTIPLE times them. None when the
    history is too short to estimate a jitter."""
    if len(history) < 2 * REFERENCE_POINTS:
        return None
    tail = history[len(history) // 2:]
    tail_l0 = max(statistics.fmean([row["l0"] for row in tail]), 1e-9)
    r2_band = max(r2_tolerance, noise_multiple * _jitter([row["r2"] for row in tail]))
    l0_band = max(l0_tolerance, noise_multiple * _jitter([row["l0"] for row in tail]) / tail_l0)
    last = history[-REFERENCE_POINTS:]
    first = _first_settled(history, statistics.fmean([row["r2"] for row in last]),
                           statistics.fmean([row["l0"] for row in last]), r2_band, l0_band)
    start = history[first]["tokens_seen"] if len(history) - first >= MIN_PLATEAU_POINTS else None
    too_noisy = r2_band > MAX_BAND_MULTIPLE * r2_tolerance or l0_band > MAX_BAND_MULTIPLE * l0_tolerance
    return Plateau(start=start, r2_band=r2_band, l0_band=l0_band, r2_drift=_fitted_change(tail, "r2"),
                   l0_drift=_fitted_change(tail, "l0") / tail_l0, too_noisy=too_noisy)


def gain_at_matched_l0(reading: Plateau, slope: float) -> float:
    """The part of a member's second-half R² trend that its L0 trend does not explain by moving it along its
    series' curve (`slope` = dR²/d ln L0 there): ΔR² − slope · ln(1 + ΔL0/L0). Positive: the curve itself rose.
    A drifting member whose L0 falls at constant R² improves; one whose R² rises only as much as its L0 does is
    sliding along its curve, and its verdict against another curve does not change. NaN for a run too noisy to
    call, whose trend means nothing, and for a fitted L0 fall of 100% or more."""
    if reading.too_noisy or reading.l0_drift <= -1:
        return math.nan
    return reading.r2_drift - slope * math.log1p(reading.l0_drift)


def _first_settled(history: list[dict[str, float]], r2: float, l0: float, r2_band: float, l0_band: float) -> int:
    """Index of the first checkpoint from which every later one is within the bands of (r2, l0)."""
    first = len(history)
    while first > 0 and (abs(history[first - 1]["r2"] - r2) <= r2_band
                         and abs(history[first - 1]["l0"] - l0) <= l0_band * abs(l0)):
        first -= 1
    return first


def _jitter(values: list[float]) -> float:
    """A series' noise from its successive differences, which cancel a slow trend to first order: their median
    size over √2, scaled to a Gaussian's standard deviation, so that one spike does not widen the band."""
    differences = [abs(b - a) for a, b in zip(values, values[1:])]
    return statistics.median(differences) / (0.6745 * math.sqrt(2)) if differences else 0.0


def _fitted_change(rows: list[dict[str, float]], key: str) -> float:
    """The least-squares line's change from the first checkpoint of `rows` to the last."""
    tokens = [row["tokens_seen"] for row in rows]
    values = [row[key] for row in rows]
    mean_t, mean_v = statistics.fmean(tokens), statistics.fmean(values)
    spread = sum((t - mean_t) ** 2 for t in tokens)
    if spread == 0:
        return 0.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(tokens, values)) / spread
    return slope * (tokens[-1] - tokens[0])
