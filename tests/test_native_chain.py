"""The C++ gated chain (sagsae/saes/native_chain.py) against the eager one it replaces on CPU: the same values, and
every gradient within float summation order, in fp32 and bf16, for each form it covers; and the fallback where it
cannot build. tests/test_gated_chain.py checks both against the composed torch ops."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sagsae.saes import gated_chain as chain_module
from sagsae.saes import native_chain
from sagsae.saes.gated_chain import eager_gated_chain, gated_chain
from tests.conftest import needs

pytestmark = needs(native_chain.native_chain_available(), "the C++ gated chain did not build here (no compiler)")
NAMES = ("u", "b_gate", "r", "b_mag", "theta_pos", "theta_neg")


def inputs(shape: tuple[int, ...], dtype: torch.dtype, one_sided: bool, scalar_theta: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    width = shape[-1]
    values = {"u": (2 * torch.randn(*shape, generator=generator)).to(dtype)}
    for name in ("b_gate", "r", "b_mag"):
        values[name] = 0.3 * torch.randn(width, generator=generator)
    theta_shape = () if scalar_theta else (width,)
    values["theta_pos"] = 0.2 + 0.5 * torch.rand(theta_shape, generator=generator)
    values["theta_neg"] = torch.full(theta_shape, math.inf) if one_sided else 0.2 + 0.5 * torch.rand(
        theta_shape, generator=generator)
    return {name: value.clone().requires_grad_(not (one_sided and name == "theta_neg"))
            for name, value in values.items()}


def run(chain, leaves: dict[str, torch.Tensor], soft: bool, sign_consistency: bool):
    upstream_generator = torch.Generator().manual_seed(1)
    outputs = chain(*(leaves[name] for name in NAMES), 0.4, sign_consistency, soft)
    upstream = [torch.randn(out.shape, generator=upstream_generator).to(out.dtype) for out in outputs]
    torch.autograd.backward(list(outputs), upstream)
    return [out.detach() for out in outputs], {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("soft", [False, True], ids=["jump-gate-path", "soft-gate-path"])
@pytest.mark.parametrize("sign_consistency", [True, False], ids=["sign-consistent", "any-sign"])
@pytest.mark.parametrize("form", ["two-sided", "one-sided", "scalar-theta"])
def test_the_kernel_equals_the_eager_chain(dtype, soft, sign_consistency, form):
    """Codes and gate codes bit for bit (the same fp32 arithmetic, rounded once); the L1 and every gradient, the
    thresholds' included, within summation order."""
    shape = (300, 24)
    results = {}
    for name, chain in (("eager", eager_gated_chain), ("native", native_chain.native_gated_chain)):
        leaves = inputs(shape, dtype, one_sided=form == "one-sided", scalar_theta=form == "scalar-theta")
        results[name] = run(chain, leaves, soft, sign_consistency)
    (eager_out, eager_grads), (native_out, native_grads) = results["eager"], results["native"]
    assert [out.dtype for out in native_out] == [dtype, dtype, torch.float32]
    assert native_out[0].shape == shape and torch.equal(native_out[0], eager_out[0])
    assert torch.equal(native_out[1], eager_out[1])
    torch.testing.assert_close(native_out[2], eager_out[2], rtol=1e-5, atol=1e-4)
    for name, grad in eager_grads.items():
        if grad is None:
            assert native_grads[name] is None, f"{name} needs no gradient"
            continue
        assert grad.abs().sum() > 0, f"the fixture must give {name} a gradient"
        assert native_grads[name].shape == grad.shape and native_grads[name].dtype == grad.dtype
        torch.testing.assert_close(native_grads[name], grad, rtol=1e-5, atol=1e-4, msg=f"gradient of {name}")
    codes = native_out[0]
    assert (codes > 0).any() and (codes == 0).any()


def test_gated_chain_takes_the_kernel_on_cpu_and_the_eager_bodies_when_compiled(monkeypatch):
    leaves = inputs((64, 16), torch.float32, one_sided=False, scalar_theta=False)
    calls = []
    monkeypatch.setattr(chain_module, "native_gated_chain",
                        lambda *args: calls.append("native") or native_chain.native_gated_chain(*args))
    gated_chain(*(leaves[name] for name in NAMES), 0.4)
    assert calls == ["native"]
    try:
        chain_module.compile_gated_chain(True)
        gated_chain(*(leaves[name] for name in NAMES), 0.4)
        assert calls == ["native"], "the compiled bodies replace the kernel while compile_chain is on"
    finally:
        chain_module.compile_gated_chain(False)


def test_without_a_compiler_the_chain_warns_once_and_runs_eagerly(monkeypatch):
    """A failed build gives one warning that names the cause and the fix; the gated SAEs keep training eagerly."""
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    with pytest.warns(UserWarning, match="did not build \\(Ninja is required.*eager chain"):
        assert native_chain.native_module.__wrapped__() is None
    monkeypatch.setattr(native_chain, "native_module", lambda: None)
    leaves = inputs((64, 16), torch.float32, one_sided=False, scalar_theta=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes, _, _ = gated_chain(*(leaves[name] for name in NAMES), 0.4)
    reference, _, _ = eager_gated_chain(*(leaves[name] for name in NAMES), 0.4)
    assert torch.equal(codes, reference)
