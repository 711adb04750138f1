"""The "converged at" rule of docs/method.md against hand-made histories."""

from __future__ import annotations

import math
import random

import pytest

from sagsae.analysis.convergence import (L0_TOLERANCE, R2_TOLERANCE, alternation, at_target, converged_at,
                                        gain_at_matched_l0, plateau, settling)


def history(*points: tuple[float, float]) -> list[dict[str, float]]:
    return [{"tokens_seen": 1000 * (i + 1), "r2": r2, "l0": l0} for i, (r2, l0) in enumerate(points)]


def test_the_first_budget_from_which_every_later_one_stays_within_tolerance():
    assert converged_at(history((0.5, 80), (0.70, 41), (0.703, 40), (0.704, 40.5))) == 2000
    # a dip back out of the band after looking settled restarts the count
    assert converged_at(history((0.70, 40), (0.69, 40), (0.70, 40), (0.701, 40))) == 3000
    # L0 5% off the final value is out, within 5% is in
    assert converged_at(history((0.7, 43), (0.7, 41.9), (0.7, 40))) == 2000


def test_still_moving_or_too_short_is_not_converged():
    assert converged_at(history((0.5, 80), (0.6, 60), (0.7, 40))) is None
    assert converged_at(history((0.70, 40), (0.70, 40), (0.69, 40), (0.70, 40))) is None  # a dip just before the end
    assert converged_at(history((0.7, 40))) is None
    assert converged_at([]) is None


