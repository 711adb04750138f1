"""Transcoders: every architecture encodes a source hookpoint and decodes a target one, with an optional skip
connection (docs/method.md, "Transcoders"). Pairs, gradients, the spliced LM loss, export and training."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import subprocess
import sys

import lightning as L
import pytest
import torch

import sagsae
from datamodules.activation_files import ActivationFileDataModule
from datamodules.hookpoints import ActivationReader
from datamodules.lm_activations import LMActivationDataModule
from datamodules.tensor_data import TensorActivationDataModule
from lightning_modules.sae_module import SAEModule
from sagsae.formats.serialization import export
from sagsae.saes import SAE_REGISTRY
from sagsae.saes.base import SKIP_START_RIDGE, ridge_least_squares, squared_error
from tests.conftest import IN_CI, REPO, perturbed_sae

pytestmark = pytest.mark.slow(48)  # seconds in all: the longest files run first (tests/conftest.py)

SWITCHES = {"topk": {"k": 3}, "abstopk": {"k": 3}, "batchtopk": {"k": 3}}


def transcoder(architecture: str, skip: bool, d: int = 8, width: int = 16):
    """A perturbed `architecture` made a transcoder, with a random source mean, skip and scales."""
    sae = perturbed_sae(architecture, d, width, **SWITCHES.get(architecture, {})).make_transcoder(skip=skip)
    with torch.no_grad():
        sae.source_mean.normal_()
        if skip:
            sae.W_skip.normal_(std=0.3)
        sae.input_scale.fill_(1.7)
        sae.target_scale.fill_(0.6)
    return sae


def tiny_pairs_data(tiny_llama, text_file, **overrides) -> LMActivationDataModule:
    arguments = dict(model=str(tiny_llama), dataset="json", data_files=str(text_file), hookpoint="mlp_in",
                     target_hookpoint="mlp_out", layer=1, context_length=16, lm_batch_size=4, batch_size=32,
                     shuffle_buffer_tokens=160, val_tokens=100, normalization_tokens=200, val_fraction=0.2)
    data = LMActivationDataModule(**(arguments | overrides))
    data.setup()
    return data


def test_pairs_are_aligned_token_by_token(tiny_llama, text_file):
    """Each row of a chunk is (mlp_in, mlp_out) of one token: each side equals its hookpoint read alone at the
    same positions, and the MLP applied to the source gives the target."""
    data = tiny_pairs_data(tiny_llama, text_file)
    contexts = torch.tensor(list(itertools.islice(data.lm.contexts(data.documents(validation=False)), 4)))
    pairs = data.lm.activations(contexts)
    assert pairs.shape[1:] == (2, 32) and data.pairs and data.describe()["target_hookpoint"] == "mlp_out"
    trainable = data.lm.trainable_positions(contexts)
    for side, hookpoint in enumerate(("mlp_in", "mlp_out")):
        alone = ActivationReader(data.lm.reader.model, hookpoint, 1)(contexts)[trainable]
        torch.testing.assert_close(pairs[:, side], alone)
    mlp = data.lm.reader.model.model.layers[1].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(pairs[:, 0]), pairs[:, 1], rtol=1e-5, atol=1e-5)
    source_scale, target_scale = data.estimate_scales()
    sample = torch.cat([chunk for _, chunk in zip(range(4), data.training_chunks())])
    for side, scale in enumerate((source_scale, target_scale)):
        assert abs(float((sample[:, side] * scale).pow(2).sum(-1).mean()) / 32 - 1) < 0.2


def test_pairs_stay_aligned_after_a_resume(tiny_llama, text_file):
    """The live stream of pairs resumes bit for bit from a checkpointed state, and every pair still satisfies
    target = MLP(source)."""
    data = tiny_pairs_data(tiny_llama, text_file)
    straight = list(itertools.islice(data.training_batches(), 12))
    first = tiny_pairs_data(tiny_llama, text_file)
    batches = first.training_batches()
    for _ in range(6):
        next(batches)
    saved = io.BytesIO()
    torch.save(first.stream.state(5), saved)
    resumed = tiny_pairs_data(tiny_llama, text_file)
    resumed.resume_state = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
    rest = list(itertools.islice(resumed.training_batches(), 7))
    assert all(torch.equal(a, b) for a, b in zip(rest, straight[5:])) and len(rest) == 7
    mlp = data.lm.reader.model.model.layers[1].mlp
    with torch.no_grad():
        for batch in rest:
            torch.testing.assert_close(mlp(batch[:, 0]), batch[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", sorted(SAE_REGISTRY))
def test_a_transcoder_reconstructs_the_target_and_its_skip_learns_from_the_reconstruction(architecture):
    """loss(x, target=y): the reconstruction term is ‖y − (decode(encode(x)) + W_skip x)‖², computed directly;
    W_skip's gradient is that term's, 2/B Σ (ŷ − y) xᵀ, by hand; every other gradient is that of the
    architecture's own loss on the residual y − W_skip x (its auxiliary terms leave W_skip be)."""
    torch.manual_seed(1)
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    sae = transcoder(architecture, skip=True)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:5] = True
    out = sae.loss(x, 0.3, dead=dead, target=y)
    y_hat = sae(x)
    assert float(out.terms["recon"]) == pytest.approx(float(((y - y_hat) ** 2).sum(-1).mean()), rel=1e-5)
    torch.testing.assert_close(out.reconstruction, y_hat)
    out.total.backward()
    by_hand = 2 / len(x) * (y_hat - y).detach().T @ x
    torch.testing.assert_close(sae.W_skip.grad, by_hand, rtol=1e-4, atol=1e-5)
    gradients = {name: p.grad.clone() for name, p in sae.named_parameters() if name != "W_skip"}
    sae.zero_grad()
    residual = y - sae.skip(x).detach()
    sae.coding_loss(x, residual, 0.3, dead).total.backward()
    for name, parameter in sae.named_parameters():
        if name != "W_skip":
            torch.testing.assert_close(gradients[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ridge_least_squares_is_the_augmented_least_squares_solution():
    """(W, b) minimizing Σ‖y − W x − b‖² + ρ‖W‖²: the plain least squares of the centred data stacked over
    √ρ·I (and zero targets), computed directly by torch.linalg.lstsq; ρ = ridge × the centred Gram's mean diagonal."""
    torch.manual_seed(2)
    x = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 3.0
    y = torch.randn(50, 4, dtype=torch.float64)
    weight, bias = ridge_least_squares(x, y, 0.1)
    centred = x - x.mean(0)
    rho = 0.1 * (centred ** 2).sum(0).mean()
    stacked_x = torch.cat([centred, rho.sqrt() * torch.eye(6, dtype=x.dtype)])
    stacked_y = torch.cat([y - y.mean(0), torch.zeros(6, 4, dtype=y.dtype)])
    direct = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(weight, direct)
    torch.testing.assert_close(bias, y.mean(0) - x.mean(0) @ direct.T)


def test_a_least_squares_skip_start_is_the_first_batchs_linear_map():
    """`skip_start: least_squares` starts W_skip and b_dec at the ridge least-squares map from the first batch's
    normalized source to its target (lr 0 keeps the start to read back); "zeros" starts W_skip at 0; another
    value, or a start without a skip, is refused, naming the argument."""
    torch.manual_seed(3)
    source = torch.randn(256, 8) @ torch.randn(8, 8)
    target = source @ torch.randn(8, 8) + 0.1 * torch.randn(256, 8) + 2.0
    starts = {}
    for start in ("zeros", "least_squares"):
        data = TensorActivationDataModule(torch.stack([source, target], 1), batch_size=256)
        module = SAEModule.from_arguments("relu", width=16, skip_connection=True, skip_start=start, lr=0.0,
                                          init_seed=0)
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, limit_val_batches=0).fit(module, data)
        starts[start] = module.sae
    sae = starts["least_squares"]
    weight, bias = ridge_least_squares(sae.normalize(source), sae.normalize_target(target), SKIP_START_RIDGE)
    torch.testing.assert_close(sae.W_skip.detach(), weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.b_dec.detach(), bias, rtol=1e-4, atol=1e-5)
    assert float(starts["zeros"].W_skip.detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match="model.skip_start must be one of zeros, least_squares"):
        SAEModule.from_arguments("relu", width=16, skip_connection=True, skip_start="identity")
    with pytest.raises(ValueError, match="set model.skip_connection true"):
        SAEModule.from_arguments("relu", width=16, skip_start="least_squares")


def test_an_autoencoder_is_a_transcoder_whose_target_is_its_input():
    """Without a target the loss is the autoencoder's (the same terms, values and gradients as target = x)."""
    x = torch.randn(32, 8)
    sae = perturbed_sae("sagsae", 8, 16)
    plain, explicit = sae.loss(x, 0.5), sae.loss(x, 0.5, target=x)
    for name in plain.terms:
        assert torch.equal(plain.terms[name], explicit.terms[name])
    assert sae.transcoder_config() is None and "W_skip" not in dict(sae.named_parameters())


def test_the_encoder_centers_the_source_by_its_own_mean():
    """A transcoder's codes read x − source_mean (not x − b_dec, which lives in the target's space)."""
    sae = transcoder("relu", skip=False)
    x = torch.randn(16, 8)
    direct = torch.relu((x - sae.source_mean) @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), direct)
    sae.initialize_from_batch(x)
    sae.initialize_target(x + 5)
    torch.testing.assert_close(sae.source_mean, x.mean(0))
    torch.testing.assert_close(sae.b_dec.detach(), (x + 5).mean(0))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("architecture", sorted(SAE_REGISTRY))
