"""When did a training run stop moving? The rules of docs/method.md ("When a run has converged").

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


# The settle criteria of docs/method.md ("When a run has converged"): a run's result must not depend on when it stops.
SETTLE_AFTER_TOKENS = 2_000_000  # the first tokens are learning, not drift
SETTLE_WINDOW_TOKENS = 1_000_000
SETTLE_BY_TOKENS = 8_000_000
WASTE_L0_RISE, WASTE_R2_FALL = 0.02, 0.002  # smaller moves over 1M tokens are a settled run's jitter
TARGET_L0_BAND = 0.05
TARGET_R2_SLOPE = 0.003  # per 1M tokens


@dataclass(frozen=True)
class Settling:
    """One fixed-λ run's reading against the three settle criteria. `largest_jump` is the largest check-to-check
    move past the first 2M tokens (R², and L0 relative), `seed_spread` the range across seeds of their means
    past 2M (what stopping another seed would change), never below the fixed rule's tolerances (a move within
    those is no jump, however closely the seeds agree); `wasteful` counts the ~1M-token spans past 2M over which
    L0 rose by more than 2% while held-out R² fell by more than 0.002; and `converged_at` is the own-band rule's
    (`plateau`) reading."""
    largest_jump: tuple[float, float]
    seed_spread: tuple[float, float]
    wasteful: int
    converged_at: float | None

    @property
    def settled(self) -> bool:
        jumps_within_spread = all(jump <= spread for jump, spread in zip(self.largest_jump, self.seed_spread))
        return (jumps_within_spread and self.wasteful == 0 and self.converged_at is not None
                and self.converged_at <= SETTLE_BY_TOKENS)


def settling(history: list[dict[str, float]], seeds: list[list[dict[str, float]]]) -> Settling:
    """`history` (one run's budget checkpoints) against the settle criteria; `seeds` holds every seed's history of
    the same configuration, `history` included, whose spread is the yardstick for a jump."""
    late = [row for row in history if row["tokens_seen"] > SETTLE_AFTER_TOKENS]
    pairs = list(zip(late, late[1:]))
    largest_jump = (max((abs(b["r2"] - a["r2"]) for a, b in pairs), default=0.0),
                    max((abs(b["l0"] - a["l0"]) / a["l0"] for a, b in pairs), default=0.0))
    late_runs = [[row for row in run if row["tokens_seen"] > SETTLE_AFTER_TOKENS] for run in seeds]
    r2_means, l0_means = ([statistics.fmean(row[key] for row in rows) for rows in late_runs if rows]
                          for key in ("r2", "l0"))
    seed_spread = (max(R2_TOLERANCE, _range(r2_means)),
                   max(L0_TOLERANCE, _range(l0_means) / statistics.fmean(l0_means) if l0_means else 0.0))
    wasteful = 0
    for i, start in enumerate(late):
        end = next((row for row in late[i + 1:]
                    if row["tokens_seen"] - start["tokens_seen"] >= SETTLE_WINDOW_TOKENS), None)
        if (end is not None and (end["l0"] - start["l0"]) / start["l0"] > WASTE_L0_RISE
                and start["r2"] - end["r2"] > WASTE_R2_FALL):
            wasteful += 1
    reading = plateau(history)
    return Settling(largest_jump, seed_spread, wasteful, reading.converged_at if reading else None)


@dataclass(frozen=True)
class TargetSettling:
    """A target-L0 run over the last third of its budget: how many checks fall there, the largest distance of
    their held-out L0 from the target (relative), and the least-squares trend of held-out R² per 1M tokens."""
    checks: int
    l0_off: float
    r2_trend: float

    @property
    def settled(self) -> bool:
        """Every check's L0 within ±5% of the target and an R² trend of at most 0.003 per 1M tokens."""
        return self.checks >= 2 and self.l0_off <= TARGET_L0_BAND and abs(self.r2_trend) <= TARGET_R2_SLOPE


def at_target(history: list[dict[str, float]], target_l0: float) -> TargetSettling:
    """`history` (budget checkpoints, oldest first) read against the target-L0 settle criteria."""
    last = [row for row in history if row["tokens_seen"] >= history[-1]["tokens_seen"] * 2 / 3] if history else []
    span = (last[-1]["tokens_seen"] - last[0]["tokens_seen"]) / 1e6 if len(last) >= 2 else 0.0
    return TargetSettling(checks=len(last),
                          l0_off=max((abs(row["l0"] - target_l0) / target_l0 for row in last), default=math.nan),
                          r2_trend=_fitted_change(last, "r2") / span if span else math.nan)


def _range(values: list[float]) -> float:
    return max(values) - min(values) if values else 0.0


@dataclass(frozen=True)
class Alternation:
    """How much a per-step series flips between two states from one step to the next. `amplitude` is half the
    mean size of x_t − (x_{t−1} + x_{t+1}) / 2 on log values (a ± a alternation reads a; a straight trend reads 0),
    `lag_one` the lag-1 autocorrelation after a 21-step moving mean is taken out (−1 for a pure alternation, about
    0 for independent noise)."""

    amplitude: float
    lag_one: float


def alternation(values: list[float]) -> Alternation:
    """Read a positive per-step series (the training L0) for a period-2 oscillation (docs/method.md, "Asking for
    an L0")."""
    logs = [math.log(value) for value in values]
    if len(logs) < 23:
        raise ValueError(f"alternation needs at least 23 steps, got {len(logs)}")
    second = [abs(logs[t] - (logs[t - 1] + logs[t + 1]) / 2) for t in range(1, len(logs) - 1)]
    residual = [logs[t] - statistics.fmean(logs[t - 10:t + 11]) for t in range(10, len(logs) - 10)]
    mean = statistics.fmean(residual)
    centred = [r - mean for r in residual]
    variance = sum(c * c for c in centred)
    lag_one = sum(a * b for a, b in zip(centred, centred[1:])) / variance if variance > 0 else 0.0
    return Alternation(amplitude=statistics.fmean(second) / 2, lag_one=lag_one)
