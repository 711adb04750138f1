"""The fused gated chain (sagsae/saes/gated_chain.py) against the composed torch ops it replaces: the same values and
every gradient, the thresholds' pseudo-derivatives included, for Gated and each SA-GSAE form that uses it."""

from __future__ import annotations

import math

import pytest
import torch

from sagsae.saes.gated_chain import eager_gated_chain, gated_chain, traceable_chain
from sagsae.saes.native_chain import native_chain_available, native_gated_chain
from sagsae.saes.straight_through import bi_jump_relu, two_sided_soft_threshold
from tests.conftest import IN_CI, perturbed_sae

D, H, B, LAM = 6, 10, 256, 0.7


def composed_chain(u, b_gate, r, b_mag, theta_pos, theta_neg, bandwidth, sign_consistency=True, soft=False):
    """The chain as the SAEs composed it before the fused function: separate ops, autograd's gradients."""
    pi = u + b_gate
    magnitude = r.exp() * u + b_mag
    if sign_consistency:
        magnitude = torch.where((pi > 0) == (magnitude > 0), magnitude, 0)
    gate = (pi > theta_pos) | (pi < -theta_neg)
    codes = torch.where(gate, magnitude, 0)
    gate_codes = (two_sided_soft_threshold(pi, theta_pos, theta_neg) if soft
                  else bi_jump_relu(pi, theta_pos, theta_neg, bandwidth))
    return codes, gate_codes, gate_codes.abs().sum(0)


