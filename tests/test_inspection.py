"""`sagsae inspect`: the streaming statistics against a brute-force pass, the logit lists against a direct
computation, and the command end to end on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from sagsae.analysis.inspection import HISTOGRAM_BINS, LatentStatistics, histogram_bin, logit_effects
from tests.conftest import REPO, needs

pytestmark = pytest.mark.slow(51)  # seconds in all: the longest files run first (tests/conftest.py)

BEFORE, AFTER, TOP_K, RANDOM_K = 3, 2, 4, 3


def sparse_signed_codes(contexts: int, length: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(contexts, length, width, generator=generator)
    return codes * (torch.rand(contexts, length, width, generator=generator) < 0.15)


def brute_force_window(tokens_CT, codes_CTH, counted_CT, context, position, latent):
    """The token window and the latent's codes around one position, computed directly."""
    start, stop = max(0, position - BEFORE), min(tokens_CT.shape[1], position + AFTER + 1)
    codes = (codes_CTH[context, start:stop, latent] * counted_CT[context, start:stop]).tolist()
    return tokens_CT[context, start:stop].tolist(), codes, position - start


@pytest.fixture(scope="module")
def chunks():
    """Three chunks of 5 contexts × 9 tokens, 6 latents, position 0 (BOS) and a few others not counted."""
    found = []
    for seed in range(3):
        tokens = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(100 + seed))
        counted = torch.rand(5, 9, generator=torch.Generator().manual_seed(200 + seed)) > 0.1
        counted[:, 0] = False
        found.append((tokens, sparse_signed_codes(5, 9, 6, seed), counted))
    return found


@pytest.fixture(scope="module")
def streamed(chunks):
    stats = LatentStatistics(6, top_k=TOP_K, random_k=RANDOM_K, before=BEFORE, after=AFTER)
    for tokens, codes, counted in chunks:
        stats.update(tokens, codes, counted)
    return stats


def all_firings(chunks, latent):
    """(code, window tokens, window codes, place) of every counted firing of `latent`, over all chunks."""
    found = []
    for tokens, codes, counted in chunks:
        for context, position in (codes[:, :, latent] * counted != 0).nonzero().tolist():
            found.append((codes[context, position, latent].item(),
                          *brute_force_window(tokens, codes, counted, context, position, latent)))
    return found


@pytest.mark.parametrize("latent", range(6))
def test_streamed_top_examples_match_a_brute_force_sort(chunks, streamed, latent):
    firings = all_firings(chunks, latent)
    for side, sign in (("positive", 1), ("negative", -1)):
        expected = sorted((f for f in firings if sign * f[0] > 0), key=lambda f: -sign * f[0])[:TOP_K]
        kept = streamed.top[side].examples(latent, BEFORE)
        assert len(kept) == len(expected) > 0
        for (score, tokens, codes, at), (code, want_tokens, want_codes, want_at) in zip(kept, expected):
            assert score == pytest.approx(sign * code)
            assert (tokens, at) == (want_tokens, want_at)
            assert codes == pytest.approx(want_codes)
            assert codes[at] == pytest.approx(code)


@pytest.mark.parametrize("latent", range(6))
def test_streamed_counts_histogram_and_sample_match_the_firings(chunks, streamed, latent):
    firings = all_firings(chunks, latent)
    summary = streamed.summary(latent)
    counted = sum(int(c.sum()) for _, _, c in chunks)
    assert streamed.tokens_counted == counted
    assert summary.density == pytest.approx(len(firings) / counted)
    negatives = [f[0] for f in firings if f[0] < 0]
    assert summary.negative_share == pytest.approx(len(negatives) / len(firings))
    assert summary.max_negative == pytest.approx(max(-c for c in negatives))
    for histogram, values in ((summary.histogram_positive, [f[0] for f in firings if f[0] > 0]),
                              (summary.histogram_negative, [-c for c in negatives])):
        expected = torch.bincount(histogram_bin(torch.tensor(values)), minlength=HISTOGRAM_BINS).tolist()
        assert histogram == expected
    sample = streamed.top["random"].examples(latent, BEFORE)
    assert len(sample) == min(RANDOM_K, len(firings))
    as_firings = [(codes[at], tokens, codes, at) for _, tokens, codes, at in sample]
    for drawn in as_firings:  # every sampled example is a firing, and none twice
        assert any(drawn[0] == pytest.approx(f[0]) and drawn[1:] == (f[1], pytest.approx(f[2]), f[3])
                   for f in firings)
    assert len({(tuple(t), a) for _, t, _, a in as_firings}) == len(as_firings)


def test_random_sample_is_uniform_over_firings():
    """Each of 8 firing positions is sampled (2 of 8) with frequency 1/4 over 2,000 passes."""
    tokens = torch.arange(8)[None]
    codes = torch.ones(1, 8, 1)
    hits = torch.zeros(8)
    for seed in range(2000):
        stats = LatentStatistics(1, top_k=1, random_k=2, before=0, after=0, seed=seed)
        stats.update(tokens, codes, torch.ones(1, 8, dtype=torch.bool))
        for _, window, _, _ in stats.top["random"].examples(0, 0):
            hits[window[0]] += 1
    assert (hits / 2000 - 0.25).abs().max() < 0.04


