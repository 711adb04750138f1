"""SA-GSAE as a LightningModule: the architecture's switches (SPEC §2–3) on top of the shared loop."""

from __future__ import annotations

from lightning_modules.base import SAEModule
from sagsae.saes.sa_gsae import GatePath


class SAGSAE(SAEModule):
    """Sign-Aware Gated SAE. Defaults: tied r± and θ±, jump gate path, sign consistency, aux weight 1.

    Args:
        tie_r: one magnitude rescale r for both polarities (the paper's default).
        tie_theta: one threshold θ for both polarities.
        sign_consistency: a code never fires against its gate's polarity.
        aux_weight: α_aux of the gate-path reconstruction (0 = the `aux: false` ablation).
        gate_path: "jump" (BiJump_θ(π)) or "soft" (two-sided soft threshold) for the sparsity/aux terms.
        recon_trains_theta: let the main reconstruction reach θ through the pseudo-derivative.
        log_theta: store log θ instead of θ.
        theta_init: initial θ; None = 1e-3·√d.
        bandwidth: ε of the rectangle kernel; None = 1e-3·√d.
        theta_init_quantile: start each θ at this quantile of its |π| on the first batch (None = theta_init).
        one_sided_gate: ablation — gate H(π − θ) and codes ≥ 0 (a Gated SAE with a learned jump threshold).
        signed_magnitude: false = ablation — the code is the gate path's BiJump_θ(π) (shrunk by the penalty).
        unit_norm_decoder: SPEC §3 form (a) instead of the default form (b).
        **kwargs: the shared training arguments of `SAEModule` (width, λ, LR, …).
    """

    architecture = "sagsae"
    architecture_args = ("tie_r", "tie_theta", "sign_consistency", "aux_weight", "gate_path", "recon_trains_theta",
                         "log_theta", "theta_init", "bandwidth", "theta_init_quantile", "one_sided_gate",
                         "signed_magnitude", "unit_norm_decoder")

    def __init__(
        self,
        tie_r: bool = True,
        tie_theta: bool = True,
        sign_consistency: bool = True,
        aux_weight: float = 1.0,
        gate_path: GatePath = "jump",
        recon_trains_theta: bool = False,
        log_theta: bool = False,
        theta_init: float | None = None,
        bandwidth: float | None = None,
        theta_init_quantile: float | None = None,
        one_sided_gate: bool = False,
        signed_magnitude: bool = True,
        unit_norm_decoder: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
