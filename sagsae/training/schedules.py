"""The warmups and decay that training applies to λ and the learning rate."""

from __future__ import annotations


def linear_warmup(step: int, warmup_steps: int) -> float:
    """The share of a warmed-up quantity (λ, the learning rate) at 0-based `step`: (step + 1) / warmup_steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def learning_rate_factor(step: int, warmup_steps: int, decay_fraction: float, max_steps: int) -> float:
    """Linear warmup, then constant, then (with `decay_fraction` > 0) linear decay to 0 at `max_steps`."""
    factor = linear_warmup(step, warmup_steps)
    decay_steps = int(decay_fraction * max_steps)
    if decay_steps > 0:
        factor = min(factor, max(0.0, (max_steps - step) / decay_steps))
    return factor