def rising_then(tail: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Four checkpoints of a run still learning, then `tail`."""
    return history((0.40, 120), (0.55, 90), (0.65, 70), (0.72, 62), *tail)


def jittery_plateau(points: int, r2_noise: float, l0_noise: float, seed: int = 0,
                    r2_per_point: float = 0.0, l0_per_point: float = 0.0) -> list[tuple[float, float]]:
    noise = random.Random(seed)
    return [(0.80 + r2_per_point * i + noise.gauss(0, r2_noise), 55 * (1 + l0_per_point * i + noise.gauss(0, l0_noise)))
            for i in range(points)]


def test_a_plateau_noisier_than_the_fixed_band_converges_where_it_begins():
    runs = rising_then(jittery_plateau(12, r2_noise=0.004, l0_noise=0.07))
    reading = plateau(runs)
    assert converged_at(runs) is None  # the fixed 5% band is narrower than this member's own jitter
    assert reading.l0_band > 0.1 and reading.r2_band > R2_TOLERANCE
    assert reading.converged_at == runs[4]["tokens_seen"]


def test_a_trend_wider_than_the_band_is_drifting_not_converged():
    runs = rising_then(jittery_plateau(12, r2_noise=0.002, l0_noise=0.02, l0_per_point=-0.03))
    reading = plateau(runs)
    assert reading.drifting and reading.l0_drift < -reading.l0_band
    assert reading.converged_at is None


def test_a_broken_run_is_too_noisy_to_call():
    runs = rising_then([(0.8 if i % 2 else 0.2, 55 if i % 3 else 300) for i in range(12)])
    reading = plateau(runs)
    assert reading.too_noisy and reading.converged_at is None


def test_without_noise_the_bands_are_the_fixed_tolerances_and_the_rules_agree():
    runs = history((0.5, 80), (0.70, 41), (0.703, 40), (0.704, 40.5), (0.704, 40.5), (0.704, 40.5), (0.704, 40.5))
    reading = plateau(runs)
    assert (reading.r2_band, reading.l0_band) == (R2_TOLERANCE, L0_TOLERANCE)
    assert reading.converged_at == converged_at(runs) == 2000


def test_one_spike_does_not_widen_the_band():
    calm = jittery_plateau(12, r2_noise=0.003, l0_noise=0.03)
    spiked = list(calm)
    spiked[9] = (0.5, 200)
    assert plateau(rising_then(spiked)).r2_band < 1.5 * plateau(rising_then(calm)).r2_band


def test_too_short_to_estimate_a_jitter():
    assert plateau(history((0.7, 40), (0.7, 40), (0.7, 40), (0.7, 40), (0.7, 40))) is None


def test_a_slide_along_the_curve_gains_nothing_at_matched_l0_and_a_rising_curve_does():
    """gain_at_matched_l0 against direct computations: a member whose second half moves exactly along a curve
    R² = 0.1 · ln L0 (denser and better) gains 0; one whose L0 falls at constant R² gains −0.1 · ln(1 + ΔL0/L0)."""
    slide = history(*[(0.1 * math.log(l0), l0) for l0 in (30, 35, 40, 41, 42, 43, 44, 45, 46, 47)])
    reading = plateau(slide)
    assert reading.r2_drift > 0 and reading.l0_drift > 0
    # the fitted trends are linear in tokens, the curve in ln L0: equal only to first order in the L0 step
    assert abs(gain_at_matched_l0(reading, 0.1)) < 0.1 * reading.r2_drift
    leaner = history(*[(0.7, 50 * (1 - 0.02 * i)) for i in range(12)])
    reading = plateau(leaner)
    expected = -0.1 * math.log1p(reading.l0_drift)
    assert gain_at_matched_l0(reading, 0.1) == pytest.approx(expected) and expected > 0.005
    broken = plateau(rising_then([(0.8 if i % 2 else 0.2, 55 if i % 3 else 300) for i in range(12)]))
    assert math.isnan(gain_at_matched_l0(broken, 0.1))


def test_a_curves_slope_in_log_l0_against_direct_secants():
    from sagsae.analysis.pareto import Curve

    curve = Curve.from_points([(10, 0.5, 0), (20, 0.6, 0), (80, 0.7, 0)], width=8)
    left, right = 0.1 / math.log(2), 0.1 / math.log(4)
    assert curve.slope_at(15) == pytest.approx(left)  # inside a segment
    assert curve.slope_at(20) == pytest.approx((left + right) / 2)  # at a sweep point between two segments
    assert curve.slope_at(80) == pytest.approx(right) and curve.slope_at(500) == pytest.approx(right)  # at/beyond an end
    assert curve.slope_at(5) == pytest.approx(left)
    assert math.isnan(Curve.from_points([(10, 0.5, 0)], width=8).slope_at(10))
    # two sweep points at the same L0 make a zero-length segment, which has no slope and is skipped
    tied = Curve.from_points([(10, 0.5, 0), (20, 0.6, 0), (20, 0.62, 0), (80, 0.7, 0)], width=8)
    assert tied.slope_at(50) == pytest.approx(0.08 / math.log(4))
    assert tied.slope_at(15) == pytest.approx(left)


def budget_history(points: list[tuple[float, float]], every: int = 512_000) -> list[dict[str, float]]:
    return [{"tokens_seen": every * (i + 1), "r2": r2, "l0": l0} for i, (r2, l0) in enumerate(points)]


def learning_then(plateau_points: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Three checkpoints (1.5M tokens) of a run still learning, then the rest."""
    return budget_history([(0.50, 90), (0.60, 70), (0.66, 60), *plateau_points])


def test_a_quiet_plateau_within_the_seeds_spread_has_settled():
    seeds = [learning_then(jittery_plateau(12, r2_noise=0.0005, l0_noise=0.005, seed=s)) for s in range(2)]
    reading = settling(seeds[0], seeds)
    assert reading.wasteful == 0 and reading.converged_at is not None and reading.settled, reading


def test_l0_rising_while_r2_falls_is_waste_and_not_settled():
    drifting = learning_then([(0.80 - 0.004 * i, 55 * (1 + 0.04 * i)) for i in range(12)])
    reading = settling(drifting, [drifting, learning_then(jittery_plateau(12, 0.001, 0.01))])
    assert reading.wasteful > 0 and not reading.settled


def test_a_jump_larger_than_the_seeds_spread_is_not_settled():
    quiet = [learning_then(jittery_plateau(12, r2_noise=0.0005, l0_noise=0.005, seed=s)) for s in range(2)]
    jumpy = [dict(row) for row in quiet[0]]
    jumpy[8]["r2"] -= 0.02  # one check 0.02 below its neighbours, as the unsettled default showed
    reading = settling(jumpy, [jumpy, quiet[1]])
    assert reading.largest_jump[0] > reading.seed_spread[0] and not reading.settled
    assert settling(quiet[0], quiet).settled


def test_settled_at_a_target_l0_means_on_target_and_flat_over_the_last_third():
    on_target = budget_history([(0.60 + 0.01 * min(i, 6), 40 * (1.02 if i % 2 else 0.98)) for i in range(12)])
    reading = at_target(on_target, 40)
    last_third = [row for row in on_target if row["tokens_seen"] >= on_target[-1]["tokens_seen"] * 2 / 3]
    assert reading.checks == len(last_third) and reading.l0_off == pytest.approx(0.02)
    assert reading.r2_trend == pytest.approx(0.0) and reading.settled
    off = [dict(row) for row in on_target]
    off[-2]["l0"] = 43  # 7.5% above the target in the last third
    assert at_target(off, 40).l0_off == pytest.approx(0.075) and not at_target(off, 40).settled
    still_rising = budget_history([(0.60 + 0.003 * i, 40) for i in range(12)])
    tokens_per_check = still_rising[1]["tokens_seen"] - still_rising[0]["tokens_seen"]
    assert at_target(still_rising, 40).r2_trend == pytest.approx(0.003 / (tokens_per_check / 1e6))
    assert not at_target(still_rising, 40).settled
    assert not at_target(on_target[-1:], 40).settled  # one check cannot show a trend


def test_a_run_too_short_to_pass_two_million_tokens_is_read_not_settled():
    short = budget_history([(0.5, 60), (0.6, 50)])
    reading = settling(short, [short, short])
    assert reading.largest_jump == (0.0, 0.0) and reading.wasteful == 0 and not reading.settled


def test_alternation_reads_a_period_two_flip_and_not_a_trend_or_noise():
    """L0 = 64 · e^(±0.03) on alternate steps over a slow 10% rise: amplitude 0.03, lag-1 autocorrelation near −1;
    the rise alone reads 0; independent noise of σ 0.03 reads a lag-1 autocorrelation near 0."""
    steps = range(400)
    flipping = alternation([64 * math.exp(0.1 * t / 400 + 0.03 * (-1) ** t) for t in steps])
    assert flipping.amplitude == pytest.approx(0.03, rel=1e-6) and flipping.lag_one < -0.99
    assert alternation([64 * math.exp(0.1 * t / 400) for t in steps]).amplitude == pytest.approx(0.0, abs=1e-12)
    rng = random.Random(0)
    noisy = alternation([64 * math.exp(rng.gauss(0, 0.03)) for _ in steps])
    assert abs(noisy.lag_one) < 0.15
    with pytest.raises(ValueError, match="at least 23 steps"):
        alternation([1.0] * 10)
