"""The TopK family's sparse products (sagsae/saes/sparse_codes.py) against direct computations and autograd."""

from __future__ import annotations

import torch

from sagsae.saes.sparse_codes import dense_codes, pair_sums, row_top_pairs, selected_pre_activations


def test_pair_sums_is_the_weighted_sum_per_bag_including_empty_bags():
    table = torch.randn(7, 4, dtype=torch.float64)
    bags = torch.tensor([0, 0, 2, 2, 2, 4])  # bags 1 and 3 are empty, and so is the last one (5)
    members = torch.tensor([3, 6, 0, 3, 3, 1])
    weights = torch.randn(6, dtype=torch.float64)
    expected = torch.zeros(6, 4, dtype=torch.float64)
    for bag, member, weight in zip(bags, members, weights):
        expected[bag] += weight * table[member]
    torch.testing.assert_close(pair_sums(table, bags, members, weights, 6), expected)


def test_row_top_pairs_and_dense_codes():
    scores = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 4.0, 6.0]])
    rows, cols = row_top_pairs(scores, 2)
    assert rows.tolist() == [0, 0, 1, 1]
    assert sorted(cols[:2].tolist()) == [1, 2] and sorted(cols[2:].tolist()) == [0, 3]
    codes = dense_codes(scores[rows, cols], rows, cols, scores)
    torch.testing.assert_close(codes, torch.tensor([[0.0, 3.0, 2.0, 0.0], [5.0, 0.0, 0.0, 6.0]]))


def test_selected_pre_activations_gradients_equal_autograd_of_the_dense_product():
    """Pairs with repeated latents across tokens, a token with none and one with several: the custom backward
    against autograd through π = centered · W_encᵀ + b_enc gathered at the pairs (and gradcheck in float64)."""
    generator = torch.Generator().manual_seed(0)
    centered = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    W_enc = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    b_enc = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 3, 3, 3, 4])  # token 2 selects nothing
    cols = torch.tensor([2, 5, 2, 0, 2, 4, 5])
    upstream = torch.randn(7, dtype=torch.float64, generator=generator)

    def sparse(c, w, b):
        with torch.no_grad():
            pre = c @ w.T + b
        return selected_pre_activations(c, w, b, pre, rows, cols)

    got = torch.autograd.grad((sparse(centered, W_enc, b_enc) * upstream).sum(), (centered, W_enc, b_enc))
    dense = (centered @ W_enc.T + b_enc)[rows, cols]
    expected = torch.autograd.grad((dense * upstream).sum(), (centered, W_enc, b_enc))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(sparse, (centered, W_enc, b_enc))
