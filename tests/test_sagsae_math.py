"""SA-GSAE (docs/method.md) against a direct, loop-free-of-tricks computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sagsae.saes import build_sae
from tests.conftest import perturbed_sae
from sagsae.saes.straight_through import bi_jump_relu, jump_relu_with_counts, two_sided_soft_threshold, two_sided_step

D, H, B = 5, 7, 64


def make_sae(**kwargs):
    kwargs.setdefault("bandwidth", 0.5)  # wide enough that some π of a small batch lie in the kernel's band
    return perturbed_sae("sagsae", D, H, threshold_spread=0.3, **kwargs)


def direct(sae, x, lam):
    """The formulation (docs/method.md) written out elementwise from the parameters."""
    theta_pos, theta_neg = (t.detach() for t in sae.thresholds())
    r_pos, r_neg = (t.detach() for t in sae.magnitude_rescales())
    W_gate, W_dec = sae.W_gate.detach(), sae.W_dec.detach()
    b_dec, b_gate, b_mag = sae.b_dec.detach(), sae.b_gate.detach(), sae.b_mag.detach()
    codes = torch.zeros(len(x), H)
    gate_codes = torch.zeros(len(x), H)
    for n in range(len(x)):
        x_tilde = x[n] - b_dec
        for i in range(H):
            u = float(W_gate[i] @ x_tilde)
            pi = u + float(b_gate[i])
            g = float(pi - theta_pos[i] > 0) + float(-pi - theta_neg[i] > 0)
            s = math.copysign(1.0, pi)
            m = math.exp(float(r_pos[i] if s > 0 else r_neg[i])) * u + float(b_mag[i])
            consistent = s * m > 0 or not sae.sign_consistency
            codes[n, i] = g * m if consistent else 0.0
            threshold = float(theta_pos[i] if s > 0 else theta_neg[i])
            gate_codes[n, i] = g * (s * (abs(pi) - threshold) if sae.gate_path == "soft" else pi)
    x_hat = codes @ W_dec.T + b_dec
    gate_x_hat = gate_codes @ W_dec.T + b_dec
    norms = W_dec.norm(dim=0)
    recon = ((x - x_hat) ** 2).sum(1).mean()
    sparsity = lam * (gate_codes.abs() * norms).sum(1).mean()
    aux = sae.aux_weight * ((x - gate_x_hat) ** 2).sum(1).mean()
    return codes, x_hat, {"recon": recon, "sparsity": sparsity, "aux": aux}


@pytest.mark.parametrize(
    "switches",
    [{}, {"tie_r": False, "tie_theta": False}, {"sign_consistency": False}, {"aux_weight": 0.5},
     {"gate_path": "jump"}, {"gate_path": "jump", "tie_r": False, "tie_theta": False}],
    ids=["tied", "untied", "no-sign-consistency", "aux-0.5", "jump-gate-path", "jump-gate-path-untied"],
)
def test_forward_and_loss_match_direct_computation(switches):
    sae = make_sae(**switches)
    x = torch.randn(B, D) * 2
    out = sae.loss(x, sparsity_coefficient=0.7)
    codes, x_hat, terms = direct(sae, x, 0.7)
    torch.testing.assert_close(out.codes.detach(), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction.detach(), x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x).detach(), codes, rtol=1e-5, atol=1e-5)
    for name, value in terms.items():
        torch.testing.assert_close(out.terms[name].detach(), value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.total.detach(), sum(terms.values()), rtol=1e-5, atol=1e-5)
    assert (codes != 0).any() and (codes == 0).any(), "the fixture must open some gates and close others"
    if sae.sign_consistency:  # a code never fires against its gate's polarity
        assert ((codes * sae.paths(x)[1].detach()) >= 0).all()


def test_bijump_pseudo_derivatives_match_spec_formulas():
    eps = 0.1
    theta_pos = torch.tensor([0.3, 0.3, 0.3, 0.3], requires_grad=True)
    theta_neg = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    # inside the + band, outside all bands, inside the − band, open on the − side far from its band
    z = torch.tensor([[0.32, 0.1, -0.47, -2.0]], requires_grad=True)
    out = bi_jump_relu(z, theta_pos, theta_neg, eps)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.32, 0.0, 0.0, -2.0]]))
    grad_out = torch.tensor([[1.5, 2.0, -0.7, 3.0]])
    out.backward(grad_out)
    # ∂/∂z = gate; ∂/∂θ⁺ = −(θ⁺/ε) K((z−θ⁺)/ε) for z > 0; ∂/∂θ⁻ = +(θ⁻/ε) K((−z−θ⁻)/ε) for z < 0
    torch.testing.assert_close(z.grad, torch.tensor([[1.5, 0.0, 0.0, 3.0]]))
    torch.testing.assert_close(theta_pos.grad, torch.tensor([-1.5 * 0.3 / eps, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(theta_neg.grad, torch.tensor([0.0, 0.0, -0.7 * 0.5 / eps, 0.0]))


def test_two_sided_step_pseudo_derivatives():
    eps = 0.2
    theta_pos = torch.full((3,), 0.4, requires_grad=True)
    theta_neg = torch.full((3,), 0.4, requires_grad=True)
    z = torch.tensor([[0.45, -0.35, 1.0], [0.2, -0.9, 0.38]], requires_grad=True)
    gate = two_sided_step(z, theta_pos, theta_neg, eps)
    torch.testing.assert_close(gate.detach(), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    gate.backward(torch.ones_like(gate))
    assert z.grad is None or (z.grad == 0).all()  # a step passes nothing to its input
    # −K((z−θ⁺)/ε)/ε summed over the batch: entries 0.45 and 0.38 sit in the + band of their latents
    torch.testing.assert_close(theta_pos.grad, torch.tensor([-1 / eps, 0.0, -1 / eps]))
    torch.testing.assert_close(theta_neg.grad, torch.tensor([0.0, -1 / eps, 0.0]))  # −0.35 is in the − band


@pytest.mark.parametrize("function", [bi_jump_relu, two_sided_step])
def test_jump_functions_work_in_fp32_under_bf16_autocast(function):
    """Mixed precision hands them bf16 pre-activations: the output and the θ gradients are the fp32 ones of the
    same (bf16-rounded) values, not bf16 sums over the batch."""
    torch.manual_seed(0)
    z = (torch.randn(512, 6) * 0.5).bfloat16().requires_grad_()
    theta = torch.full((6,), 0.3, requires_grad=True)
    reference_theta = theta.detach().clone().requires_grad_()
    grad_out = torch.randn(512, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = function(z, theta, theta, 0.05)
    out.backward(grad_out)
    reference = function(z.detach().float(), reference_theta, reference_theta, 0.05)
    reference.backward(grad_out)
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    assert torch.equal(theta.grad, reference_theta.grad) and theta.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jump_relu_with_counts_equals_the_composed_jump_and_step(dtype):
    """JumpReLU's fused codes-and-counts against `bi_jump_relu` and `two_sided_step` with θ⁻ = ∞: values, the
    input's gradient and θ's (both pseudo-derivatives at once), with entries inside the band on both sides of θ
    and a band that reaches below zero (where only the step's kernel counts)."""
    torch.manual_seed(0)
    eps = 0.4
    z = (torch.randn(256, 6) * 0.5).to(dtype)
    theta = torch.tensor([0.1, 0.3, 0.3, 0.5, 0.15, 0.8])
    grad_codes, grad_counts = torch.randn(256, 6), torch.randn(6)
    fused_z, fused_theta = z.clone().requires_grad_(), theta.clone().requires_grad_()
    codes, counts = jump_relu_with_counts(fused_z, fused_theta, eps)
    torch.autograd.backward((codes, counts), (grad_codes, grad_counts))
    never = torch.full_like(theta, math.inf)
    ref_z, ref_theta = z.clone().requires_grad_(), theta.clone().requires_grad_()
    ref_codes = bi_jump_relu(ref_z, ref_theta, never, eps)
    ref_counts = two_sided_step(ref_z, ref_theta, never, eps).sum(0)
    torch.autograd.backward((ref_codes, ref_counts), (grad_codes, grad_counts))
    assert codes.dtype == torch.float32 and torch.equal(codes, ref_codes) and torch.equal(counts, ref_counts)
    assert torch.equal(fused_z.grad, ref_z.grad)
    torch.testing.assert_close(fused_theta.grad, ref_theta.grad)
    z_band = (z.float() - theta).abs() < eps / 2
    assert (z_band & (z.float() > 0)).any() and (z_band & (z.float() <= 0)).any()  # both kernels are exercised


def test_soft_threshold_gate_path_has_ordinary_gradients():
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    z = torch.tensor([[1.0, -2.0, 0.2]])
    out = two_sided_soft_threshold(z, theta, theta)
    torch.testing.assert_close(out, torch.tensor([[0.5, -1.5, 0.0]]), check_dtype=False)
    out.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-1.0, 1.0, 0.0]))


