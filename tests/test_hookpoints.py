"""Hookpoints on tiny random models of several families, checked against the residual stream's identities."""

from __future__ import annotations

import pytest
import torch

from datamodules.hookpoints import ActivationReader, UnknownHookpointError, parse_hookpoint, transformer_lens_name
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "gpt2", "gpt_neox"])
def tiny_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def read(model, hookpoint, layer, ids):
    return ActivationReader(model, hookpoint, layer)(ids)


def test_hookpoints_satisfy_residual_identities(tiny_model):
    ids = torch.randint(3, 50, (2, 9))
    layer = 1
    with torch.inference_mode():
        hidden = tiny_model(ids, output_hidden_states=True).hidden_states
    pre, mid, post = (read(tiny_model, name, layer, ids) for name in ("resid_pre", "resid_mid", "resid_post"))
    attn, mlp = read(tiny_model, "attn_out", layer, ids), read(tiny_model, "mlp_out", layer, ids)
    torch.testing.assert_close(pre, hidden[layer])
    torch.testing.assert_close(post, hidden[layer + 1])
    torch.testing.assert_close(pre + attn, mid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mid + mlp, post, rtol=1e-5, atol=1e-5)


def test_forward_stops_at_the_hooked_layer(tiny_model):
    reader = ActivationReader(tiny_model, "mlp_out", 1)
    layers = tiny_model.get_submodule(reader.terms[0][0].rsplit(".", 2)[0])
    calls = []
    handle = layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        reader(torch.randint(3, 50, (1, 5)))
    finally:
        handle.remove()
    assert calls == [], "layers above the hook must not run"


def test_transformer_lens_aliases_and_errors(tiny_model):
    assert parse_hookpoint("blocks.15.hook_resid_mid", None) == ("resid_mid", 15)
    ids = torch.randint(3, 50, (1, 6))
    torch.testing.assert_close(read(tiny_model, "blocks.1.hook_mlp_out", None, ids), read(tiny_model, "mlp_out", 1, ids))
    with pytest.raises(UnknownHookpointError, match="Valid hookpoints: resid_pre, resid_mid"):
        parse_hookpoint("resid_nonsense", 1)
    with pytest.raises(UnknownHookpointError, match=r"layers 0\.\.3"):
        ActivationReader(tiny_model, "mlp_out", 4)
    assert ActivationReader(tiny_model, "mlp_out").layer == 2  # mid-depth of 4 layers


def test_several_hookpoints_from_one_forward(tiny_model):
    from datamodules.hookpoints import read_hookpoints

    ids = torch.randint(3, 50, (2, 7))
    readers = [ActivationReader(tiny_model, name, layer)
               for name, layer in [("resid_mid", 1), ("mlp_out", 2), ("attn_out", 0)]]
    layers = tiny_model.get_submodule(readers[1].terms[0][0].rsplit(".", 2)[0])
    calls = []
    handle = layers[3].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        together = read_hookpoints(tiny_model, readers, ids)
    finally:
        handle.remove()
    assert calls == [], "the forward stops after the deepest hookpoint"
    for reader, tensor in zip(readers, together):
        torch.testing.assert_close(tensor, reader(ids))


def test_mlp_in_is_what_the_mlp_reads(tiny_model):
    """The MLP applied to mlp_in gives mlp_out (through Gemma's post-MLP norm, which writes the residual there),
    and mlp_in is the MLP's normalized input, not the residual: TransformerLens's ln2.hook_normalized."""
    ids = torch.randint(3, 50, (2, 9))
    reader = ActivationReader(tiny_model, "mlp_in", 1)
    mlp_in, mlp_out = reader(ids), read(tiny_model, "mlp_out", 1, ids)
    block = tiny_model.get_submodule(reader.terms[0][0].rsplit(".", 1)[0])
    with torch.inference_mode():
        written = block.mlp(mlp_in)
        if hasattr(block, "post_feedforward_layernorm"):
            written = block.post_feedforward_layernorm(written)
    torch.testing.assert_close(written, mlp_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mlp_in, read(tiny_model, "resid_mid", 1, ids), atol=1e-3)
    assert parse_hookpoint("blocks.1.ln2.hook_normalized", None) == ("mlp_in", 1)
    assert transformer_lens_name("mlp_in", 1) == "blocks.1.ln2.hook_normalized"
    assert transformer_lens_name("mlp_out", 1) == "blocks.1.hook_mlp_out"
