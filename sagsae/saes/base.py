"""Shared machinery of every SAE architecture: the registry, the loss record and the torch-only interface.

Each architecture is one file in this package that subclasses `SparseAutoencoder` and registers itself by
name; everything specific to it (its switches, its SAELens layout, its sparsity kind, its Adam betas) is an
attribute or method of its class, so training, export, loading and `params` never branch on a name. Nothing
here imports Lightning, so a trained SAE loads and runs with torch alone.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from sagsae.saes.matryoshka import Nesting, cumulative_decodes, cumulative_pair_decodes
from sagsae.saes.sparse_codes import nonzero_decode


SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}
PREFIX_SEED = 20_250_317  # random Matryoshka prefixes: draw n comes from a generator seeded PREFIX_SEED + n


def register(name: str):
    """Class decorator: make an architecture constructible by name (`build_sae(name, ...)`)."""

    def decorate(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        cls.architecture = name
        if "saelens_architecture" not in cls.__dict__:  # exported under its own name unless it says otherwise
            cls.saelens_architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return decorate


def sae_class(architecture: str) -> type[SparseAutoencoder]:
    """The class registered as `architecture`; fails with the known names."""
    if architecture not in SAE_REGISTRY:
        raise ValueError(f"Unknown SAE architecture {architecture!r}; known: {sorted(SAE_REGISTRY)}")
    return SAE_REGISTRY[architecture]


def build_sae(architecture: str, **kwargs) -> SparseAutoencoder:
    return sae_class(architecture)(**kwargs)


def sae_class_for_saelens(architecture: str) -> type[SparseAutoencoder]:
    """The class that reads a SAELens folder of `architecture`: ours of that name, else the one exported under
    it (SAELens's "standard" is our ReLU-L1)."""
    if architecture in SAE_REGISTRY:
        return SAE_REGISTRY[architecture]
    for cls in SAE_REGISTRY.values():
        if cls.saelens_architecture == architecture:
            return cls
    known = sorted(set(SAE_REGISTRY) | {cls.saelens_architecture for cls in SAE_REGISTRY.values()})
    raise ValueError(f"Unsupported architecture {architecture!r}; supported: {known}")


@dataclass
class SAELoss:
    """One training step's loss, its terms (already weighted as summed) and what the metrics need. Every loss
    has the unweighted "recon" term, ‖x − x̂‖² averaged over the batch (docs/method.md): a training step's R² and MSE
    are read from it rather than from another pass over x̂."""

    total: Tensor
    terms: dict[str, Tensor]
    codes: Tensor
    reconstruction: Tensor
    gate_squared_error: Tensor | None = None  # ‖x − x̂_gate‖² averaged over the batch, where there is a gate path
    firing: Tensor | None = None  # per-latent firing counts [H], where the SAE has them without a pass over `codes`
    prefix_squared_errors: Tensor | None = None  # a Matryoshka SAE's ‖x − x̂_l‖² per prefix below the width [L − 1]

    @property
    def squared_error(self) -> Tensor:
        return self.terms["recon"]


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖² summed over d, averaged over the batch (docs/method.md, "Loss and gradients")."""
    return (x - x_hat).pow(2).sum(-1).mean()


def centered_projection(x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """(x − b_dec) · weightᵀ (+ bias), with b_dec's gradient carried by an [H] vector instead of the [B, d] one that
    autograd would build with a whole extra B·H·d matmul: (b_dec − b̄) · weightᵀ, b̄ = b_dec detached, is zero in
    value (the result is exactly (x − b̄) · weightᵀ) and gives ∂/∂b_dec = −Σ_batch grad · weight."""
    fixed = b_dec.detach()
    shift = (b_dec - fixed) @ weight.T
    return (x - fixed) @ weight.T + (-shift if bias is None else bias - shift)


def check_init_quantile(name: str, value: float | None) -> None:
    """A first-batch initialization quantile (None = off) must lie strictly between 0 and 1."""
    if value is not None and not 0 < value < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")


def random_unit_columns(d_in: int, width: int) -> Tensor:
    decoder = torch.randn(d_in, width)
    return decoder / decoder.norm(dim=0, keepdim=True)


# "auto"'s share for fp32 codes on CPU. The sparse decode's step wins below 11% density at width 4,608 and below 5.8%
# at 16,384 in fp32 on CPU; under bf16 it lost at 1% (docs/performance.md, "The sparse decode"). Below d_in 256 the
# dense decode is cheap and the crossover falls with d_in (1.5% at d_in 64, 3.3% at 128), so the share scales down.
AUTO_SPARSE_SHARE = 0.05
AUTO_SPARSE_FULL_D_IN = 256
SKIP_START_RIDGE = 0.1  # the least-squares start's ridge: best of 1e-8 … 1 on SmolLM2's first batch (docs/method.md)


def ridge_least_squares(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """(W, b) minimizing Σ‖y − W x − b‖² + ρ‖W‖², ρ = `ridge` × the mean diagonal of the centred Gram matrix
    (so that `ridge` is free of the data's scale), solved in float64 and returned in x's dtype."""
    x64, y64 = x.double(), y.double()
    x_mean, y_mean = x64.mean(0), y64.mean(0)
    centred = x64 - x_mean
    gram = centred.T @ centred
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram, centred.T @ (y64 - y_mean)).T
    return weight.to(x.dtype), (y_mean - x_mean @ weight.T).to(x.dtype)


def fold_normalization(saelens_key: str, value: Tensor, input_scale: float, output_scale: float) -> Tensor:
    """A tensor in SAELens's raw-activation terms: x_norm = s·x_raw, so W_enc ← s·W_enc, W_dec and b_dec ← /s'
    (s' = s, or a transcoder's target scalar); biases and thresholds live in code space and stay."""
    if saelens_key == "W_enc":
        return value * input_scale
    if saelens_key in ("W_dec", "b_dec"):
        return value / output_scale
    return value


class SparseAutoencoder(nn.Module):
    """Interface: `encode` → codes [B, H], `decode` → x̂ [B, d], `loss` → SAELoss for training.

    Every architecture shares the decoder (W_dec [d, H] with random unit columns at init, b_dec = mean of the
    first batch). `unit_norm_decoder` keeps its columns at unit norm: the gradient's component along each
    column is removed before the step and the columns are renormalized after it. Otherwise the sparsity
    penalty must weight each latent by its decoder norm, so that shrinking the encoder while growing the
    decoder cannot dodge it.

    `input_scale` is the scalar that maps raw activations to E‖x‖² = d (docs/method.md); it is stored with the SAE
    and applied by `normalize`, so that exports can fold it into the weights.

    Any architecture becomes a transcoder with `make_transcoder` (docs/method.md, "Transcoders"): it then encodes
    one hookpoint (the source) and decodes another (the target). The machinery lives here, so no architecture
    knows of it: the encoder centers the source by its own mean (`source_mean`) instead of b_dec, b_dec and the
    decoder live in the target's space, the target has its own normalization scalar (`target_scale`), and an
    optional skip connection W_skip (zeros at the start, or a least-squares map: `initialize_target`) adds
    W_skip x to the decode.
    """

    architecture: str = ""  # registry name, set by `register`
    signed_codes: bool = False  # codes of both signs (SA-GSAE, AbsTopK) or non-negative ones
    k_sparse: bool = False  # sparsity set by a number k of active latents (TopK family) rather than by λ
    adam_betas: tuple[float, float] = (0.0, 0.999)  # the training module's default for this architecture
    saelens_architecture: str = ""  # the `architecture` of its SAELens export; default: the registry name
    saelens_tensors: dict[str, str] = {}  # SAELens key → our attribute, for the layout-only exports
    # Train through an elementwise chain fused into one autograd function where the architecture has one (Gated
    # and SA-GSAE: sagsae/saes/gated_chain.py; JumpReLU: `jump_relu_with_counts`); False composes it from torch ops,
    # the same values and gradients, as benchmarks/fused_chain.py does to measure the difference.
    use_fused_chain: bool = True
    # Decode from the non-zero codes alone, a gather-sum over each token's active latents (`nonzero_decode`), when
    # at most this share of the codes is non-zero; None decodes densely; "auto" takes AUTO_SPARSE_SHARE for fp32
    # codes on CPU (less below d_in 256) and decodes densely otherwise. The main reconstruction and the gate path's
    # both go through `decode`, and the decoder's and the codes' gradients then touch the active entries only.
    sparse_decode_below: float | str | None = None

    def __init__(self, d_in: int, width: int, unit_norm_decoder: bool = False) -> None:
        super().__init__()
        for name, value in (("width", width), ("d_in", d_in)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.d_in = d_in
        self.width = width
        self.unit_norm_decoder = unit_norm_decoder
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.W_dec = nn.Parameter(random_unit_columns(d_in, width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # a transcoder's (make_transcoder); None, and absent from the state dict, for an autoencoder
        self.register_buffer("source_mean", None)
        self.register_buffer("target_scale", None)
        self.register_parameter("W_skip", None)
        self.nesting: Nesting | None = None  # Matryoshka levels (make_matryoshka)
        self.register_buffer("prefix_draws", None)  # random prefix sizes drawn so far (a resumed run draws alike)

    # ----- transcoders -----------------------------------------------------------------------------------
    def make_transcoder(self, skip: bool = False) -> SparseAutoencoder:
        """Make this SAE a transcoder (before training; it adds the source mean, the target scale and W_skip and
        changes nothing else): source and target have the same size d_in, as every hookpoint of one LM does.
        Returns the SAE."""
        reference = self.b_dec
        self.source_mean = torch.zeros_like(reference.detach())
        self.target_scale = torch.ones((), dtype=self.input_scale.dtype, device=self.input_scale.device)
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_in, dtype=reference.dtype,
                                                   device=reference.device))
        return self

    @property
    def is_transcoder(self) -> bool:
        return self.target_scale is not None

    def transcoder_config(self) -> dict[str, bool] | None:
        """`make_transcoder`'s arguments (None for an autoencoder): checkpoints record them beside `config()`."""
        return {"skip": self.W_skip is not None} if self.is_transcoder else None

    def encoder_center(self) -> Tensor:
        """What the encoder subtracts from its input: b_dec for an autoencoder, the source's mean for a
        transcoder (whose b_dec lives in the target's space)."""
        return self.b_dec if self.source_mean is None else self.source_mean

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip connection's W_skip x (None without one)."""
        return None if self.W_skip is None else x @ self.W_skip.T

    def set_scales(self, scales: Sequence[float]) -> None:
        """The normalization scalars estimated on the data: one for an autoencoder's activations, (source,
        target) for a transcoder's pairs."""
        if len(scales) != (2 if self.is_transcoder else 1):
            kind = "a transcoder needs (source, target) pairs" if self.is_transcoder else \
                "an autoencoder reads one hookpoint"
            raise ValueError(f"Got {len(scales)} normalization scalar(s) for this SAE: {kind}")
        self.input_scale.fill_(scales[0])
        if self.is_transcoder:
            self.target_scale.fill_(scales[1])

    @property
    def output_scale(self) -> Tensor:
        """The scalar that normalized the decode's space: the target's for a transcoder, else input_scale."""
        return self.input_scale if self.target_scale is None else self.target_scale

    # ----- Matryoshka nesting --------------------------------------------------------------------------
    def make_matryoshka(self, widths: Sequence[int], weights: Sequence[float] | None = None,
                        random_prefixes: bool = False) -> SparseAutoencoder:
        """Make every prefix of the latents reconstruct on its own (sagsae/saes/matryoshka.py): the loss adds
        Σ_l w_l ‖x − x̂_l‖² over the prefixes below the width. Before training; returns the SAE."""
        self.nesting = Nesting.checked(self.width, widths, weights, random_prefixes)
        if self.nesting.random_prefixes:
            self.prefix_draws = torch.zeros((), dtype=torch.long, device=self.W_dec.device)
        return self

    def matryoshka_config(self) -> dict[str, Any] | None:
        """`make_matryoshka`'s arguments (None without nesting): checkpoints and exports record them."""
        if self.nesting is None:
            return None
        return {"widths": list(self.nesting.widths), "weights": list(self.nesting.weights),
                "random_prefixes": self.nesting.random_prefixes}

    def prefix_ends(self) -> tuple[int, ...]:
        """This step's prefix sizes below the width. Random ones are drawn in training only, from a generator
        seeded by the number of draws so far, so that a resumed run draws what it would have drawn."""
        generator = None
        if self.nesting.random_prefixes and self.training:
            generator = torch.Generator().manual_seed(PREFIX_SEED + int(self.prefix_draws))
            self.prefix_draws += 1
        return self.nesting.prefix_ends(self.width, generator)

    def decode_levels(self, codes: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(x̂, [x̂_l of each prefix below the width]): `decode` and no prefixes without nesting; with it, the
        cumulative sums of the groups' decodes, sparse where `decode` would be."""
        if self.nesting is None:
            return self.decode(codes), []
        levels = cumulative_decodes(codes, self.W_dec, self.b_dec, self.prefix_ends(), self.sparse_pairs(codes))
        return levels[-1], levels[:-1]

    def decode_pair_levels(self, rows: Tensor, cols: Tensor, values: Tensor, batch: int) -> tuple[Tensor, list[Tensor]]:
        """`decode_levels` from selected (row, col, value) triples alone, rows ascending (the TopK family)."""
        ends = () if self.nesting is None else self.prefix_ends()
        levels = cumulative_pair_decodes(self.W_dec, self.b_dec, rows, cols, values, batch, ends)
        return levels[-1], levels[:-1]

    def reconstruction_terms(self, target: Tensor, x_hat: Tensor,
                             prefixes: list[Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """({"recon": ‖target − x̂‖²} and, with prefixes, "matryoshka": Σ_l w_l ‖target − x̂_l‖²; the prefixes'
        errors, detached, for their R²). "recon" stays the full width's error: the metrics read it."""
        terms = {"recon": squared_error(target, x_hat)}
        if not prefixes:
            return terms, None
        errors = [squared_error(target, prefix) for prefix in prefixes]
        terms["matryoshka"] = sum(weight * error for weight, error in zip(self.nesting.weights, errors))
        return terms, torch.stack(errors).detach()

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def sparse_share(self, codes: Tensor) -> float | None:
        """The share of non-zero codes below which `decode` goes sparse, `sparse_decode_below` with "auto" resolved
        for these codes."""
        if self.sparse_decode_below != "auto":
            return self.sparse_decode_below
        if codes.device.type != "cpu" or codes.dtype != torch.float32:
            return None
        return AUTO_SPARSE_SHARE * min(1.0, self.d_in / AUTO_SPARSE_FULL_D_IN)

    def sparse_pairs(self, codes: Tensor) -> tuple[Tensor, Tensor] | None:
        """(rows, cols) of the non-zero codes where `decode` goes sparse for them, else None."""
        share = self.sparse_share(codes)
        if share is not None and codes.dim() == 2:
            rows, cols = codes.detach().nonzero(as_tuple=True)
            if len(rows) <= share * codes.numel():
                return rows, cols
        return None

    def decode(self, codes: Tensor) -> Tensor:
        pairs = self.sparse_pairs(codes)
        if pairs is not None:
            return nonzero_decode(codes, *pairs, self.W_dec) + self.b_dec
        return codes @ self.W_dec.T + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        decoded = self.decode(self.encode(x))
        skip = self.skip(x)
        return decoded if skip is None else decoded + skip

    def loss(self, x: Tensor, sparsity_coefficient: float, dead: Tensor | None = None,
             target: Tensor | None = None) -> SAELoss:
        """The training loss on input `x` whose decode must reproduce `target` (None: x itself, an autoencoder).
        `dead` (bool [H]) marks latents silent for the module's window, for losses that use them (AuxK).

        With a skip connection the codes reproduce target − W_skip x: every term of `coding_loss` sees that
        residual with W_skip x detached, and the reconstruction term is then taken again on the whole output, so
        W_skip learns from the reconstruction alone (as in sparsify) and the auxiliary terms leave it be."""
        target = x if target is None else target
        skip = self.skip(x)
        out = self.coding_loss(x, target if skip is None else target - skip.detach(), sparsity_coefficient, dead)
        if self.nesting is not None and "matryoshka" not in out.terms:
            raise ValueError(f"{type(self).__name__}'s coding_loss ignores the Matryoshka levels: decode with "
                             f"decode_levels and take the terms of reconstruction_terms (sagsae/saes/relu.py does)")
        if skip is None:
            return out
        reconstruction = out.reconstruction + skip
        recon = squared_error(target, reconstruction)
        return replace(out, total=out.total + (recon - out.terms["recon"]), terms={**out.terms, "recon": recon},
                       reconstruction=reconstruction)

    def coding_loss(self, x: Tensor, target: Tensor, sparsity_coefficient: float, dead: Tensor | None) -> SAELoss:
        """The architecture's loss: encode `x`, and measure every reconstruction against `target`."""
        raise NotImplementedError

    def weighted_l1(self, codes: Tensor) -> Tensor:
        """Σᵢ ‖W_dec[:, i]‖ · |fᵢ| averaged over the batch [B, H] (plain L1 when the decoder has unit norm)."""
        return self.weighted_latent_l1(codes.abs().sum(0), len(codes))

    def weighted_latent_l1(self, latent_l1: Tensor, batch_size: int) -> Tensor:
        """`weighted_l1` from the codes' per-latent sums Σ_b |f_bi| [H], which the gated chain
        (sagsae/saes/gated_chain.py) returns without another [B, H] pass."""
        if self.unit_norm_decoder:
            return latent_l1.sum() / batch_size
        return latent_l1 @ self.W_dec.norm(dim=0) / batch_size

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        """Data-dependent initialization on the first (normalized) batch: b_dec = its mean (a transcoder's
        source_mean too; `initialize_target` then sets its b_dec)."""
        self.b_dec.copy_(x.mean(0))
        if self.source_mean is not None:
            self.source_mean.copy_(x.mean(0))

    @torch.no_grad()
    def initialize_target(self, target: Tensor, source: Tensor | None = None) -> None:
        """A transcoder's start in the target's space, after `initialize_from_batch`: b_dec = the target's mean.
        Given the (normalized) source as well, a skip connection starts at the ridge least-squares map from this
        batch's source to its target and b_dec at that map's bias, so that the codes start on the part of the
        target that no linear map of the source explains (docs/method.md, "Transcoders")."""
        if source is None or self.W_skip is None:
            self.b_dec.copy_(target.mean(0))
            return
        weight, bias = ridge_least_squares(source, target, SKIP_START_RIDGE)
        self.W_skip.copy_(weight)
        self.b_dec.copy_(bias)

    @staticmethod
    def column_quantile(values: Tensor, quantile: float) -> Tensor:
        """Each column's `quantile` over the batch ([B, H] → [H]); kthvalue, since torch.quantile caps its input
        size below a 4096 × 4608 batch. Callers pass a quantile their constructor checked (check_init_quantile)."""
        rank = min(len(values), max(1, math.ceil(quantile * len(values))))
        return values.kthvalue(rank, dim=0).values

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            columns = self.W_dec / self.W_dec.norm(dim=0, keepdim=True)
            self.W_dec.grad -= columns * (columns * self.W_dec.grad).sum(0, keepdim=True)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Projections that keep parameters valid after each step (unit norms, threshold floors)."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=0, keepdim=True)

    @torch.no_grad()
    def reset_dead(self, dead: Tensor) -> None:
        """React to latents that have not fired for a whole window (`dead` is a bool mask [H])."""

    def threshold_values(self) -> Tensor | None:
        """The learned per-latent thresholds that gate the codes, in π's units (None: it has none). Training logs
        how far they move from their start, the question of docs/method.md's "Thresholds" section."""
        return None

    def threshold_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold those thresholds (a training module may give them their own LR)."""
        return []

    @torch.no_grad()
    def scale_diagnostics(self) -> dict[str, Tensor]:
        """Medians of the scales that the loss leaves free to drift together (docs/method.md, "The gate path"): without
        a unit-norm constraint, a decoder column can grow while its encoder shrinks."""
        return {"decoder_norm_q50": self.W_dec.norm(dim=0).median()}

    def normalize(self, raw: Tensor) -> Tensor:
        return raw * self.input_scale

    def normalize_target(self, raw: Tensor) -> Tensor:
        return raw * self.output_scale

    def reconstruct_raw(self, raw: Tensor) -> Tensor:
        """x̂ in the activations' own scale (a transcoder's: the target's): normalize, encode, decode, undo the
        normalization."""
        return self(self.normalize(raw)) / self.output_scale

    # ----- what rebuilds, exports and counts it --------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor's arguments, read back from the attributes of the same names: `type(sae)(**config)`
        rebuilds this architecture (checkpoints and sweeps record it)."""
        names = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        missing = [name for name in names if not hasattr(self, name)]
        if missing:
            raise TypeError(f"{type(self).__name__} must keep its constructor arguments {missing} as attributes of "
                            f"the same names (config() rebuilds the SAE from them)")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def parameter_count(cls, d_in: int, width: int, **switches: Any) -> int:
        """Trainable parameters at this size (docs/method.md, "Baselines")."""
        sae = cls(d_in=d_in, width=width, **switches)
        return sum(p.numel() for p in sae.parameters() if p.requires_grad)

    def saelens_tensor(self, key: str, attribute: str) -> Tensor:
        """Our `attribute` as SAELens's `key`: float32 on CPU, normalization folded in, W_enc/W_dec transposed
        ([d_in, d_sae] and [d_sae, d_in] there)."""
        value = fold_normalization(key, getattr(self, attribute).detach().float().cpu(), float(self.input_scale),
                                   float(self.output_scale))
        return value.T.contiguous() if key in ("W_enc", "W_dec") else value.clone()

    def to_saelens(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, architecture-specific cfg fields) in SAELens's layout, taking raw activations."""
        tensors = {key: self.saelens_tensor(key, attribute) for key, attribute in self.saelens_tensors.items()}
        return tensors, {"architecture": self.saelens_architecture, **self.saelens_config()}

    def saelens_config(self) -> dict[str, Any]:
        """cfg.json fields beyond SAELens's common ones (TopK: k)."""
        return {}

    @classmethod
    def saelens_switches(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments read from a SAELens cfg.json (the inverse of `saelens_config`)."""
        return {}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, attribute in self.saelens_tensors.items():
            value = tensors[key]
            getattr(self, attribute).copy_(value.T if key in ("W_enc", "W_dec") else value)

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> SparseAutoencoder:
        """The SAE of a SAELens folder, taking raw activations (input_scale 1: the export folded it in)."""
        sae = cls(d_in=int(cfg["d_in"]), width=int(cfg["d_sae"]), **cls.saelens_switches(cfg))
        sae.load_saelens_tensors(tensors)
        sae.input_scale.fill_(1.0)
        return sae

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"The SAE expects activations of size d_in={self.d_in} but got {x.shape[-1]}: set the SAE's "
                f"d_in to the hookpoint's size (or leave it unset to take it from the data)."
            )


class LinearEncoderSAE(SparseAutoencoder):
    """Architectures with one affine encoder, π = W_enc (x − b_dec) + b_enc, W_enc = W_decᵀ at init."""

    saelens_tensors = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}

    def __init__(self, d_in: int, width: int, unit_norm_decoder: bool = False) -> None:
        super().__init__(d_in, width, unit_norm_decoder)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(width))

    def pre_activation(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return centered_projection(x, self.encoder_center(), self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_activation(x))

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError
