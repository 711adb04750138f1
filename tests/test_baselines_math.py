"""Baselines (docs/method.md, "Baselines") against direct computations on small tensors with fixed weights."""

from __future__ import annotations

import pytest
import torch

from sagsae.commands.params import matching_width
from sagsae.saes import SAE_REGISTRY, build_sae, sae_class
from sagsae.saes.base import centered_projection
from tests.conftest import perturbed_sae

D, H, B, LAM = 6, 10, 32, 0.7


def make(name: str, **kwargs):
    return perturbed_sae(name, D, H, **kwargs)


def close(a, b):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)


def decode(sae, codes):
    return codes @ sae.W_dec.detach().T + sae.b_dec.detach()


def sq(x, y):
    return ((x - y) ** 2).sum(1).mean()


X = torch.randn(B, D) * 2


def test_relu_l1():
    sae = make("relu")
    pre = (X - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    codes = torch.relu(pre)
    out = sae.loss(X, LAM)
    close(out.codes, codes)
    close(out.terms["recon"], sq(X, decode(sae, codes)))
    close(out.terms["sparsity"], LAM * (codes * sae.W_dec.norm(dim=0)).sum(1).mean())


@pytest.mark.parametrize("unit_norm_decoder", [False, True], ids=["form-b", "form-a"])
def test_gated_both_forms(unit_norm_decoder):
    sae = make("gated", unit_norm_decoder=unit_norm_decoder)
    u = (X - sae.b_dec) @ sae.W_gate.T
    pi = u + sae.b_gate
    codes = (pi > 0).float() * torch.relu(sae.r_mag.exp() * u + sae.b_mag)
    out = sae.loss(X, LAM)
    close(out.codes, codes)
    close(out.terms["recon"], sq(X, decode(sae, codes)))
    weights = torch.ones(H) if unit_norm_decoder else sae.W_dec.norm(dim=0)
    close(out.terms["sparsity"], LAM * (torch.relu(pi) * weights).sum(1).mean())
    close(out.terms["aux"], sq(X, decode(sae, torch.relu(pi))))
    # who trains what: the aux term reaches the decoder in form (b) only; the gate passes nothing to b_gate
    sae.zero_grad()
    out.terms["aux"].backward(retain_graph=True)
    decoder_grad = sae.W_dec.grad.abs().sum() if sae.W_dec.grad is not None else torch.tensor(0.0)
    assert (decoder_grad == 0) == unit_norm_decoder
    sae.zero_grad()
    out.terms["recon"].backward()
    assert sae.b_gate.grad is None or (sae.b_gate.grad == 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_jumprelu_codes_l0_and_pseudo_derivatives(fused):
    """Both forms of the loss: codes and L0 from one fused function, and composed from BiJump and the step."""
    sae = make("jumprelu", bandwidth=0.5)
    sae.use_fused_chain = fused
    pre = (X - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    open_ = pre > sae.threshold
    out = sae.loss(X, LAM)
    close(out.codes, pre * open_)
    close(out.terms["sparsity"], LAM * open_.float().sum(1).mean())
    assert torch.equal(out.firing, open_.float().sum(0))
    sae.zero_grad()
    out.terms["sparsity"].backward(retain_graph=True)
    band = ((pre - sae.threshold).abs() < 0.25).float().detach()
    assert band.sum() > 0
    close(sae.threshold.grad, -LAM / 0.5 * band.sum(0) / B)  # −(λ/ε) Σ K / B
    sae.zero_grad()
    out.codes.sum().backward()
    close(sae.threshold.grad, -(sae.threshold / 0.5) * (band * (pre > 0)).sum(0))  # −(θ/ε) Σ K


def topk_direct(values, scores, k):
    keep = torch.zeros_like(values, dtype=torch.bool)
    for n in range(len(values)):
        keep[n, scores[n].argsort(descending=True)[:k]] = True
    return torch.where(keep, values, 0)


@pytest.mark.parametrize("name", ["topk", "abstopk"])
def test_topk_and_abstopk_with_auxk(name):
    sae = make(name, k=3, aux_k=2)
    pre = (X - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    values = pre if name == "abstopk" else torch.relu(pre)
    scores = values.abs()
    codes = topk_direct(values, scores, 3)
    dead = torch.zeros(H, dtype=torch.bool)
    dead[[0, 3, 7]] = True
    out = sae.loss(X, LAM, dead=dead)
    close(out.codes, codes)
    assert ((out.codes != 0).sum(1) <= 3).all() and ((out.codes != 0).sum(1) == 3).any()
    x_hat = decode(sae, codes)
    close(out.terms["recon"], sq(X, x_hat))
    dead_scores = torch.where(dead, scores, -torch.inf)
    aux_codes = topk_direct(torch.where(dead, values, 0), dead_scores, 2)
    close(out.terms["auxk"], sq(X - x_hat, aux_codes @ sae.W_dec.T) / 32)
    if name == "abstopk":
        assert (out.codes < 0).any(), "AbsTopK keeps negative codes"


def test_batchtopk_training_and_inference_threshold():
    sae = make("batchtopk", k=2)
    out = sae.loss(X, LAM)
    values = torch.relu((X - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach()
    kept = values.flatten().topk(2 * B).values
    assert int((out.codes != 0).sum()) == 2 * B
    close(out.codes.flatten().sort().values[-2 * B:], kept.sort().values)
    close(sae.threshold, kept.min())
    sae.eval()
    close(sae.encode(X), torch.where(values > kept.min(), values, 0))


def test_batchtopk_running_threshold_follows_its_rule_over_several_batches():
    """Start at the first batch's smallest positive kept value, then an EMA toward each batch's; a batch with no
    positive kept value leaves it as it is (the rule, computed directly, against the module's sync-free one)."""
    sae = make("batchtopk", k=2, threshold_momentum=0.9)
    expected = None
    for kept in (torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.5, 3.0]), torch.tensor([-2.0, 0.0]),
                 torch.tensor([0.25, 4.0]), torch.tensor([1.0, 1.0]).bfloat16()):
        sae.update_threshold(kept)
        positive = [float(v) for v in kept.float() if v > 0]
        if positive:
            expected = min(positive) if expected is None else 0.9 * expected + 0.1 * min(positive)
        assert sae.threshold.dtype == torch.float32
        assert float(sae.threshold) == pytest.approx(expected, rel=1e-6)


def test_unit_norm_decoder_projects_gradients_and_renormalizes():
    for name in ("jumprelu", "topk", "batchtopk", "abstopk"):
        sae = make(name, **({"k": 3} if "topk" in name else {}))
        sae.loss(X, LAM, dead=torch.ones(H, dtype=torch.bool)).total.backward()
        sae.before_optimizer_step()
        columns = sae.W_dec / sae.W_dec.norm(dim=0)
        close((columns * sae.W_dec.grad).sum(0), torch.zeros(H))
        with torch.no_grad():
            sae.W_dec.mul_(3.0)
        sae.after_optimizer_step()
        close(sae.W_dec.norm(dim=0), torch.ones(H))


@pytest.mark.parametrize("name", ["relu", "gated", "sagsae"])
def test_encoder_shrink_decoder_grow_does_not_lower_the_penalty(name):
    """Scaling a latent's encoder by 1/c and its decoder column by c keeps x̂; the norm-weighted penalty
    must not fall, so the escape gains nothing."""
    sae = make(name)
    before = sae.loss(X, LAM)
    with torch.no_grad():
        c = 4.0
        sae.W_dec.mul_(c)
        for encoder in ("W_enc", "b_enc", "W_gate", "b_gate", "b_mag", "threshold"):
            if hasattr(sae, encoder):
                getattr(sae, encoder).div_(c)
    after = sae.loss(X, LAM)
    close(after.reconstruction, before.reconstruction)
    assert float(after.terms["sparsity"]) >= float(before.terms["sparsity"]) * (1 - 1e-5)


def test_parameter_counts_are_exact():
    d, h = 576, 4608
    expected = {
        "sagsae": 2 * h * d + d + 4 * h,  # W_gate, W_dec, b_dec; b_gate, b_mag, r, θ
        "gated": 2 * h * d + d + 3 * h,  # b_gate, b_mag, r_mag
        "relu": 2 * h * d + d + h,
        "jumprelu": 2 * h * d + d + 2 * h,
        "topk": 2 * h * d + d + h,
        "batchtopk": 2 * h * d + d + h,  # the inference threshold is a buffer, not trained
        "abstopk": 2 * h * d + d + h,
    }
    assert set(expected) == {name for name, cls in SAE_REGISTRY.items() if cls.__module__.startswith("sagsae.")}
    for name, count in expected.items():
        assert sae_class(name).parameter_count(d, h) == count, name
    untied = build_sae("sagsae", d_in=d, width=h, tie_r=False, tie_theta=False)
    assert sum(p.numel() for p in untied.parameters()) == 2 * h * d + d + 6 * h
    assert sae_class("gated").parameter_count(d, 2 * h) == 4 * h * d + d + 6 * h  # Gated(2H): docs/method.md
    target = sae_class("sagsae").parameter_count(d, h)
    assert matching_width(sae_class("gated"), d, h, target) == pytest.approx(h * (2 * d + 4) / (2 * d + 3))


@pytest.mark.parametrize("name, option", [("gated", "gate_init_quantile"), ("jumprelu", "theta_init_quantile")])
def test_quantile_start_opens_each_latent_on_one_minus_q_of_the_first_batch(name, option):
    """Gated: b_gate = −(the q-quantile of each u = W_gate x̃); JumpReLU: θ = the q-quantile of each
    pre-activation W_enc x̃. Either way each latent fires on 1 − q of the first batch."""
    torch.manual_seed(0)
    sae = build_sae(name, d_in=8, width=6, **{option: 0.75})
    x = torch.randn(400, 8)
    sae.initialize_from_batch(x)
    weights = sae.W_gate if name == "gated" else sae.W_enc
    projections = (x - x.mean(0)) @ weights.T
    expected = torch.stack([column.sort().values[299] for column in projections.T])
    close(-sae.b_gate if name == "gated" else sae.threshold, expected)
    close((sae.encode(x) != 0).float().mean(0), torch.full((6,), 0.25))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=option):
            build_sae(name, d_in=8, width=6, **{option: bad})


def batch_top_direct(values, k):
    """BatchTopK's training rule, directly: the k·B largest values of the whole batch."""
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[values.flatten().argsort(descending=True)[:k * len(values)]] = True
    return torch.where(keep.reshape(values.shape), values, 0)


@pytest.mark.parametrize("name", ["topk", "abstopk", "batchtopk"])
@pytest.mark.parametrize("dead_latents", [[], [0, 3, 7]])
def test_topk_family_gradients_match_the_dense_computation(name, dead_latents):
    """The sparse backward (sagsae/saes/sparse_codes.py: encoder and decoder differentiated through the selected pairs
    only, AuxK's dead pairs included) gives every parameter the gradient of the dense computation."""
    sae = make(name, k=3, aux_k=2)
    dead = torch.zeros(H, dtype=torch.bool)
    dead[dead_latents] = True
    sae.loss(X, LAM, dead=dead).total.backward()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    fast = [p.grad.clone() for p in params]
    sae.zero_grad()
    pre = (X - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    values = pre if name == "abstopk" else torch.relu(pre)
    codes = batch_top_direct(values, 3) if name == "batchtopk" else topk_direct(values, values.abs(), 3)
    x_hat = codes @ sae.W_dec.T + sae.b_dec
    loss = sq(X, x_hat)
    if dead_latents:
        aux = topk_direct(torch.where(dead, values, 0), torch.where(dead, values.abs(), -torch.inf), 2)
        loss = loss + sq(X - x_hat.detach(), aux @ sae.W_dec.T) / 32
    loss.backward()
    for got, param in zip(fast, params):
        close(got, param.grad)


@pytest.mark.parametrize("name", ["topk", "abstopk", "batchtopk"])
def test_topk_family_firing_counts_from_the_pairs_equal_a_count_of_the_codes(name):
    """The loss's per-latent firing counts (read from the selected pairs) count non-zero codes only: a selected
    pair whose ReLU code is 0 does not fire. A negative b_enc makes some of the k best codes exactly 0."""
    sae = make(name, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)
    out = sae.loss(X, LAM)
    direct = [sum(1 for row in out.codes if row[j] != 0) for j in range(H)]
    assert out.firing.tolist() == direct
    assert name == "abstopk" or (out.codes != 0).sum() < 5 * len(X)  # the zero-code case is exercised


@pytest.mark.parametrize("with_bias", [True, False])
def test_centered_projection_equals_the_direct_product_in_value_and_gradients(with_bias):
    """(x − b_dec)·Wᵀ + bias, with b_dec's gradient through an [H] vector (sagsae/saes/base.py): the same value
    bit for bit, and every gradient (b_dec, W, bias) of the direct computation."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=generator)
    b_dec, W, bias = (torch.randn(*shape, generator=generator, requires_grad=True) for shape in ((D,), (H, D), (H,)))
    upstream = torch.randn(B, H, generator=generator)
    got = centered_projection(x, b_dec, W, bias if with_bias else None)
    direct = (x - b_dec) @ W.T + (bias if with_bias else 0)
    assert torch.equal(got.detach(), ((x - b_dec) @ W.T + (bias if with_bias else 0)).detach())
    inputs = (b_dec, W, bias) if with_bias else (b_dec, W)
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), inputs),
                    torch.autograd.grad((direct * upstream).sum(), inputs)):
        close(a, b)


@pytest.mark.parametrize("name", sorted(SAE_REGISTRY))
def test_every_loss_carries_its_unweighted_squared_errors(name):
    """SAELoss.squared_error (what a training step's R² and MSE are read from) is ‖x − x̂‖² of the loss's own
    reconstruction, averaged over the batch; a gated SAE's gate_squared_error is its aux term (tested against
    direct computations above and in test_sagsae_math.py) without the aux_weight."""
    gated = name in ("gated", "sagsae")
    sae = make(name, **({"aux_weight": 0.25} if gated else {"k": 3} if "topk" in name else {}))
    out = sae.loss(X, LAM)
    close(out.squared_error, sq(X, out.reconstruction))
    if gated:
        close(out.gate_squared_error, out.terms["aux"] / 0.25)
    else:
        assert out.gate_squared_error is None
