"""JumpReLU SAE (arXiv 2407.14435) on the shared loop."""

from __future__ import annotations

from lightning_modules.base import SAEModule


class JumpReLUSAE(SAEModule):
    """Args:
        theta_init: initial threshold; None = 1e-3·√d.
        bandwidth: ε of the rectangle kernel; None = 1e-3·√d.
        theta_init_quantile: start each θ at this quantile of its pre-activation on the first batch
            (None = theta_init).
        **kwargs: the shared training arguments of `SAEModule` (λ is the L0 coefficient, warmed up linearly).
    """

    architecture = "jumprelu"
    architecture_args = ("theta_init", "bandwidth", "theta_init_quantile")

    def __init__(self, theta_init: float | None = None, bandwidth: float | None = None,
                 theta_init_quantile: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
