"""Which latents are dead: silent for a window of training tokens (docs/method.md, "Dead latents")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DeadLatentTracker(nn.Module):
    """Each latent's tokens since it last fired and since it was last reset, its firing frequency, and its
    revivals. Updated from firing counts already summed over ranks, so every rank holds the same state; no
    host reads, so a GPU step need not wait on it.

    A latent is dead when it has not fired in `window_tokens` training tokens. The dead fraction also counts
    latents revived by a reset within the window: a reset that makes a latent fire again hides its death but
    does not undo it."""

    def __init__(self, width: int, window_tokens: int) -> None:
        super().__init__()
        if window_tokens <= 0:
            raise ValueError(f"dead_window_tokens must be positive, got {window_tokens}")
        self.window_tokens = window_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))
        self.register_buffer("tokens_since_reset", torch.full((width,), window_tokens, dtype=torch.long))
        self.register_buffer("reset_latents", torch.tensor(0, dtype=torch.long))  # reset at the latest step
        self.register_buffer("revivals", torch.zeros(width, dtype=torch.long))  # each latent's reset events
        self.register_buffer("firing_frequency", torch.zeros(width, dtype=torch.float64))  # EMA over ~the window

    def record(self, counts: Tensor, tokens: int) -> None:
        """A step's per-latent firing counts [H] over `tokens` tokens (all ranks')."""
        self.tokens_since_fired.add_(tokens).masked_fill_(counts > 0, 0)
        self.tokens_since_reset.add_(tokens)
        self.firing_frequency.lerp_(counts.double() / tokens, min(1.0, tokens / self.window_tokens))

    def dead_mask(self) -> Tensor:
        """Latents with no non-zero code in the last `window_tokens` training tokens."""
        return self.tokens_since_fired >= self.window_tokens

    def dead_fraction(self) -> Tensor:
        """The share of latents dead in the window, counting those a reset revived within it."""
        revived = self.tokens_since_reset < self.window_tokens
        return (self.dead_mask() | revived).float().mean()

    def record_reset(self, dead: Tensor) -> None:
        """The latents in `dead` were reset this step: a new revival for each, unless it was reset within the
        window already (a latent reset every step until it fires counts once)."""
        self.reset_latents.copy_(dead.sum())
        self.revivals.add_(dead & (self.tokens_since_reset >= self.window_tokens))
        self.tokens_since_reset.masked_fill_(dead, 0)

    def diagnostics(self) -> dict[str, Tensor]:
        """How many latents a reset revived in all, and how many of those died and were revived again."""
        return {"revived_latents": (self.revivals > 0).sum().float(), "revived_again": (self.revivals > 1).sum().float()}
