"""Sweep comparisons (docs/results.md), on plain numbers: R²(L0) curves, Pareto dominance over the L0 overlap with a
tie band of the seeds' spread, and the sweep-geomean dead-fraction reduction.

Curves are interpolated linearly in log L0 (sweeps space their λ, hence L0, geometrically), between the seed
means of each sweep point, and never extrapolated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    """One series' sweep points, sorted by L0: seed-mean L0, R² and dead fraction, and the seeds' R² spread
    (max − min; 0 for a single seed)."""

    l0: tuple[float, ...]
    r2: tuple[float, ...]
    dead: tuple[float, ...]
    width: int
    spread: tuple[float, ...] = ()

    @staticmethod
    def from_points(points: list[tuple[float, ...]], width: int) -> "Curve":
        """Points (L0, R², dead) or (L0, R², dead, R² spread of the seeds)."""
        ordered = sorted(points)
        spread = tuple(p[3] if len(p) > 3 else 0.0 for p in ordered)
        return Curve(tuple(p[0] for p in ordered), tuple(p[1] for p in ordered), tuple(p[2] for p in ordered), width,
                     spread)

    def at(self, l0: float, values: tuple[float, ...]) -> float:
        """`values` interpolated at `l0` (log-linear), or NaN outside the curve's L0 range."""
        if not self.l0 or not self.l0[0] <= l0 <= self.l0[-1]:
            return math.nan
        for i in range(len(self.l0) - 1):
            lo, hi = self.l0[i], self.l0[i + 1]
            if lo <= l0 <= hi:
                if hi == lo:
                    return values[i]
                t = (math.log(l0) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return values[i] + t * (values[i + 1] - values[i])
        return values[-1]  # a single-point curve

    def slope_at(self, l0: float) -> float:
        """dR²/d ln L0 of the curve at `l0`: the slope of the segment holding it, the mean of the two segments'
        at a sweep point between them, the end segment's at or beyond an end; NaN for a single point."""
        if len(self.l0) < 2:
            return math.nan
        l0 = min(max(l0, self.l0[0]), self.l0[-1])
        touching = [(self.r2[i + 1] - self.r2[i]) / math.log(self.l0[i + 1] / self.l0[i])
                    for i in range(len(self.l0) - 1)
                    if self.l0[i] <= l0 <= self.l0[i + 1] and self.l0[i + 1] > self.l0[i]]
        return sum(touching) / len(touching) if touching else math.nan


def overlap(a: Curve, b: Curve) -> tuple[float, float] | None:
    """The L0 range both sweeps cover, or None when they do not meet."""
    lo, hi = max(a.l0[0], b.l0[0]), min(a.l0[-1], b.l0[-1])
    return (lo, hi) if lo <= hi else None


@dataclass(frozen=True)
class Verdict:
    overlap: tuple[float, float] | None
    verdict: str  # "dominates", "dominated", "crosses", "within noise", "no overlap"
    min_gap: float  # min over the overlap of R²_a − R²_b
    max_gap: float
    dead_reduction: float  # geomean over the matched points of dead_b / dead_a (> 1: a has fewer dead)
    within_noise: float = math.nan  # share of the compared L0 values where |gap| ≤ the seeds' spread


def compare(a: Curve, b: Curve, samples: int = 200) -> Verdict:
    """Does `a` dominate `b` over their L0 overlap (R²_a ≥ R²_b everywhere on it)?

    The gap is checked at every sweep point of either curve inside the overlap (the matched points) and at
    `samples` log-spaced L0 values between. A gap no larger than the wider of the two seeds' spreads there is
    noise: the verdict reads the gaps beyond it ("dominates" when all of those favour a, "dominated" when all
    favour b, "crosses" when both occur) and is "within noise" when there are none. The dead reduction is the geomean over the matched points of
    dead_b / dead_a, both interpolated there; a dead fraction below one latent of the wider SAE counts as that
    one latent, so two dead-free sweeps give 1 rather than 0/0."""
    span = overlap(a, b)
    if span is None:
        return Verdict(None, "no overlap", math.nan, math.nan, math.nan)
    lo, hi = span
    matched = sorted({l0 for l0 in a.l0 + b.l0 if lo <= l0 <= hi})  # every sweep point inside the overlap
    grid = set(matched)
    if hi > lo:
        steps = (math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (samples - 1)) for i in range(samples))
        grid |= {min(hi, max(lo, l0)) for l0 in steps}  # exp(log(·)) can land a hair outside the overlap
    else:
        grid.add(lo)
    points = sorted(grid)
    gaps = [a.at(l0, a.r2) - b.at(l0, b.r2) for l0 in points]
    noise = [max(a.at(l0, a.spread) if a.spread else 0.0, b.at(l0, b.spread) if b.spread else 0.0) for l0 in points]
    beyond = [gap for gap, band in zip(gaps, noise) if abs(gap) > band]
    if not beyond:
        verdict = "within noise"
    else:
        verdict = "dominates" if min(beyond) > 0 else "dominated" if max(beyond) < 0 else "crosses"
    floor = 1 / max(a.width, b.width)
    ratios = [max(b.at(l0, b.dead), floor) / max(a.at(l0, a.dead), floor) for l0 in matched]
    reduction = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    within = sum(abs(gap) <= band for gap, band in zip(gaps, noise)) / len(gaps)
    return Verdict(span, verdict, min(gaps), max(gaps), reduction, within)
