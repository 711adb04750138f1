"""The sweep comparisons of docs/results.md against hand-worked examples."""

from __future__ import annotations

import math

import pytest

from sagsae.analysis.pareto import Curve, compare, overlap


def curve(points, width=100):
    return Curve.from_points(points, width)


def test_log_linear_interpolation_and_no_extrapolation():
    c = curve([(10, 0.8, 0), (1, 0.5, 0)])  # unsorted on purpose
    assert c.l0 == (1, 10)
    assert c.at(math.sqrt(10), c.r2) == pytest.approx(0.65)  # halfway in log L0
    assert math.isnan(c.at(0.5, c.r2)) and math.isnan(c.at(11, c.r2))


def test_dominates_over_the_overlap_only():
    a = curve([(1, 0.5, 0), (10, 0.8, 0)])
    b = curve([(2, 0.4, 0), (20, 0.9, 0)])  # better than a beyond L0 10, outside the overlap
    assert overlap(a, b) == (2, 10)
    v = compare(a, b)
    # on [2, 10] both curves are straight in log L0, so the gap is too: its extremes are at the ends.
    gap_at_2 = (0.5 + 0.3 * math.log(2) / math.log(10)) - 0.4
    gap_at_10 = 0.8 - (0.4 + 0.5 * math.log(5) / math.log(10))
    assert v.verdict == "dominates"
    assert v.max_gap == pytest.approx(gap_at_2) and v.min_gap == pytest.approx(gap_at_10)
    assert compare(b, a).verdict == "dominated"


def test_crossing_curves_and_disjoint_sweeps():
    a = curve([(1, 0.5, 0), (10, 0.9, 0)])
    b = curve([(1, 0.6, 0), (10, 0.8, 0)])
    v = compare(a, b)
    assert v.verdict == "crosses" and v.min_gap == pytest.approx(-0.1) and v.max_gap == pytest.approx(0.1)
    far = curve([(50, 0.9, 0), (100, 0.95, 0)])
    assert compare(a, far).verdict == "no overlap" and overlap(a, far) is None


def test_geomean_dead_reduction_over_matched_points():
    a = curve([(1, 0.5, 0.01), (4, 0.7, 0.04)], width=100)
    b = curve([(1, 0.5, 0.1), (4, 0.6, 0.8)], width=200)
    assert compare(a, b).dead_reduction == pytest.approx(math.sqrt(10 * 20))
    # b's points inside the overlap count too, with a interpolated there: L0 2 is halfway in log L0.
    c = curve([(1, 0.5, 0.1), (2, 0.5, 0.3), (4, 0.6, 0.8)], width=200)
    assert compare(a, c).dead_reduction == pytest.approx((10 * (0.3 / 0.025) * 20) ** (1 / 3))


def test_dead_free_sweeps_reduce_by_one_not_zero_over_zero():
    a = curve([(1, 0.5, 0.0), (4, 0.7, 0.0)], width=100)
    b = curve([(1, 0.5, 0.0), (4, 0.6, 0.0)], width=200)
    assert compare(a, b).dead_reduction == pytest.approx(1.0)
    # a dead fraction below one latent of the wider SAE counts as that latent: 0.05 / (1/200) = 10.
    d = curve([(1, 0.5, 0.05), (4, 0.6, 0.05)], width=200)
    assert compare(a, d).dead_reduction == pytest.approx(10.0)


def test_overlap_ends_that_exp_log_does_not_round_trip():
    """Log-spaced samples of an overlap such as [81.25, 246.3] must stay inside it (no NaN gaps)."""
    a = curve([(81.25, 0.02, 0), (103.38, 0.15, 0), (172.05, 0.39, 0), (246.31, 0.685, 0)])
    b = curve([(22.1, 0.345, 0), (111.68, 0.63, 0), (232.92, 0.786, 0), (388.43, 0.857, 0)])
    v = compare(a, b)
    assert v.verdict == "dominated" and math.isfinite(v.min_gap) and math.isfinite(v.max_gap)


def test_gaps_inside_the_seeds_spread_are_noise():
    """The tie band: a gap no wider than the seeds' R² spread does not count toward the verdict."""
    a = curve([(1, 0.50, 0, 0.02), (10, 0.80, 0, 0.02)])
    b = curve([(1, 0.51, 0, 0.01), (10, 0.79, 0, 0.01)])  # crosses a, but by 0.01 against a spread of 0.02
    v = compare(a, b)
    assert v.verdict == "within noise" and v.within_noise == 1.0
    assert compare(curve([(1, 0.50, 0), (10, 0.80, 0)]), curve([(1, 0.51, 0), (10, 0.79, 0)])).verdict == "crosses"
    wide = curve([(1, 0.40, 0, 0.02), (10, 0.79, 0, 0.02)])  # 0.11 behind at L0 1, 0.01 (noise) ahead at 10
    v = compare(wide, b)
    assert v.verdict == "dominated" and 0 < v.within_noise < 1