def test_export_round_trip(architecture, skip, tmp_path):
    """`sagsae.load` of the export maps raw source activations to what the trained transcoder gives in the
    target's raw units (both normalization scalars and the source mean folded)."""
    sae = transcoder(architecture, skip).eval()
    raw = torch.randn(32, 8) * 3
    loaded = sagsae.load(export(sae, tmp_path / "tc"))
    assert loaded.is_transcoder and (loaded.W_skip is not None) == skip
    torch.testing.assert_close(loaded(raw), sae.reconstruct_raw(raw), rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == 8


def test_a_split_sign_export_of_a_transcoder_is_refused_with_the_way_out(tmp_path):
    """SAELens has no transcoder class for a signed transcoder's split form, so `--split_signs` says so and names
    the export that works, writing nothing."""
    with pytest.raises(ValueError, match="without --split_signs and load it with sagsae.load"):
        export(transcoder("sagsae", skip=True), tmp_path / "tc", split_signs=True)
    assert not (tmp_path / "tc").exists()


SAELENS_CLASSES = {("relu", False): "Transcoder", ("relu", True): "SkipTranscoder",
                   ("jumprelu", False): "JumpReLUTranscoder", ("jumprelu", True): "JumpReLUSkipTranscoder",
                   ("batchtopk", False): "JumpReLUTranscoder", ("batchtopk", True): "JumpReLUSkipTranscoder"}


@pytest.mark.parametrize(("architecture", "skip"), sorted(SAELENS_CLASSES))
def test_saelens_loads_the_transcoders_it_has_classes_for(architecture, skip, tmp_path):
    if importlib.util.find_spec("sae_lens") is None and not IN_CI:
        pytest.skip("SAELens is not installed: its transcoder loading is untested")
    import sae_lens
    sae = transcoder(architecture, skip).eval()
    if architecture == "batchtopk":  # its inference form: a global threshold, as exported
        sae.threshold.fill_(0.4)
    folder = export(sae, tmp_path / "tc", {"hook_name": "blocks.1.ln2.hook_normalized",
                                             "hook_name_out": "blocks.1.hook_mlp_out"})
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    assert type(theirs).__name__ == SAELENS_CLASSES[architecture, skip]
    raw = torch.randn(32, 8) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs(raw), sae.reconstruct_raw(raw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", sorted(SAE_REGISTRY))
def test_every_architecture_trains_as_a_transcoder_from_pairs(architecture, tmp_path):
    """Pairs in, a transcoder out: the SAE becomes one because the data are pairs. The target holds a ReLU part
    that no linear map explains, so a skip alone cannot pass: the transcoder beats the best linear map (least
    squares on the same data) and its own skip path alone by a wide margin, and its checkpoint rebuilds it (with
    its skip) through `sae_from_checkpoint`. SA-GSAE starts its θ at the 0.9-quantile, as the shipped configs do:
    with every gate open its codes are linear in the source."""
    from sagsae.formats.serialization import read_checkpoint, sae_from_checkpoint
    from sagsae.saes.base import ridge_least_squares

    torch.manual_seed(0)
    source = torch.randn(4096, 8) @ torch.randn(8, 8)
    nonlinear = 3 * torch.relu(source @ torch.randn(8, 16)) @ torch.randn(16, 8) / 4
    target = source @ torch.randn(8, 8) + nonlinear + 0.1 * torch.randn(4096, 8) + 2.0
    data = TensorActivationDataModule(torch.stack([source, target], 1), batch_size=256)
    start = {"theta_init_quantile": 0.9} if architecture == "sagsae" else {}
    module = SAEModule.from_arguments(architecture, width=32, sparsity_coefficient=0.01, skip_connection=True,
                                      lr=3e-3, sparsity_warmup_steps=5, lr_warmup_steps=5, init_seed=0,
                                      **SWITCHES.get(architecture, {}), **start)
    trainer = L.Trainer(max_steps=400, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, data)
    sae = module.sae
    assert sae.is_transcoder and sae.W_skip is not None and float(sae.W_skip.abs().sum()) > 0
    assert float(sae.target_scale) != float(sae.input_scale)
    weight, bias = ridge_least_squares(source, target, 1e-6)
    with torch.no_grad():
        error = float(squared_error(target, sae.reconstruct_raw(source)))
        skip_alone = float(squared_error(target, (sae.skip(sae.normalize(source)) + sae.b_dec) / sae.output_scale))
    assert error < float(squared_error(target, source @ weight.T + bias)), "no better than the best linear map"
    assert error < 0.5 * skip_alone, "the codes add little to the skip"
    trainer.save_checkpoint(tmp_path / "tc.ckpt")
    rebuilt = sae_from_checkpoint(read_checkpoint(tmp_path / "tc.ckpt")).eval()
    torch.testing.assert_close(rebuilt.reconstruct_raw(source[:64]), sae.eval().reconstruct_raw(source[:64]))


def test_a_transcoders_spliced_loss_is_the_hand_computed_one(tiny_llama, text_file):
    """ΔCE with the MLP's output replaced by the transcoder's map of the MLP's input, at the trained positions,
    and everything else as the model computes it: the same number as a forward hooked by hand."""
    import transformers

    data = tiny_pairs_data(tiny_llama, text_file)
    sae = transcoder("sagsae", skip=True, d=32, width=48).eval()
    values = data.spliced_cross_entropy(sae.reconstruct_raw, contexts=4)
    contexts = data.evaluators[4, "all", 0].input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    mlp = model.model.layers[1].mlp
    trainable = data.lm.trainable_positions(contexts)

    def splice(_module, args, output):
        replaced = output.clone()
        replaced[trainable] = sae.reconstruct_raw(args[0][trainable])
        return replaced

    handle = mlp.register_forward_hook(splice)
    with torch.no_grad():
        logits = model(contexts).logits
    handle.remove()
    scored = trainable[:, 1:]
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][scored], contexts[:, 1:][scored])
    assert values["ce_sae"] == pytest.approx(float(by_hand), rel=1e-5)
    handle = mlp.register_forward_hook(lambda _m, _a, output: output.masked_fill(trainable[..., None], 0.0))
    with torch.no_grad():
        zeroed = model(contexts).logits
    handle.remove()
    assert values["ce_zero"] == pytest.approx(float(torch.nn.functional.cross_entropy(
        zeroed[:, :-1][scored], contexts[:, 1:][scored])), rel=1e-5)


