"""Matryoshka nesting (sagsae/saes/matryoshka.py), for every architecture: the loss adds Σ_l w_l ‖x − x̂_l‖² over the
prefixes, each prefix decodes from its own latents alone, gradients equal autograd through a direct computation,
and the levels survive a checkpoint."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from sagsae.formats.serialization import export, load, sae_from_spec
from sagsae.saes import build_sae
from sagsae.saes.matryoshka import Nesting, cumulative_decodes
from sagsae.training.state import TrainingPlan

D, WIDTH, BATCH = 6, 10, 16
ARCHITECTURES = ["abstopk", "batchtopk", "gated", "jumprelu", "relu", "sagsae", "topk"]  # every shipped one
WIDTHS, WEIGHTS = (3, 7, 10), (0.5, 2.0)
SWITCHES = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "abstopk": {"k": 3}}


def pair(architecture: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(plain SAE, the same SAE nested, a batch): float32 (the fused chains compute in it), started on the batch, weights moved off their start."""
    torch.manual_seed(0)
    plain = build_sae(architecture, d_in=D, width=WIDTH, **SWITCHES.get(architecture, {}))
    x = torch.randn(BATCH, D)
    plain.initialize_from_batch(x)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    nested = copy.deepcopy(plain).make_matryoshka(WIDTHS, WEIGHTS)
    return plain, nested, x


