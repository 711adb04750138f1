"""The synthetic generators (SPEC §7) produce the statistics they are asked for."""

from __future__ import annotations

import math

import pytest
import torch

from sagsae.analysis.synthetic import pair_correlation, protocol_a, protocol_b, protocol_c

N, P = 200_000, 0.04


def test_protocol_a_sparsity_signs_and_directions():
    data = protocol_a(N, p=P)
    fires = data.coefficients != 0
    assert float(fires.float().mean()) == pytest.approx(P, rel=0.03)
    assert float((data.coefficients < 0).sum() / fires.sum()) == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(data.directions.norm(dim=1), torch.ones(48))
    assert data.true_l0 == pytest.approx(48 * P, rel=0.03)


def four_sigma(rate: float, draws: int) -> float:
    """Four standard errors of a Bernoulli rate estimated from `draws` independent draws: the tolerance a correct
    generator passes except once in ~16,000 seeds."""
    return 4 * math.sqrt(rate * (1 - rate) / draws)


@pytest.mark.parametrize("rho", [-1.0, -0.5, 0.0])
def test_protocol_b_pair_cooccurrence(rho):
    """Each sign fires at rate P and both at (1 + ρ)P², each within four standard errors of its N × 48 draws: for
    ρ = −0.5 that is ρ's implied value within ±0.023 (a tolerance of 3e-4 on the joint rate allowed −0.31 … −0.69)."""
    data = protocol_b(N, rho=rho, p=P)
    draws = N * 48
    for indicator in (data.positive, data.negative):
        assert float(indicator.float().mean()) == pytest.approx(P, abs=four_sigma(P, draws))
    together = float((data.positive & data.negative).double().mean())
    expected = (1 + rho) * P * P
    assert together == pytest.approx(expected, abs=four_sigma(expected, draws))
    if rho == -1.0:
        assert together == 0.0
        assert pair_correlation(data) == pytest.approx(-P / (1 - P), rel=0.02)  # the most negative possible
    if rho == 0.0:
        assert abs(pair_correlation(data)) < 0.01


@pytest.mark.parametrize("q", [0.1, 0.5, 1.0])
def test_protocol_c_bipolar_share(q):
    data = protocol_c(N, p=P, q=q)
    has_negative = (data.coefficients < 0).any(0)
    assert float(has_negative.float().mean()) == pytest.approx(round(q * 48) / 48)
    bipolar = has_negative
    share_negative = (data.coefficients[:, bipolar] < 0).sum() / (data.coefficients[:, bipolar] != 0).sum()
    assert float(share_negative) == pytest.approx(0.5, abs=0.02)
