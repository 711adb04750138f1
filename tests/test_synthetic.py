"""The synthetic generators (SPEC §7) produce the statistics they are asked for."""

from __future__ import annotations

import pytest
import torch

from sagsae.synthetic import pair_correlation, protocol_a, protocol_b, protocol_c

N, P = 200_000, 0.04


def test_protocol_a_sparsity_signs_and_directions():
    data = protocol_a(N, p=P)
    fires = data.coefficients != 0
    assert float(fires.float().mean()) == pytest.approx(P, rel=0.03)
    assert float((data.coefficients < 0).sum() / fires.sum()) == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(data.directions.norm(dim=1), torch.ones(48))
    assert data.true_l0 == pytest.approx(48 * P, rel=0.03)


@pytest.mark.parametrize("rho", [-1.0, -0.5, 0.0])
def test_protocol_b_pair_cooccurrence(rho):
    data = protocol_b(N, rho=rho, p=P)
    for indicator in (data.positive, data.negative):
        assert float(indicator.float().mean()) == pytest.approx(P, rel=0.03)
    together = float((data.positive & data.negative).float().mean())
    assert together == pytest.approx((1 + rho) * P * P, abs=3e-4)
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