def grads_of(sae, term: str, x):
    sae.zero_grad()
    sae.loss(x, 0.7).terms[term].backward()
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in sae.named_parameters()}


def test_gradient_routing_who_trains_what():
    """Main reconstruction: magnitude path + decoder; sparsity and aux: gate path (aux reaches the decoder)."""
    sae = make_sae()
    x = torch.randn(B, D) * 2
    recon, sparsity, aux = (grads_of(sae, term, x) for term in ("recon", "sparsity", "aux"))
    nonzero = lambda g: bool(g.abs().sum() > 0)  # noqa: E731
    for name in ("W_gate", "r", "b_mag", "W_dec", "b_dec"):
        assert nonzero(recon[name]), f"reconstruction should train {name}"
    for name in ("b_gate", "threshold"):
        assert not nonzero(recon[name]), f"the Heaviside gate must pass no gradient to {name}"
    for grads, term in ((sparsity, "sparsity"), (aux, "aux")):
        for name in ("W_gate", "b_gate", "threshold"):
            assert nonzero(grads[name]), f"{term} should train {name}"
        for name in ("r", "b_mag"):
            assert not nonzero(grads[name]), f"{term} must not train the magnitude path ({name})"
    assert nonzero(aux["W_dec"]), "form (b): the decoder is live in the auxiliary term"