def leaves(generator, tied_theta: bool):
    shapes = {"u": (B, H), "b_gate": (H,), "r": (H,), "b_mag": (H,)}
    values = {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
    values["theta_pos"] = 0.2 + 0.5 * torch.rand(H, generator=generator)
    values["theta_neg"] = values["theta_pos"] if tied_theta else 0.2 + 0.5 * torch.rand(H, generator=generator)
    return {name: value.clone().requires_grad_() for name, value in values.items()}


@pytest.mark.parametrize("soft", [False, True], ids=["jump-gate-path", "soft-gate-path"])
@pytest.mark.parametrize("tied_theta", [True, False], ids=["tied-theta", "untied-theta"])
@pytest.mark.parametrize("sign_consistency", [True, False], ids=["sign-consistent", "any-sign"])
def test_values_and_gradients_equal_the_composed_ops(tied_theta, sign_consistency, soft):
    """Random upstream gradients on all three outputs (codes, gate codes and their per-latent L1), with a bandwidth
    wide enough that many π fall in the thresholds' kernels: the fused autograd function, the C++ kernel and the
    traceable form (plain ops, its pseudo-derivatives as terms of value zero) against the composed ops."""
    generator = torch.Generator().manual_seed(0)
    chains = {"fused": eager_gated_chain, "traceable": traceable_chain, "composed": composed_chain}
    if native_chain_available() or IN_CI:  # CI has a compiler: there the kernel must build
        chains["native"] = native_gated_chain
    inputs = {name: leaves(torch.Generator().manual_seed(0), tied_theta) for name in chains}
    upstream = [torch.randn(B, H, generator=generator), torch.randn(B, H, generator=generator),
                torch.randn(H, generator=generator)]
    outputs = {}
    for name, chain in chains.items():
        args = [inputs[name][key] for key in ("u", "b_gate", "r", "b_mag", "theta_pos", "theta_neg")]
        outputs[name] = chain(*args, 0.4, sign_consistency, soft)
        sum((out * grad).sum() for out, grad in zip(outputs[name], upstream)).backward()
    for name in set(chains) - {"composed"}:
        for mine, composed in zip(outputs[name], outputs["composed"]):
            torch.testing.assert_close(mine.detach(), composed.detach(), rtol=1e-6, atol=1e-6)
        for key in inputs[name]:
            assert inputs[name][key].grad.abs().sum() > 0, f"the fixture must give {key} a gradient"
            torch.testing.assert_close(inputs[name][key].grad, inputs["composed"][key].grad, rtol=1e-5, atol=1e-5)
    codes = outputs["fused"][0]
    assert (codes > 0).any() and (codes < 0).any() and (codes == 0).any()


def parameter_grads(sae, x):
    sae.zero_grad()
    out = sae.loss(x, LAM)
    out.total.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_loss_and_gradients(fused, composed, fused_grads, composed_grads):
    torch.testing.assert_close(fused.codes.detach(), composed.codes.detach(), rtol=1e-6, atol=1e-6)
    for name, value in composed.terms.items():
        torch.testing.assert_close(fused.terms[name].detach(), value.detach(), rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == composed_grads.keys()
    for name, grad in composed_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


SAGSAE_FORMS = [{}, {"tie_theta": False}, {"sign_consistency": False}, {"log_theta": True},
                {"one_sided_gate": True}, {"unit_norm_decoder": True}, {"aux_weight": 0.5}, {"gate_path": "jump"},
                {"gate_path": "soft", "tie_theta": False}, {"gate_path": "soft", "one_sided_gate": True}]


@pytest.mark.parametrize("switches", SAGSAE_FORMS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_sagsae_loss_through_the_fused_chain_equals_its_composed_form(switches):
    """Every parameter's gradient of the whole loss (reconstruction, weighted L1 and aux), the fused chain against
    the same SAE with the fused chain switched off."""
    sae = perturbed_sae("sagsae", D, H, threshold_spread=0.3, bandwidth=0.5, **switches)
    assert sae.fused_chain_arguments() is not None
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 2
    fused, fused_grads = parameter_grads(sae, x)
    sae.use_fused_chain = False
    composed, composed_grads = parameter_grads(sae, x)
    assert_same_loss_and_gradients(fused, composed, fused_grads, composed_grads)
    thresholds = [name for name in fused_grads if "threshold" in name]
    assert thresholds and all(fused_grads[name].abs().sum() > 0 for name in thresholds)


@pytest.mark.parametrize("switches", [{"tie_r": False}, {"recon_trains_theta": True},
                                      {"signed_magnitude": False}], ids=lambda s: next(iter(s)))
def test_forms_the_chain_does_not_cover_keep_the_composed_ops(switches):
    assert perturbed_sae("sagsae", D, H, **switches).fused_chain_arguments() is None


@pytest.mark.parametrize("unit_norm_decoder", [False, True], ids=["form-b", "form-a"])
def test_gated_loss_equals_its_composed_form(unit_norm_decoder):
    """Gated's loss (fused: the gate π > 0 as θ⁺ = 0, θ⁻ = ∞) against its composed form, whose codes are
    H(π) ⊙ ReLU(exp(r) u + b_mag) from the SAE's own paths."""
    sae = perturbed_sae("gated", D, H, unit_norm_decoder=unit_norm_decoder)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 2
    fused, fused_grads = parameter_grads(sae, x)
    sae.use_fused_chain = False
    composed, composed_grads = parameter_grads(sae, x)
    u, pi = (t.detach() for t in sae.paths(x))
    direct = torch.where(pi > 0, torch.relu(sae.r_mag.detach().exp() * u + sae.b_mag.detach()), 0)
    torch.testing.assert_close(composed.codes.detach(), direct)
    assert_same_loss_and_gradients(fused, composed, fused_grads, composed_grads)
    torch.testing.assert_close(sae.encode(x).detach(), fused.codes.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("soft", [False, True], ids=["jump-gate-path", "soft-gate-path"])
def test_bf16_in_bf16_out_with_the_fp32_chains_numbers(soft):
    """Mixed precision hands the chain a bf16 u: its codes and gate codes come out in bf16, equal to the fp32
    chain's outputs for that u rounded once; the L1 and every per-latent gradient but r's are the fp32 chain's bit
    for bit (the thresholds' kernel band included: no coarser than an fp32 chain), u's gradient is the fp32 one
    rounded, and r's reads the bf16 codes (within bf16 rounding)."""
    generator = torch.Generator().manual_seed(2)
    u = torch.randn(B, H, generator=generator).bfloat16().requires_grad_()
    b_gate, r, b_mag = (torch.randn(H, generator=generator).requires_grad_() for _ in range(3))
    theta = (0.2 + 0.5 * torch.rand(H, generator=generator)).requires_grad_()
    upstream = [torch.randn(B, H, generator=generator).bfloat16(), torch.randn(B, H, generator=generator).bfloat16(),
                torch.randn(H, generator=generator)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = gated_chain(u, b_gate, r, b_mag, theta, theta, 0.4, soft=soft)
    assert [out.dtype for out in outputs] == [torch.bfloat16, torch.bfloat16, torch.float32]
    reference_inputs = [t.detach().float().requires_grad_() for t in (u, b_gate, r, b_mag, theta)]
    reference = gated_chain(*reference_inputs[:4], reference_inputs[4], reference_inputs[4], 0.4, soft=soft)
    for out, ref in zip(outputs, reference):
        assert torch.equal(out, ref.to(out.dtype))
    sum((out * grad).float().sum() for out, grad in zip(outputs, upstream)).backward()
    sum((ref * grad.float()).sum() for ref, grad in zip(reference, upstream)).backward()
    assert u.grad.dtype == torch.bfloat16 and torch.equal(u.grad, reference_inputs[0].grad.bfloat16())
    for native, fp32 in ((b_gate, reference_inputs[1]), (b_mag, reference_inputs[3]), (theta, reference_inputs[4])):
        assert torch.equal(native.grad, fp32.grad) and native.grad.abs().sum() > 0
    torch.testing.assert_close(r.grad, reference_inputs[2].grad, rtol=2e-2, atol=2e-2)


def test_a_never_opening_side_costs_no_gradient_and_no_nan():
    """Gated's θ⁻ = ∞ (and a one-sided SA-GSAE's) never opens: nothing below zero passes, nothing is NaN."""
    u = torch.randn(B, H, requires_grad=True)
    zeros = torch.zeros(H, requires_grad=True)
    codes, gate_codes, _ = gated_chain(u, zeros, zeros, zeros, torch.tensor(0.0), torch.tensor(math.inf), 0.0)
    assert (gate_codes >= 0).all() and (codes >= 0).all() and (gate_codes > 0).any()
    (codes.sum() + gate_codes.sum()).backward()
    assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("soft", [False, True], ids=["jump-gate-path", "soft-gate-path"])
def test_the_compiled_chain_equals_the_eager_one(soft):
    """`compile_gated_chain` runs the same bodies through torch.compile (inductor, C++ on CPU): the same values and
    every gradient, thresholds' included, on both gate paths."""
    from sagsae.saes.gated_chain import CHAIN_BODIES, chain_forward, compile_gated_chain

    upstream_generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(B, H, generator=upstream_generator), torch.randn(B, H, generator=upstream_generator),
                torch.randn(H, generator=upstream_generator)]
    results = {}
    try:
        for compiled in (False, True):
            compile_gated_chain(compiled)
            assert (CHAIN_BODIES["forward"] is chain_forward) != compiled  # the switch swapped the body in
            inputs = leaves(torch.Generator().manual_seed(0), tied_theta=False)
            args = [inputs[key] for key in ("u", "b_gate", "r", "b_mag", "theta_pos", "theta_neg")]
            outputs = gated_chain(*args, 0.4, True, soft)
            sum((out * grad).sum() for out, grad in zip(outputs, upstream)).backward()
            results[compiled] = ([out.detach() for out in outputs], {key: value.grad for key, value in inputs.items()})
    finally:
        compile_gated_chain(False)
    for compiled_out, eager_out in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    for key, eager_grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], eager_grad, rtol=1e-5, atol=1e-5)


def test_the_training_modules_switch_compiles_the_chain_for_the_process():
    from lightning_modules import SAEModule
    from sagsae.saes.gated_chain import CHAIN_BODIES, chain_backward, chain_forward, compile_gated_chain

    try:
        SAEModule.from_arguments("sagsae", d_in=8, width=16)
        assert CHAIN_BODIES == {"forward": chain_forward, "backward": chain_backward}
        SAEModule.from_arguments("sagsae", d_in=8, width=16, compile_chain=True)
        assert CHAIN_BODIES["forward"] is not chain_forward and CHAIN_BODIES["backward"] is not chain_backward
    finally:
        compile_gated_chain(False)