def test_a_source_after_its_target_is_refused(tiny_llama, text_file):
    data = tiny_pairs_data(tiny_llama, text_file, hookpoint="resid_post", target_hookpoint="mlp_out")
    with pytest.raises(RuntimeError, match="must read before it writes"):
        data.spliced_cross_entropy(lambda x: x, contexts=2)


def test_fit_cache_export_and_inspect_a_skip_transcoder_from_the_command_line(tiny_llama, text_file, tmp_path):
    """The user's path: cache pairs, fit a skip-transcoder from the cache (held-out R² against the target, the
    skip path's R², ΔCE), export it with both hook names, and inspect it (contexts from the source)."""
    common = ["--data.init_args.hookpoint", "mlp_in", "--data.init_args.target_hookpoint", "mlp_out",
              "--data.init_args.model", str(tiny_llama), "--data.init_args.dataset", "json",
              "--data.init_args.data_files", str(text_file), "--data.init_args.layer", "2",
              "--data.init_args.context_length", "32", "--data.init_args.lm_batch_size", "16",
              "--data.init_args.val_fraction", "0.1"]
    cache = tmp_path / "cache"
    run = lambda *args: subprocess.run([sys.executable, "-m", "sagsae", *args], cwd=REPO, capture_output=True,  # noqa: E731
                                       text=True, timeout=600)
    result = run("cache", "--config", "configs/transcoder.yaml", "--out", str(cache), "--train_tokens", "3000",
                 "--val_tokens", "400", "--shard_tokens", "1000", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((cache / "metadata.json").read_text())
    assert metadata["target_hookpoint"] == "mlp_out" and "target_normalization_scale" in metadata
    cached = ActivationFileDataModule(str(cache), batch_size=100)
    assert cached.pairs and next(iter(cached.batches())).shape == (100, 2, 32)
    result = run("fit", "--config", "configs/transcoder.yaml", "--data", "datamodules.ActivationFileDataModule",
                 "--data.init_args.path", str(cache), "--data.init_args.batch_size", "256",
                 "--data.init_args.shuffle_buffer_tokens", "1024", "--data.init_args.val_tokens", "400",
                 "--data.init_args.normalization_tokens", "512", "--model.sae.width", "64",
                 "--model.skip_connection", "true", "--model.sparsity_warmup_steps", "5",
                 "--model.lr_warmup_steps", "5", "--trainer.max_steps", "20",
                 "--trainer.val_check_interval", "20", "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = next(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["sae"]["transcoder"] == {"skip": True}
    metrics = state["sae_metrics"]
    assert {"val/r2", "val/skip_r2", "val/ce_delta"} <= set(metrics), sorted(metrics)
    out = tmp_path / "export"
    assert run("export", "--ckpt_path", str(checkpoint), "--out", str(out)).returncode == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "sagsae_skip_transcoder"
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (
        "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
    result = run("inspect", "--sae", str(out), "--out", str(tmp_path / "browser"), "--dataset", "json",
                 "--data_files", str(text_file), "--tokens", "500")
    assert result.returncode == 0, result.stderr[-3000:]
    index = (tmp_path / "browser" / "data" / "index.js").read_text()
    assert '"target_hookpoint":"blocks.2.hook_mlp_out"' in index and '"hookpoint":"mlp_in"' in index


def test_a_sweep_trains_transcoders_side_by_side_and_reports_the_skip_paths_share(tmp_path):
    """Sweep members on pairs are transcoders; the skip member's held-out rows carry skip_r2, which lies below its
    R² (the codes add to what the linear skip explains) and well above 0 on a mostly linear map."""
    from lightning_modules import SweepModule

    torch.manual_seed(0)
    source = torch.randn(4096, 8)
    target = source @ torch.randn(8, 8) + torch.relu(source @ torch.randn(8, 8))
    from sagsae.training import TrainingPlan

    members = {name: TrainingPlan.from_arguments("gated", width=32, sparsity_coefficient=0.01, lr=3e-3, init_seed=0,
                                              sparsity_warmup_steps=5, lr_warmup_steps=5, skip_connection=skip)
               for name, skip in (("plain", False), ("skip", True))}
    sweep = SweepModule(members)
    trainer = L.Trainer(max_steps=300, val_check_interval=300, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(sweep, TensorActivationDataModule(torch.stack([source, target], 1)[:3584],
                                                  torch.stack([source, target], 1)[3584:], batch_size=256))
    rows = sweep.latest_validation
    assert all(member.sae.is_transcoder for member in sweep.members.values())
    assert "skip_r2" not in rows["plain"] and 0.3 < rows["skip"]["skip_r2"] < rows["skip"]["r2"]
    assert rows["skip"]["r2"] > 0.8 and rows["plain"]["r2"] > 0.5


def test_skip_optimum_readings_are_the_direct_least_squares_ones():
    """benchmarks.skip_optimum's readings of one skip-transcoder: the skip path's R² is that of W_skip x + b_dec;
    on a target made by the same codes with another skip map, refitting the skip in closed form recovers it (R² 1);
    the codes' linear share is the R² of their least-squares map from x, computed directly by torch.linalg.lstsq."""
    from benchmarks.skip_optimum import diagnose
    from sagsae.measures import explained_variance

    torch.manual_seed(4)
    sae = transcoder("relu", skip=True).double()
    source = torch.randn(600, 8, dtype=torch.float64)
    x = sae.normalize(source)
    with torch.no_grad():
        codes_out = sae.decode(sae.encode(x)) - sae.b_dec
        y = codes_out + x @ torch.randn(8, 8, dtype=torch.float64).T + 0.5
        pairs = torch.stack([source, y / sae.output_scale], 1)
        reading = diagnose(sae, pairs[:400], pairs[400:])
        held = slice(400, None)
        assert reading["skip_r2"] == pytest.approx(float(explained_variance(y[held], sae.skip(x[held]) + sae.b_dec)))
        assert reading["r2"] == pytest.approx(float(explained_variance(y[held], sae(x[held]))))
        assert reading["r2"] < 0.9 and reading["r2_skip_at_optimum"] == pytest.approx(1.0, abs=1e-6)
        augmented = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        solution = torch.linalg.lstsq(augmented[:400], codes_out[:400]).solution
        direct = float(explained_variance(codes_out[held], augmented[held] @ solution))
    assert reading["codes_linear_share"] == pytest.approx(direct, abs=1e-6)
