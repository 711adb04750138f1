"""The sparse products (sagsae/saes/sparse_codes.py) against direct computations and autograd."""

from __future__ import annotations

import pytest
import torch

from sagsae.saes import build_sae
from sagsae.saes.sparse_codes import dense_codes, nonzero_decode, pair_sums, row_top_pairs, selected_pre_activations


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


def test_nonzero_decode_equals_the_dense_product_with_gradients_on_the_active_entries_only():
    """A token with no active latent and a latent active nowhere: values, the codes' gradient (zero off the
    support), W_dec's (zero for the silent latent) and gradcheck in float64."""
    generator = torch.Generator().manual_seed(1)
    codes = torch.randn(5, 6, dtype=torch.float64, generator=generator)
    codes[codes.abs() < 0.8] = 0
    codes[2] = 0  # a token with no active latent
    codes[:, 4] = 0  # a latent active nowhere
    codes.requires_grad_(True)
    W_dec = torch.randn(3, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    rows, cols = codes.detach().nonzero(as_tuple=True)
    upstream = torch.randn(5, 3, dtype=torch.float64, generator=generator)

    sparse_grads = torch.autograd.grad((nonzero_decode(codes, rows, cols, W_dec) * upstream).sum(), (codes, W_dec))
    dense = codes @ W_dec.T
    dense_grads = torch.autograd.grad((dense * upstream).sum(), (codes, W_dec))
    torch.testing.assert_close(nonzero_decode(codes, rows, cols, W_dec), dense)
    support = codes.detach() != 0
    torch.testing.assert_close(sparse_grads[0], dense_grads[0] * support)  # the active entries' gradients only
    torch.testing.assert_close(sparse_grads[1], dense_grads[1])
    assert torch.equal(sparse_grads[1][:, 4], torch.zeros(3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda c, w: nonzero_decode(c, rows, cols, w), (codes, W_dec))


def trained_gradients(architecture: str, switches: dict, below: float | None, autocast: bool) -> tuple:
    """One loss and backward of a fixed SAE on a fixed batch, five of its latents started above all of their |π|
    (silent): (the loss, every parameter's gradient)."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 4
    torch.manual_seed(0)
    sae = build_sae(architecture, d_in=16, width=40, **switches)
    sae.initialize_from_batch(x)
    with torch.no_grad():
        for threshold in sae.threshold_parameters():
            threshold[:5] = 1e3
    sae.sparse_decode_below = below
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = sae.loss(x, sparsity_coefficient=2.0)
    loss.total.backward()
    return loss.total.detach().float(), {name: p.grad.clone() for name, p in sae.named_parameters()
                                         if p.grad is not None}


ARCHITECTURES = [("sagsae", {}), ("sagsae", {"gate_path": "jump"}), ("sagsae", {"unit_norm_decoder": True}),
                 ("gated", {}), ("jumprelu", {}), ("relu", {})]


@pytest.mark.parametrize("architecture, switches", ARCHITECTURES)
def test_the_sparse_decode_trains_as_the_dense_one(architecture, switches):
    """The whole loss and every parameter's gradient, thresholds' pseudo-derivatives included, with every decode
    sparse (`sparse_decode_below` 1) against every decode dense (None), five latents silent."""
    sparse_loss, sparse = trained_gradients(architecture, switches, 1.0, autocast=False)
    dense_loss, dense = trained_gradients(architecture, switches, None, autocast=False)
    torch.testing.assert_close(sparse_loss, dense_loss)
    assert sparse.keys() == dense.keys()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-5 * float(dense[name].abs().max()))


@pytest.mark.parametrize("architecture, switches", ARCHITECTURES)
def test_under_bf16_the_sparse_decode_is_as_close_to_fp32_as_the_dense_one(architecture, switches):
    """Under bf16 autocast the dense decode runs in bf16 and the sparse one in fp32 (the embedding bag): against
    the fp32 step, each gradient of the sparse one errs by no more than the dense one's (plus 1% of the larger of
    the two gradients).
    bf16's own error is large for the biases whose gradients cancel across the batch (SA-GSAE's b_mag: of the
    order of the gradient itself), so the dense bf16 step, not fp32, sets what is tolerated."""
    _, reference = trained_gradients(architecture, switches, None, autocast=False)
    _, sparse = trained_gradients(architecture, switches, 1.0, autocast=True)
    _, dense = trained_gradients(architecture, switches, None, autocast=True)
    for name, exact in reference.items():
        size = max(float(exact.abs().max()), float(dense[name].abs().max()))  # θ's: 0 in fp32, the band moves in bf16
        sparse_error = float((sparse[name] - exact).abs().max())
        dense_error = float((dense[name] - exact).abs().max())
        assert sparse_error <= dense_error + 0.01 * size, (name, sparse_error, dense_error, size)


def test_the_decode_is_sparse_only_at_or_below_the_density_threshold():
    """Which path ran shows in the codes' gradient: the dense product's reaches the zero codes, the sparse one's
    does not."""
    sae = build_sae("relu", d_in=8, width=20)
    codes = torch.relu(torch.randn(10, 20, generator=torch.Generator().manual_seed(3)))  # about half active
    density = float((codes != 0).float().mean())
    for below, sparse in ((density - 0.05, False), (density + 1e-6, True), (None, False)):
        sae.sparse_decode_below = below
        leaf = codes.clone().requires_grad_(True)
        decoded = sae.decode(leaf)
        decoded.sum().backward()
        torch.testing.assert_close(decoded, codes @ sae.W_dec.T + sae.b_dec)
        assert bool((leaf.grad[codes == 0] == 0).all()) == sparse, below


def test_the_training_module_sets_the_switch_and_refuses_a_share_outside_zero_to_one():
    from lightning_modules import SAEModule

    assert SAEModule.from_arguments("sagsae", d_in=8, width=16, sparse_decode_below=0.05).sae.sparse_decode_below == 0.05
    assert SAEModule.from_arguments("sagsae", d_in=8, width=16).sae.sparse_decode_below == "auto"
    assert SAEModule.from_arguments("sagsae", d_in=8, width=16, sparse_decode_below=None).sae.sparse_decode_below is None
    for bad in (1.5, "sometimes"):
        with pytest.raises(ValueError, match="sparse_decode_below must lie in"):
            SAEModule.from_arguments("sagsae", d_in=8, width=16, sparse_decode_below=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_decodes_sparsely_below_its_share_for_fp32_codes_on_cpu_only(dtype):
    """"auto" resolves from the codes: AUTO_SPARSE_SHARE for fp32 on CPU (the measured crossover), dense for bf16
    (where the sparse decode measured slower); the decoded values are the dense decode's either way. Below
    AUTO_SPARSE_FULL_D_IN the share falls in proportion to d_in, as the measured crossover does."""
    from sagsae.saes.base import AUTO_SPARSE_FULL_D_IN, AUTO_SPARSE_SHARE

    narrow = build_sae("gated", d_in=AUTO_SPARSE_FULL_D_IN // 4, width=8)
    narrow.sparse_decode_below = "auto"
    assert narrow.sparse_share(torch.zeros(2, 8, dtype=dtype)) == (AUTO_SPARSE_SHARE / 4 if dtype == torch.float32
                                                                   else None)
    sae = build_sae("gated", d_in=AUTO_SPARSE_FULL_D_IN, width=200)
    sae.sparse_decode_below = "auto"
    generator = torch.Generator().manual_seed(0)
    for density, sparse_expected in ((AUTO_SPARSE_SHARE / 2, dtype == torch.float32), (AUTO_SPARSE_SHARE * 2, False)):
        codes = torch.randn(40, 200, generator=generator) * (torch.rand(40, 200, generator=generator) < density)
        leaf = codes.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            decoded = sae.decode(leaf)
        decoded.float().sum().backward()
        assert sae.sparse_share(leaf) == (AUTO_SPARSE_SHARE if dtype == torch.float32 else None)
        torch.testing.assert_close(decoded.float(), (leaf.float() @ sae.W_dec.T + sae.b_dec).float(),
                                   rtol=2e-2, atol=2e-2)
        # the sparse decode's gradient touches only the active codes; the dense one's reaches every entry
        assert bool((leaf.grad[codes == 0] == 0).all()) == sparse_expected, density
