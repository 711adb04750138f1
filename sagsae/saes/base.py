"""Shared machinery of every SAE architecture: the registry, the loss record and the torch-only interface.

Each architecture is one file in this package that subclasses `SparseAutoencoder` and registers itself by
name. Nothing here imports Lightning, so a trained SAE loads and runs with torch alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(name: str):
    """Class decorator: make an architecture constructible by name (`build_sae(name, ...)`)."""

    def decorate(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        cls.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return decorate


def build_sae(architecture: str, **kwargs) -> SparseAutoencoder:
    if architecture not in SAE_REGISTRY:
        raise ValueError(f"Unknown SAE architecture {architecture!r}; known: {sorted(SAE_REGISTRY)}")
    return SAE_REGISTRY[architecture](**kwargs)


@dataclass
class SAELoss:
    """One training step's loss, its terms (already weighted as summed) and what the metrics need."""

    total: Tensor
    terms: dict[str, Tensor]
    codes: Tensor
    reconstruction: Tensor
    gate_reconstruction: Tensor | None = None  # the auxiliary (gate-path) reconstruction, where there is one
    extras: dict[str, Tensor] = field(default_factory=dict)


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖² summed over d, averaged over the batch (SPEC §3)."""
    return (x - x_hat).pow(2).sum(-1).mean()


class SparseAutoencoder(nn.Module):
    """Interface: `encode` → codes [B, H], `decode` → x̂ [B, d], `loss` → SAELoss for training.

    `input_scale` is the scalar that maps raw activations to E‖x‖² = d (SPEC §5); it is stored with the SAE
    and applied by `normalize`, so that exports can fold it into the weights.
    """

    architecture: str = ""

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        if d_in <= 0 or width <= 0:
            raise ValueError(f"d_in and width must be positive, got d_in={d_in}, width={width}")
        self.d_in = d_in
        self.width = width
        self.register_buffer("input_scale", torch.tensor(1.0))

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: Tensor, sparsity_coefficient: float) -> SAELoss:
        raise NotImplementedError

    @torch.no_grad()
    def initialize_from_batch(self, x: Tensor) -> None:
        """Data-dependent initialization on the first (normalized) batch; default: nothing."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Projections that keep parameters valid after each step (threshold floors, unit norms)."""

    @torch.no_grad()
    def reset_dead(self, dead: Tensor) -> None:
        """React to latents that have not fired for a whole window (`dead` is a bool mask [H])."""

    def normalize(self, raw: Tensor) -> Tensor:
        return raw * self.input_scale

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"The SAE expects activations of size d_in={self.d_in} but got {x.shape[-1]}: set the SAE's "
                f"d_in to the hookpoint's size (or leave it unset to take it from the data)."
            )