def test_recon_trains_theta_switch_reaches_threshold():
    sae = make_sae(recon_trains_theta=True)
    x = torch.randn(B, D) * 2
    assert grads_of(sae, "recon", x)["threshold"].abs().sum() > 0
    assert grads_of(make_sae(), "recon", x)["threshold"].abs().sum() == 0


def test_threshold_floor_log_theta_and_dead_reset():
    sae = make_sae()
    with torch.no_grad():
        sae.threshold[:3] = -1.0
    sae.after_optimizer_step()
    assert (sae.threshold >= sae.theta_floor).all()
    dead = torch.zeros(H, dtype=torch.bool)
    dead[[1, 4]] = True
    before = sae.threshold.detach().clone()
    sae.reset_dead(dead)
    torch.testing.assert_close(sae.threshold[dead].detach(), torch.full((2,), sae.theta_init))
    torch.testing.assert_close(sae.threshold[~dead].detach(), before[~dead])
    log_sae = build_sae("sagsae", d_in=D, width=H, log_theta=True)
    theta_pos, _ = log_sae.thresholds()
    torch.testing.assert_close(theta_pos.detach(), torch.full((H,), 1e-3 * math.sqrt(D)))


def test_initialization_follows_spec():
    sae = build_sae("sagsae", d_in=16, width=24)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(24))
    torch.testing.assert_close(sae.W_gate, sae.W_dec.T)
    for name in ("r", "b_gate", "b_mag"):
        assert (getattr(sae, name) == 0).all()
    torch.testing.assert_close(sae.threshold.detach(), torch.full((24,), 1e-3 * 4.0))
    assert sae.bandwidth == pytest.approx(1e-3 * 4.0)
    x = torch.randn(32, 16) + 3
    sae.initialize_from_batch(x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))


def test_wrong_input_size_names_the_fix():
    sae = build_sae("sagsae", d_in=8, width=16)
    with pytest.raises(ValueError, match="d_in=8 but got 5"):
        sae.loss(torch.randn(4, 5), 1.0)


@pytest.mark.parametrize("log_theta", [False, True])
def test_quantile_threshold_initialization(log_theta):
    """θ_i starts at the q-quantile of |π_i| on the first batch: each gate opens on about 1 − q of it."""
    torch.manual_seed(0)
    sae = build_sae("sagsae", d_in=8, width=6, theta_init_quantile=0.75, log_theta=log_theta)
    x = torch.randn(400, 8)
    sae.initialize_from_batch(x)
    magnitude = ((x - x.mean(0)) @ sae.W_gate.T + sae.b_gate).abs()
    theta_pos, theta_neg = sae.thresholds()
    expected = torch.stack([column.sort().values[299] for column in magnitude.T])  # the 300th of 400
    torch.testing.assert_close(theta_pos.detach(), expected)
    assert theta_neg is theta_pos or torch.equal(theta_neg, theta_pos)
    open_share = (sae.encode(x) != 0).float().mean()  # sign consistency may close a few more
    assert 0.15 <= float(open_share) <= 0.25
    with pytest.raises(ValueError, match="theta_init_quantile"):
        build_sae("sagsae", d_in=8, width=6, theta_init_quantile=1.0)


def test_the_sparsity_term_reaches_theta_from_the_open_half_of_the_band_only():
    """docs/method.md, "Loss and gradients": |BiJump_θ(π)|'s gradient is sign(f)·g where the gate is open and 0
    where it is closed (f = 0), so a π just below θ passes nothing to θ through the L1, while one just above does."""
    eps, theta = 0.2, torch.tensor([1.0, 1.0], requires_grad=True)
    z = torch.tensor([[0.95, 1.05]])  # both in the band |π − θ| < ε/2; the first gate closed, the second open
    bi_jump_relu(z, theta, theta, eps).abs().sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -1.0 / eps]))  # −(θ/ε)·K·sign(f), f > 0 only
