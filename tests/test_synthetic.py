"""The synthetic generators (docs/method.md, "Signed axes") produce the statistics they are asked for."""

from __future__ import annotations

import math

import pytest
import torch

from sagsae.analysis.synthetic import absorption, pair_correlation, protocol_a, protocol_b, protocol_c, protocol_h

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


@pytest.mark.parametrize("bipolar", [True, False])
def test_protocol_h_children_fire_only_with_their_parent_and_its_sign(bipolar):
    data = protocol_h(40_000, parents=6, children=3, p=0.2, q=0.5, bipolar_parents=bipolar, seed=1)
    parents = data.coefficients[:, :6]
    assert data.parent_of.tolist() == [-1] * 6 + [i for i in range(6) for _ in range(3)]
    assert abs(float((parents != 0).float().mean()) - 0.2) < 0.01
    for child in range(6, 24):
        parent = int(data.parent_of[child])
        fired = data.coefficients[:, child] != 0
        assert fired.any() and (parents[fired, parent] != 0).all()  # never without the parent
        assert torch.equal(torch.sign(data.coefficients[fired, child]), torch.sign(parents[fired, parent]))
    with_child = (data.coefficients[:, 6:] != 0).reshape(-1, 6, 3).any(-1)
    assert abs(float(with_child[parents != 0].float().mean()) - 0.5) < 0.02  # one child in half the parents' firings
    assert ((data.coefficients[:, 6:] != 0).reshape(-1, 6, 3).sum(-1) <= 1).all()
    assert bool((parents < 0).any()) is bipolar


@pytest.mark.parametrize("signed", [True, False])
def test_absorption_is_zero_for_a_faithful_dictionary_and_one_where_children_absorb_their_parent(signed):
    data = protocol_h(5_000, parents=4, children=2, p=0.3, q=0.7, bipolar_parents=signed, seed=2)
    coefficients, directions = data.coefficients, data.directions
    if signed:  # one latent per axis, carrying both signs
        decoder, codes = directions.T, coefficients.clone()
    else:  # one latent per signed feature: +v for the positive codes (the parents here are positive)
        decoder, codes = directions.T, coefficients.clamp(min=0)
    assert absorption(codes, coefficients, decoder, directions, data.parent_of, signed) == 0
    absorbed = codes.clone()
    for child in range(4, 12):
        together = (coefficients[:, child] != 0)
        absorbed[together, int(data.parent_of[child])] = 0  # the child's latent takes over the parent's firing
    assert absorption(absorbed, coefficients, decoder, directions, data.parent_of, signed) == 1
    half = codes.clone()
    rows = torch.arange(len(codes)) % 2 == 0
    for child in range(4, 12):
        half[(coefficients[:, child] != 0) & rows, int(data.parent_of[child])] = 0
    assert 0.4 < absorption(half, coefficients, decoder, directions, data.parent_of, signed) < 0.6
