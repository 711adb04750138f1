"""Hookpoint resolution and truncated activation reading for Hugging Face causal LMs (docs/method.md).

A hookpoint is a sum of module inputs/outputs ("terms"): usually one, but Pythia's parallel residual has no
resid_mid tensor, so there it is resid_pre + attn_out. The reader raises out of the forward as soon as the
last term is captured, so the layers above the hook are never computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

HOOKPOINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out")
# TransformerLens's names: `blocks.L.hook_NAME`, except the MLP's normalized input, `blocks.L.ln2.hook_normalized`
# (its `hook_mlp_in` is the residual before the norm), which transcoders read.
_TRANSFORMER_LENS_ALIAS = re.compile(r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)"
                                     r"|(ln2)\.hook_normalized)$")


def transformer_lens_name(hookpoint: str, layer: int) -> str:
    """The TransformerLens (and SAELens `hook_name`) name of one of our hookpoints at a layer."""
    return f"blocks.{layer}.ln2.hook_normalized" if hookpoint == "mlp_in" else f"blocks.{layer}.hook_{hookpoint}"


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and the modules that bound each residual write."""

    layers: str  # dotted path to the list of decoder blocks
    attn: str  # module whose output is the attention block's write to the residual
    mlp: str  # module whose output is the MLP block's write to the residual
    mid_norm: str | None  # module whose input is resid_mid (the MLP's norm); None for a parallel residual
    final_norm: str = "model.norm"  # dotted path to the norm between the last block and the unembedding
    mlp_in: str = "mlp"  # module whose input is the MLP's normalized input (mlp_in)


_LLAMA_LIKE = Family("model.layers", "self_attn", "mlp", "post_attention_layernorm")
# Gemma 2/3 normalize each block's output before adding it to the residual, so the writes are the norms' outputs.
_GEMMA_SANDWICH = Family("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm")
FAMILIES: dict[str, Family] = {
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma")},
    **{name: _GEMMA_SANDWICH for name in ("gemma2", "gemma3", "gemma3_text")},
    "gpt2": Family("transformer.h", "attn", "mlp", "ln_2", "transformer.ln_f"),
    "gpt_neox": Family("gpt_neox.layers", "attention", "mlp", "post_attention_layernorm", "gpt_neox.final_layer_norm"),
}

Term = tuple[str, Literal["input", "output"]]


class UnknownHookpointError(ValueError):
    pass


def parse_hookpoint(name: str, layer: int | None) -> tuple[str, int | None]:
    """Accept our names (`mlp_out` + layer) and TransformerLens/SAELens ones (`blocks.15.hook_mlp_out`)."""
    alias = _TRANSFORMER_LENS_ALIAS.match(name)
    if alias:
        alias_layer = int(alias.group(1))
        if layer is not None and layer != alias_layer:
            raise UnknownHookpointError(f"Hookpoint {name!r} names layer {alias_layer} but layer={layer} was given")
        return ("mlp_in" if alias.group(3) else alias.group(2)), alias_layer
    if name not in HOOKPOINTS:
        raise UnknownHookpointError(
            f"Unknown hookpoint {name!r}. Valid hookpoints: {', '.join(HOOKPOINTS)} "
            f"(with a layer), or TransformerLens names such as 'blocks.15.hook_mlp_out' or "
            f"'blocks.15.ln2.hook_normalized' (mlp_in)."
        )
    return name, layer


