"""Register SA-GSAE ("sagsae") and AbsTopK ("abstopk") with SAELens, so that `SAE.load_from_disk` reads our
exports of them too. Importing this module registers both (it needs `sae-lens`: `pip install sagsae[saelens]`).

    import sagsae.saelens  # noqa: F401
    from sae_lens import SAE
    sae = SAE.load_from_disk("exported/")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import Tensor, nn

from sagsae.saes.sa_gsae import signed_magnitude_path
from sagsae.saes.topk import keep_top
from sagsae.straight_through import open_gate


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
    """Inference-only SA-GSAE in SAELens: the same equations as `sagsae.saes.sa_gsae` (SPEC §2)."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        for name in ("b_gate", "b_mag", "r_pos", "r_neg", "threshold_pos", "threshold_neg"):
            setattr(self, name, nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)))

    def encode(self, x: Tensor) -> Tensor:
        u = self.process_sae_in(x) @ self.W_enc
        pi = self.hook_sae_acts_pre(u + self.b_gate)
        theta_neg = torch.full_like(self.threshold_neg, torch.inf) if self.cfg.one_sided_gate else self.threshold_neg
        gate = open_gate(pi, self.threshold_pos, theta_neg)
        if not self.cfg.signed_magnitude:
            return self.hook_sae_acts_post(torch.where(gate, pi, 0))
        magnitude = signed_magnitude_path(u, pi, self.r_pos, self.r_neg, self.b_mag, self.cfg.sign_consistency)
        return self.hook_sae_acts_post(torch.where(gate, magnitude, 0))


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

    def encode(self, x: Tensor) -> Tensor:
        pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(keep_top(pre, pre.abs(), self.cfg.k))


for _name, _classes in {"sagsae": (SAGSAESaeLens, SAGSAEConfig), "abstopk": (AbsTopKSaeLens, AbsTopKConfig)}.items():
    if _name not in SAE_CLASS_REGISTRY:
        register_sae_class(_name, *_classes)
