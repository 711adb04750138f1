"""Register SA-GSAE ("sagsae") and AbsTopK ("abstopk") with SAELens, so that `SAE.load_from_disk` reads our
exports of them too, and their split-sign forms ("sagsae_split", "abstopk_split": `sagsae export --split_signs`,
an unsigned SAE of twice the width whose codes are all ≥ 0). Importing this module registers them (it needs
`sae-lens`: `pip install sagsae[saelens]`).

    import sagsae.formats.saelens  # noqa: F401
    from sae_lens import SAE
    sae = SAE.load_from_disk("exported/")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import Tensor, nn

from sagsae.saes.sa_gsae import signed_magnitude_path
from sagsae.saes.sparse_codes import dense_codes, row_top_pairs
from sagsae.saes.straight_through import open_gate


class _SaeLensDecoder:
    """SAELens's decode: W_dec f + b_dec with its hooks, output normalization and reshaping."""

    def decode(self, feature_acts: Tensor) -> Tensor:
        out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)


@dataclass
class SAGSAEConfig(SAEConfig):
    sign_consistency: bool = True
    one_sided_gate: bool = False
    signed_magnitude: bool = True
    gate_path: str = "jump"

    @classmethod
    def architecture(cls) -> str:
        return "sagsae"


class SAGSAESaeLens(_SaeLensDecoder, SAE[SAGSAEConfig]):
    """Inference-only SA-GSAE in SAELens: the same equations as `sagsae.saes.sa_gsae` (docs/method.md, "Forward")."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        for name in ("b_gate", "b_mag", "r_pos", "r_neg", "threshold_pos", "threshold_neg"):
            setattr(self, name, nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)))

    def pre_and_codes(self, x: Tensor, hook_pre: Callable[[Tensor], Tensor] = lambda pi: pi) -> tuple[Tensor, Tensor]:
        """(π, signed codes), with `hook_pre` applied to π before the gate reads it."""
        u = self.process_sae_in(x) @ self.W_enc
        pi = hook_pre(u + self.b_gate)
        theta_neg = torch.full_like(self.threshold_neg, torch.inf) if self.cfg.one_sided_gate else self.threshold_neg
        gate = open_gate(pi, self.threshold_pos, theta_neg)
        if not self.cfg.signed_magnitude:
            return pi, torch.where(gate, pi, 0)
        magnitude = signed_magnitude_path(u, pi, self.r_pos, self.r_neg, self.b_mag, self.cfg.sign_consistency)
        return pi, torch.where(gate, magnitude, 0)

    def encode(self, x: Tensor) -> Tensor:
        return self.hook_sae_acts_post(self.pre_and_codes(x, self.hook_sae_acts_pre)[1])


@dataclass
class AbsTopKConfig(SAEConfig):
    k: int = 32

    @classmethod
    def architecture(cls) -> str:
        return "abstopk"


class AbsTopKSaeLens(_SaeLensDecoder, SAE[AbsTopKConfig]):
    """Inference-only AbsTopK in SAELens: the k pre-activations of largest |π|, with their signs."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def pre_and_codes(self, x: Tensor, hook_pre: Callable[[Tensor], Tensor] = lambda pre: pre) -> tuple[Tensor, Tensor]:
        pre = hook_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        rows, cols = row_top_pairs(pre.abs(), self.cfg.k)
        return pre, dense_codes(pre[rows, cols], rows, cols, pre)

    def encode(self, x: Tensor) -> Tensor:
        return self.hook_sae_acts_post(self.pre_and_codes(x, self.hook_sae_acts_pre)[1])


class _SplitSigns:
    """A signed SAE as an unsigned one of d_sae = 2H latents: latent i's positive part is latent i, its negative
    part latent H + i (both ≥ 0), and W_dec's rows are W and −W, so decode is SAELens's own and reconstructs
    exactly as the signed SAE. The encoder keeps the signed SAE's H-wide parameters."""

    half_width: tuple[str, ...] = ()  # the signed architecture's per-latent parameters

    def initialize_weights(self) -> None:
        super().initialize_weights()
        half = self.cfg.d_sae // 2
        self.W_enc = nn.Parameter(torch.zeros(self.cfg.d_in, half, dtype=self.dtype, device=self.device))
        for name in self.half_width:
            setattr(self, name, nn.Parameter(torch.zeros(half, dtype=self.dtype, device=self.device)))

    def encode(self, x: Tensor) -> Tensor:
        pre, codes = self.pre_and_codes(x)
        self.hook_sae_acts_pre(torch.cat([pre, -pre], dim=-1))
        return self.hook_sae_acts_post(torch.cat([codes.clamp(min=0), (-codes).clamp(min=0)], dim=-1))


@dataclass
class SAGSAESplitConfig(SAGSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "sagsae_split"


class SAGSAESplitSaeLens(_SplitSigns, SAGSAESaeLens):
    half_width = ("b_gate", "b_mag", "r_pos", "r_neg", "threshold_pos", "threshold_neg")


@dataclass
class AbsTopKSplitConfig(AbsTopKConfig):
    @classmethod
    def architecture(cls) -> str:
        return "abstopk_split"


class AbsTopKSplitSaeLens(_SplitSigns, AbsTopKSaeLens):
    half_width = ("b_enc",)


for _name, _classes in {"sagsae": (SAGSAESaeLens, SAGSAEConfig), "abstopk": (AbsTopKSaeLens, AbsTopKConfig),
                        "sagsae_split": (SAGSAESplitSaeLens, SAGSAESplitConfig),
                        "abstopk_split": (AbsTopKSplitSaeLens, AbsTopKSplitConfig)}.items():
    if _name not in SAE_CLASS_REGISTRY:
        register_sae_class(_name, *_classes)