def test_logit_effects_are_the_extremes_of_the_direct_computation():
    generator = torch.Generator().manual_seed(0)
    directions, unembedding = torch.randn(7, 5, generator=generator), torch.randn(30, 5, generator=generator)
    promoted, promoted_values, suppressed, suppressed_values = logit_effects(directions, lambda d: d @ unembedding.T,
                                                                             k=3, chunk=2)
    logits = directions @ unembedding.T
    logits = logits - logits.mean(-1, keepdim=True)
    order = logits.argsort(dim=-1, descending=True)
    assert torch.equal(promoted, order[:, :3]) and torch.equal(suppressed, order.flip(-1)[:, :3])
    assert torch.allclose(promoted_values, logits.gather(1, order[:, :3]))
    assert torch.allclose(suppressed_values, logits.gather(1, order.flip(-1)[:, :3]))


def test_direct_logits_are_the_final_norm_then_the_unembedding(tiny_llama):
    from transformers import AutoModelForCausalLM

    from datamodules.hookpoints import ActivationReader

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    directions = torch.randn(4, 32)
    expected = model.lm_head(model.model.norm(directions))
    assert torch.allclose(ActivationReader(model, "mlp_out", 2).direct_logits(directions), expected, atol=1e-6)


def test_inspect_pass_matches_a_brute_force_pass_on_a_small_model(tiny_llama, exported_sae):
    from datamodules.hooked_lm import HookedLanguageModel
    from datamodules.text import TextSource
    from sagsae.commands.inspect import inspect_sae
    from sagsae.formats.serialization import load

    root, texts = exported_sae
    sae = load(root / "sae")
    lm = HookedLanguageModel(str(tiny_llama), None, "mlp_out", 2, "float32", torch.device("cpu"), 24)
    documents = list(TextSource("json", data_files=str(texts)).documents())
    stats = LatentStatistics(sae.width, top_k=3, random_k=2, before=BEFORE, after=AFTER)
    inspect_sae(sae, lm, documents, tokens=600, stats=stats, lm_batch_size=8, progress=lambda _: None)

    every_context = torch.tensor(list(lm.contexts(documents)))
    counted_so_far = lm.trainable_positions(every_context).sum(1).cumsum(0)
    # the pass reads whole LM batches of 8 contexts until 600 tokens are counted
    used = next(end for end in range(8, len(every_context) + 8, 8) if counted_so_far[end - 1] >= 600)
    contexts = every_context[:used]
    counted = lm.trainable_positions(contexts)
    with torch.no_grad():
        codes = sae.encode(lm.context_activations(contexts))[counted]  # [counted tokens, H]
    assert stats.tokens_counted == len(codes)
    assert torch.equal(stats.fires_H, (codes != 0).sum(0))
    assert torch.equal(stats.negative_fires_H, (codes < 0).sum(0))
    for side, signed in (("positive", codes), ("negative", -codes)):
        expected = signed.where(signed > 0, torch.tensor(-torch.inf)).topk(3, dim=0).values.T
        assert torch.allclose(stats.top[side].scores_HK, expected, rtol=1e-5)


def test_inspect_command_writes_a_browser_that_names_both_signs(tiny_llama, exported_sae, tmp_path):
    root, texts = exported_sae
    out = tmp_path / "browser"
    command = [sys.executable, "-m", "sagsae", "inspect", "--sae", str(root / "sae"), "--out", str(out),
               "--dataset", "json", "--data_files", str(texts), "--tokens", "1500"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "index.html" in result.stdout
    index = json.loads((out / "data" / "index.json").read_text())
    assert index["about"]["signed"] and index["about"]["tokens"] >= 1500
    assert [row["index"] for row in index["rows"]] == list(range(48))
    records = json.loads((out / "data" / "latents_0.json").read_text())["records"]
    bipolar = [r for r in records if r["positive"] and r["negative"]]
    assert bipolar, "a generic SA-GSAE has latents that fire with both signs"
    for example in bipolar[0]["negative"]:
        assert example["codes"][example["at"]] < 0
    assert len(records[0]["promoted"]) == 10
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_inspect_reads_a_fit_checkpoint_end_to_end(tiny_llama, text_file, tmp_path):
    """`fit` on a tiny model, then `inspect --ckpt_path` with nothing else about the model: the checkpoint names
    the LM, hookpoint and layer, and the browser covers every latent of the trained SAE, whose codes it recomputes."""
    from sagsae.commands.train import run
    from sagsae.formats.serialization import read_checkpoint, sae_from_checkpoint
    from tests.test_cli import tiny_args

    run(["fit", *tiny_args(tiny_llama, text_file, tmp_path / "run", steps=6)])
    checkpoint = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "browser"
    result = subprocess.run([sys.executable, "-m", "sagsae", "inspect", "--ckpt_path", str(checkpoint), "--out",
                             str(out), "--dataset", "json", "--data_files", str(text_file), "--tokens", "600"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((out / "data" / "index.json").read_text())
    sae = sae_from_checkpoint(read_checkpoint(checkpoint))
    assert [row["index"] for row in index["rows"]] == list(range(sae.width)) and index["about"]["tokens"] >= 600
    assert index["about"]["signed"] == sae.signed_codes


def chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def render(url: str, tmp_path, size: str = "1400,1000"):
    """The page's DOM after its scripts ran, and a screenshot, from headless Chromium."""
    from PIL import Image

    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={size}",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    screenshot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return dom, Image.open(screenshot).convert("RGB")


@needs(chromium() is not None, reason="needs Chromium (Debian: apt-get install chromium); .ci/run installs it")
def test_browser_shows_the_index_and_both_sides_of_a_bipolar_latent_in_chromium(exported_sae, tmp_path):
    root, texts = exported_sae
    out = tmp_path / "browser"
    result = subprocess.run([sys.executable, "-m", "sagsae", "inspect", "--sae", str(root / "sae"), "--out", str(out),
                             "--dataset", "json", "--data_files", str(texts), "--tokens", "1500"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((out / "data" / "latents_0.json").read_text())["records"]
    bipolar = next(r for r in records if len(r["positive"]) >= 2 and len(r["negative"]) >= 2)

    dom, screenshot = render((out / "index.html").as_uri(), tmp_path)
    assert len(re.findall(r'<tr class="row" data-latent="\d+"', dom)) == 48  # every latent on the first page
    assert "48 of 48 latents" in dom
    colours = screenshot.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, "the screenshot is blank"

    dom, screenshot = render(f"{(out / 'index.html').as_uri()}#latent/{bipolar['index']}", tmp_path, "1400,1400")
    assert f"Latent {bipolar['index']}" in dom
    for side in ("positive", "negative"):
        panel = dom.split(f'data-side="{side}"')[1].split('data-side=')[0]
        assert panel.count('<div class="context">') == len(bipolar[side])
        first_token = bipolar[side][0]["tokens"][bipolar[side][0]["at"]]
        assert re.search(f'class="t at"[^>]*>{re.escape(first_token)}<', panel)
    pixels = screenshot.resize((140, 140)).getdata()
    assert any(r > 200 and b < 120 for r, g, b in pixels), "no orange (positive) shading visible"
    assert any(b > 200 and r < 120 for r, g, b in pixels), "no blue (negative) shading visible"


@needs(chromium() is not None, reason="needs Chromium (Debian: apt-get install chromium); .ci/run installs it")
def test_the_browser_shows_a_matryoshka_sae_s_levels(exported_sae, tmp_path):
    from sagsae.formats.serialization import export, load

    root, texts = exported_sae
    nested = load(root / "sae").make_matryoshka([12, 24, 48])  # the same SAE, its latents in three levels
    metadata = json.loads((root / "sae" / "cfg.json").read_text())["metadata"]
    export(nested, tmp_path / "nested", metadata)
    out = tmp_path / "browser"
    result = subprocess.run([sys.executable, "-m", "sagsae", "inspect", "--sae", str(tmp_path / "nested"), "--out",
                             str(out), "--dataset", "json", "--data_files", str(texts), "--tokens", "500"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    dom, _ = render((out / "index.html").as_uri(), tmp_path)
    assert '<th data-sort="level">level' in dom
    levels = dict(re.findall(r'data-latent="(\d+)">\s*<td class="num">\d+</td><td class="num">(\d)</td>', dom))
    assert len(levels) == 48 and levels["0"] == "1" and levels["23"] == "2" and levels["24"] == "3"
    dom, _ = render(f"{(out / 'index.html').as_uri()}#latent/30", tmp_path)
    assert "level 3 (prefix of 48)" in dom


def test_inspect_names_what_is_missing_or_mismatched(tiny_llama, exported_sae, tmp_path):
    from sagsae.saes import build_sae
    from sagsae.formats.serialization import export

    root, texts = exported_sae
    bare = export(build_sae("sagsae", d_in=32, width=8), tmp_path / "bare")  # no model recorded
    narrow = export(build_sae("sagsae", d_in=16, width=8), tmp_path / "narrow", {"model_name": str(tiny_llama),
                                                                                  "hook_name": "blocks.2.hook_mlp_out"})
    data = ["--dataset", "json", "--data_files", str(texts), "--tokens", "100"]
    for sae, expected in ((bare, "does not record its model and hookpoint: give --model and --hookpoint"),
                          (narrow, "reads 16-wide activations but")):
        result = subprocess.run([sys.executable, "-m", "sagsae", "inspect", "--sae", str(sae), "--out",
                                 str(tmp_path / "out"), *data], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-1000:]
    assert not (tmp_path / "out").exists()