def model_family(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnknownHookpointError(
            f"No hookpoint table for model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def _is_parallel_residual(model: nn.Module) -> bool:
    return bool(getattr(model.config, "use_parallel_residual", False))


def num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(model_family(model).layers))


def mid_depth_layer(model: nn.Module) -> int:
    """The paper's "mid-depth": ⌊n_layers / 2⌋."""
    return num_layers(model) // 2


def resolve_hookpoint(model: nn.Module, hookpoint: str, layer: int | None) -> tuple[str, int, list[Term]]:
    """(canonical name, layer, terms whose sum is the hookpoint's tensor); fails with the valid choices."""
    name, layer = parse_hookpoint(hookpoint, layer)
    family = model_family(model)
    n_layers = num_layers(model)
    layer = mid_depth_layer(model) if layer is None else layer
    if not 0 <= layer < n_layers:
        raise UnknownHookpointError(f"Layer {layer} is out of range: this model has layers 0..{n_layers - 1}.")
    block = f"{family.layers}.{layer}"
    if name == "resid_pre":
        terms: list[Term] = [(block, "input")]
    elif name == "resid_post":
        terms = [(block, "output")]
    elif name == "attn_out":
        terms = [(f"{block}.{family.attn}", "output")]
    elif name == "mlp_out":
        terms = [(f"{block}.{family.mlp}", "output")]
    elif name == "mlp_in":
        terms = [(f"{block}.{family.mlp_in}", "input")]
    elif family.mid_norm is None or _is_parallel_residual(model):
        terms = [(block, "input"), (f"{block}.{family.attn}", "output")]  # parallel residual: defined (docs/method.md)
    else:
        terms = [(f"{block}.{family.mid_norm}", "input")]
    return name, layer, terms


class _StopForward(Exception):
    """Raised from a hook once every term is captured: nothing above the hook runs."""


class ActivationReader:
    """Runs a frozen LM up to a hookpoint and returns its activations [batch, seq, d]."""

    def __init__(self, model: nn.Module, hookpoint: str, layer: int | None = None) -> None:
        self.model = model
        self.hookpoint, self.layer, self.terms = resolve_hookpoint(model, hookpoint, layer)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return read_hookpoints(self.model, [self], input_ids, attention_mask)[0]

    @torch.no_grad()
    def direct_logits(self, directions: Tensor) -> Tensor:
        """Logits of residual-stream directions [n, d] read straight out: the final norm, then the unembedding
        (the direct path of a write to the residual, as feature dashboards show it)."""
        final_norm = self.model.get_submodule(model_family(self.model).final_norm)
        weight = self.model.get_output_embeddings().weight
        return final_norm(directions.to(weight)) @ weight.T

    def single_term(self) -> Term:
        if len(self.terms) != 1:
            raise NotImplementedError(f"{self.hookpoint} is a sum of tensors in this model (a parallel residual): "
                                      f"it cannot be replaced in the forward")
        return self.terms[0]

    def logits_with_replacement(self, input_ids: Tensor, replace, source: ActivationReader | None = None) -> Tensor:
        """The full forward with the hookpoint's tensor replaced by `replace(read, written)` (for spliced LM loss):
        `written` is this hookpoint's tensor, `read` the same tensor, or with `source` (a transcoder's) the source
        hookpoint's tensor of the same forward, which must come before this one."""
        path, kind = self.single_term()
        captured: list[Tensor] = []
        handles = []
        if source is not None:
            source_path, source_kind = source.single_term()

            def keep(tensor: Tensor) -> Tensor:
                captured.append(tensor)
                return tensor

            handles.append(hook_term(self.model.get_submodule(source_path), source_kind, keep))

        def rewrite(written: Tensor) -> Tensor:
            if source is not None and not captured:
                raise RuntimeError(f"The source hookpoint {source.hookpoint} comes after the target {self.hookpoint} "
                                   f"in the forward: a transcoder must read before it writes")
            return replace(captured[-1] if source is not None else written, written)

        handles.append(hook_term(self.model.get_submodule(path), kind, rewrite))
        try:
            with torch.inference_mode():
                return self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()


def hook_term(module: nn.Module, kind: str, rewrite) -> torch.utils.hooks.RemovableHandle:
    """A hook that passes a module's input or output tensor (its first, for a tuple) through `rewrite`."""
    if kind == "input":
        def pre_hook(_module, args, kwargs):
            if args:
                return (rewrite(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": rewrite(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        if isinstance(output, (tuple, list)):
            return (rewrite(output[0]), *output[1:])
        return rewrite(output)

    return module.register_forward_hook(hook)


def read_hookpoints(model: nn.Module, readers: list[ActivationReader], input_ids: Tensor,
                    attention_mask: Tensor | None = None) -> list[Tensor]:
    """Several hookpoints from one forward, which stops once the deepest term is captured."""
    terms = [(r, term) for r, reader in enumerate(readers) for term in reader.terms]
    captured: dict[int, Tensor] = {}
    handles = []

    def store(index: int, value: Tensor) -> Tensor:
        captured[index] = value
        if len(captured) == len(terms):
            raise _StopForward
        return value

    for index, (_, (path, kind)) in enumerate(terms):
        handles.append(hook_term(model.get_submodule(path), kind, lambda value, i=index: store(i, value)))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(terms):
        missing = {readers[r].hookpoint for i, (r, _) in enumerate(terms) if i not in captured}
        raise RuntimeError(f"Hookpoints {sorted(missing)} were never reached in the forward")
    return [sum(captured[i] for i, (owner, _) in enumerate(terms) if owner == r) for r in range(len(readers))]