def direct_prefix_term(codes: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_l w_l mean_b ‖x − (b_dec + Σ_{i < m_l} f_i W_dec[:, i])‖², written out with a mask per level."""
    total = x.new_zeros(())
    for width, weight in zip(WIDTHS[:-1], WEIGHTS):
        mask = (torch.arange(WIDTH) < width).to(codes.dtype)
        x_hat = (codes * mask) @ W_dec.T + b_dec
        total = total + weight * (x - x_hat).pow(2).sum(-1).mean()
    return total


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-decode", "sparse-decode"])
def test_the_loss_adds_each_prefix_reconstruction_and_its_gradients_match_autograd(architecture, sparse):
    plain, nested, x = pair(architecture)
    nested.sparse_decode_below = 1.0 if sparse else None
    dead = torch.zeros(WIDTH, dtype=torch.bool)
    dead[-3:] = True  # so that TopK's AuxK has latents to use
    out = nested.loss(x, 0.5, dead=dead)

    reference_sae = copy.deepcopy(plain)
    reference = reference_sae.loss(x, 0.5, dead=dead)
    codes = reference_sae.encode(x)  # the same codes, with their own graph to every encoder parameter
    assert torch.allclose(codes.detach(), reference.codes.detach(), atol=1e-6)
    extra = direct_prefix_term(codes, reference_sae.W_dec, reference_sae.b_dec, x)

    assert torch.allclose(out.terms["recon"], reference.terms["recon"], rtol=1e-5)
    assert torch.allclose(out.terms["matryoshka"], extra, rtol=1e-5)
    assert torch.allclose(out.total, reference.total + extra, rtol=1e-5)
    assert extra > 0

    out.total.backward()
    (reference.total + extra).backward()
    named = dict(reference_sae.named_parameters())
    for name, parameter in nested.named_parameters():
        expected = named[name].grad
        if expected is None:
            assert parameter.grad is None or not parameter.grad.any(), name
        else:
            assert torch.allclose(parameter.grad, expected, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_prefix_reconstruction_does_not_depend_on_later_latents(architecture):
    _, nested, x = pair(architecture)
    codes = torch.randn(BATCH, WIDTH)
    before = [level.detach().clone() for level in cumulative_decodes(codes, nested.W_dec, nested.b_dec, WIDTHS[:-1])]
    with torch.no_grad():
        nested.W_dec[:, WIDTHS[0]:] += 1.0  # every latent past the first prefix
    after = cumulative_decodes(codes, nested.W_dec, nested.b_dec, WIDTHS[:-1])
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])
    W_dec = nested.W_dec.detach().requires_grad_()
    first = cumulative_decodes(codes, W_dec, nested.b_dec, WIDTHS[:-1])[0]
    (x - first).pow(2).sum().backward()
    assert not W_dec.grad[:, WIDTHS[0]:].any() and W_dec.grad[:, :WIDTHS[0]].any()


def test_every_shipped_architecture_is_tested_and_one_that_ignores_the_levels_is_refused():
    from sagsae.saes import SAE_REGISTRY
    from sagsae.saes.base import LinearEncoderSAE, SAELoss, squared_error

    shipped = sorted(name for name, cls in SAE_REGISTRY.items() if cls.__module__.startswith("sagsae."))
    assert shipped == ARCHITECTURES

    class PlainDecode(LinearEncoderSAE):  # a third-party architecture that decodes with `decode` alone
        def activation(self, pre):
            return torch.relu(pre)

        def coding_loss(self, x, target, sparsity_coefficient, dead):
            codes = self.encode(x)
            x_hat = self.decode(codes)
            return SAELoss(squared_error(target, x_hat), {"recon": squared_error(target, x_hat)}, codes, x_hat)

    sae = PlainDecode(D, WIDTH).make_matryoshka(WIDTHS)
    with pytest.raises(ValueError, match="ignores the Matryoshka levels: decode with decode_levels"):
        sae.loss(torch.randn(BATCH, D), 1.0)
    assert PlainDecode(D, WIDTH).loss(torch.randn(BATCH, D), 1.0).total > 0  # unnested, it trains as before


def test_the_sparse_and_dense_nested_decodes_agree():
    torch.manual_seed(1)
    codes = torch.randn(BATCH, WIDTH, dtype=torch.float64) * (torch.rand(BATCH, WIDTH) < 0.3)
    W_dec, b_dec = torch.randn(D, WIDTH, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    dense = cumulative_decodes(codes, W_dec, b_dec, WIDTHS[:-1])
    sparse = cumulative_decodes(codes, W_dec, b_dec, WIDTHS[:-1], codes.nonzero(as_tuple=True))
    assert len(dense) == len(sparse) == len(WIDTHS)
    for a, b in zip(dense, sparse):
        assert torch.allclose(a, b)
    assert torch.allclose(dense[-1], codes @ W_dec.T + b_dec)


def test_random_prefixes_are_drawn_in_training_alone_and_resume_alike():
    sae = build_sae("relu", d_in=D, width=WIDTH).make_matryoshka(WIDTHS, random_prefixes=True)
    draws = [sae.prefix_ends() for _ in range(20)]
    assert all(len(ends) == 2 and 1 <= ends[0] < ends[1] < WIDTH for ends in draws)
    assert len(set(draws)) > 3  # they vary
    resumed = build_sae("relu", d_in=D, width=WIDTH).make_matryoshka(WIDTHS, random_prefixes=True)
    resumed.load_state_dict(sae.state_dict())
    assert resumed.prefix_ends() == sae.prefix_ends()
    sae.eval()
    assert sae.prefix_ends() == WIDTHS[:-1]


@pytest.mark.parametrize("widths, weights, message", [
    ((3, 7), None, "end at the width"), ((7, 3, 10), None, "increase"), ((10,), None, "two levels"),
    ((3, 7, 10), (1.0,), "one non-negative weight per prefix"), ((3, 7, 10), (1.0, -1.0), "non-negative")])
def test_bad_levels_are_refused_with_what_is_allowed(widths, weights, message):
    with pytest.raises(ValueError, match=message):
        Nesting.checked(WIDTH, widths, weights)


def test_a_plan_nests_its_sae_and_the_levels_survive_the_spec():
    plan = TrainingPlan.from_arguments("sagsae", width=WIDTH, matryoshka_widths=[3, 7, 10],
                                       matryoshka_weights=[0.5, 2.0])
    state = plan.build(D, transcoder=False)
    assert state.sae.nesting == Nesting((3, 7, 10), (0.5, 2.0))
    rebuilt = sae_from_spec(state.spec(), {f"state.sae.{k}": v for k, v in state.sae.state_dict().items()})
    assert rebuilt.nesting == state.sae.nesting
    with pytest.raises(ValueError, match="end at the width"):
        TrainingPlan.from_arguments("gated", width=WIDTH, matryoshka_widths=[3, 7]).check()


def test_the_step_summary_logs_r2_per_prefix():
    plan = TrainingPlan.from_arguments("topk", width=WIDTH, k=3, matryoshka_widths=[3, 7, 10])
    state = plan.build(D, transcoder=False)
    torch.manual_seed(2)
    batch = torch.randn(64, D)
    state.sae.input_scale.fill_(1.0)
    state.initialize(batch)
    summary = state.evaluate_batch(batch, train=True)["summary"]
    with torch.no_grad():
        codes = state.sae.encode(batch)
        variance = (batch - batch.mean(0)).pow(2).sum(-1).mean()
        for width in (3, 7):
            x_hat = codes[:, :width] @ state.sae.W_dec[:, :width].T + state.sae.b_dec
            expected = 1 - (batch - x_hat).pow(2).sum(-1).mean() / variance
            assert torch.allclose(summary[f"r2_prefix_{width}"], expected, atol=1e-5)


@pytest.mark.parametrize("architecture", ["sagsae", "batchtopk"])
def test_an_export_keeps_the_levels_and_loads_back(architecture, tmp_path):
    _, nested, x = pair(architecture)
    nested.input_scale.fill_(0.5)
    nested.eval()
    export(nested, tmp_path / "sae")
    loaded = load(tmp_path / "sae")
    assert loaded.nesting == nested.nesting
    assert torch.allclose(loaded(x * 2), nested(x) * 2, atol=1e-5)  # raw activations in, raw reconstruction out


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                    reason="sae-lens is not installed (optional; `pip install sae-lens` to run this check)")
def test_saelens_loads_a_matryoshka_batchtopk_export_as_it_saves_its_own(tmp_path):
    """SAELens saves a trained MatryoshkaBatchTopK SAE as a JumpReLU SAE; ours exports the same way, with the
    levels in the metadata. SAELens's codes give our reconstruction, and each prefix of them our level's."""
    from sae_lens import SAE

    _, nested, x = pair("batchtopk")
    nested.threshold.fill_(0.2)
    nested.eval()
    export(nested, tmp_path / "sae")
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.architecture() == "jumprelu"
    with torch.no_grad():
        codes = theirs.encode(x)
        assert (codes != 0).any() and (codes == 0).any()
        torch.testing.assert_close(codes, nested.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(codes), nested(x), rtol=1e-5, atol=1e-5)
        levels = cumulative_decodes(codes, nested.W_dec, nested.b_dec, WIDTHS[:-1])
        for width, level in zip(WIDTHS, levels):
            prefix = codes.clone()
            prefix[:, width:] = 0
            torch.testing.assert_close(theirs.decode(prefix), level, rtol=1e-5, atol=1e-5)


def test_fit_and_a_sweep_log_held_out_r2_per_prefix(tmp_path):
    """Through Lightning: `fit`'s module and a sweep member both log R² for each prefix on held-out data, and a
    longer prefix explains more."""
    import lightning as L

    from callbacks import SAEMetrics
    from datamodules import TensorActivationDataModule
    from lightning_modules import SAEModule, SweepModule

    torch.manual_seed(0)
    directions = torch.randn(24, D)
    data = torch.randn(4096, 24).relu() ** 2 @ directions  # sparse non-negative mixtures of 24 directions
    arguments = dict(width=24, k=4, matryoshka_widths=[4, 12, 24], lr=3e-3, lr_warmup_steps=1)

    def trained(module, callbacks):
        trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, val_check_interval=40, limit_val_batches=2,
                            log_every_n_steps=1, callbacks=callbacks, default_root_dir=tmp_path)
        trainer.fit(module, TensorActivationDataModule(data[:3584], data[3584:], batch_size=256,
                                                       normalization_tokens=1024))
        return trainer

    fitted = trained(SAEModule.from_arguments("topk", **arguments), [SAEMetrics()]).callback_metrics
    assert fitted["val/r2_prefix_4"] < fitted["val/r2_prefix_12"] < fitted["val/r2"]
    assert "train/r2_prefix_12" in fitted
    sweep = SweepModule({"nested": TrainingPlan.from_arguments("topk", **arguments)})
    trained(sweep, [])
    history = sweep.validation_history["nested"][-1]
    assert history["r2_prefix_4"] < history["r2_prefix_12"] < history["r2"]
