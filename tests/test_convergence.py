"""The "converged at" rule of docs/method.md against hand-made histories."""

from __future__ import annotations

from sagsae.convergence import converged_at


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
