"""The target-L0 controller: steers λ so that training settles at an L0 the user asks for (docs/method.md,
"Asking for an L0"). Torch alone: it is tested against model plants without an SAE or Lightning."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sagsae.training.schedules import linear_warmup

FAST_AVERAGE_STEPS = 20  # L̄0, the error's L0: an EMA that smooths one batch's sampling noise
SLOW_AVERAGE_STEPS = 100  # a slower EMA; it lags L̄0 by TREND_STEPS, so their log ratio is L0's trend
TREND_STEPS = SLOW_AVERAGE_STEPS - FAST_AVERAGE_STEPS
LOOKAHEAD_STEPS = 200  # L0 "closes" when its trend reaches the target within this: Adam moves weights at bounded speed
MAX_ERROR = 1.0  # |log(L̄0 / target)| is clipped here: a far-off L0 moves log λ at most `rate` a step
BAND = 0.1  # "near the target" is within ±10% in log; the drift learns from the error clipped to it
STALL_TREND = 0.01  # an 80-step trend under 1% is a stall: the drift learns then too, wherever L0 is
SETTLING_STEPS = 1000  # the drift never learns while L0's trend reaches the target within this (a weak steady answer)
DRIFT_STEPS = 500  # the drift sums the integral steps over about this many steps (a slow second integrator)
MIN_L0 = 1e-3  # L0's floor inside the logarithm (an all-silent batch)
SCALE_BOUNDS = (1e-4, 1e4)  # λ stays within these multiples of its warmed-up value
CHECK_STEPS = 2000  # every this many steps, one host read asks whether L0 still answers λ
SHRINK = 0.5  # ... it does if the error outside the band shrank to this share of the window's start, or below


class TargetL0Controller(nn.Module):
    """A controller on log λ with an integral term, a learned ramp (the drift) and anti-windup.

    Each step, with e = log(L̄0 / target) clipped to ±MAX_ERROR:
    - the integral term adds `rate`·e to log λ, unless L0's trend already reaches the target within
      LOOKAHEAD_STEPS (then the SAE is catching up, and a growing sum would overshoot: anti-windup);
    - the drift, added every step, learns `rate`·clip(e, ±BAND)/DRIFT_STEPS while L0 is near the target or
      stalled, unless L0's trend reaches the target within SETTLING_STEPS (a weak plant's slow, steady answer).
      An SAE that learns gives sparser codes at a fixed λ, so λ must keep falling to hold an L0; the drift
      takes over that ramp, which an integral term alone follows with a standing error;
    - λ's scale stays within SCALE_BOUNDS and the drift within ±`rate`. At a bound neither pushes further out.

    During λ's warmup (`warmup_steps`), the ramp advances while L̄0 heads above the target within
    LOOKAHEAD_STEPS, climbing its own step from wherever λ stands; otherwise λ holds, and below the target
    the integral term acts, without the drift.

    Guarantees: λ stays bounded whatever L0 does. Where L0 answers λ, monotonically and within a few hundred
    steps, L0 settles at the target, following ramps of log λ up to 0.07% a step (tests/test_controller.py). Where it
    does not (λ at a bound, or an error outside ±BAND that has not halved over CHECK_STEPS), `check` says so
    once, with the step.
    """

    def __init__(self, target: float, rate: float = 0.003, warmup_steps: int = 0) -> None:
        super().__init__()
        if not (target > 0 and math.isfinite(target)):
            raise ValueError(f"target_l0 must be a positive number of latents per token, got {target}")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"target_l0_rate must be a positive number, got {rate}")
        self.target, self.rate, self.warmup_steps = float(target), float(rate), int(warmup_steps)
        self.register_buffer("scale", torch.tensor(1.0))  # λ's factor on its warmed-up value
        self.register_buffer("drift", torch.tensor(0.0))  # the learned ramp of log λ per step
        self.register_buffer("fast_average", torch.tensor(0.0))  # L̄0 (0: no step yet)
        self.register_buffer("slow_average", torch.tensor(0.0))
        self.register_buffer("window_error", torch.tensor(-1.0))  # |e| when the check window began (-1: none yet)
        self.register_buffer("unresponsive_step", torch.tensor(-1, dtype=torch.long))  # when it was found (-1: never)

    def update(self, l0: Tensor, step: int) -> None:
        """One step: `l0` is the step's training L0 over every rank, `step` the steps trained before it."""
        for average, steps in ((self.fast_average, FAST_AVERAGE_STEPS), (self.slow_average, SLOW_AVERAGE_STEPS)):
            average.copy_(torch.where(average == 0, l0, average.lerp(l0, 1 / steps)))
        error = self.error()
        heading = (self.fast_average.clamp(min=MIN_L0) / self.slow_average.clamp(min=MIN_L0)).log()
        projected = error + heading * (LOOKAHEAD_STEPS / TREND_STEPS)
        closing = projected * error.sign() <= 0
        log_step = torch.where(closing, 0.0, self.rate * error)
        if step < self.warmup_steps:
            ramp, next_ramp = linear_warmup(step, self.warmup_steps), linear_warmup(step + 1, self.warmup_steps)
            hold = math.log(ramp / next_ramp)  # cancels the ramp's growth
            climb = ((ramp + (next_ramp - ramp) / self.scale) / next_ramp).log()  # the ramp's own step, from here
            log_step = torch.where(projected > 0, climb, hold + torch.where(error <= 0, log_step, 0.0))
        else:
            settling = (error + heading * (SETTLING_STEPS / TREND_STEPS)) * error.sign() <= 0
            learning = ((error.abs() < BAND) | (heading.abs() < STALL_TREND)) & ~settling
            drift_step = self.rate * error.clamp(-BAND, BAND) / DRIFT_STEPS
            self.drift.add_(torch.where(learning, drift_step, 0.0)).clamp_(-self.rate, self.rate)
            log_step = log_step + self.drift
        self._move(log_step)

    def _move(self, log_step: Tensor) -> None:
        """Scale λ by exp(log_step) within SCALE_BOUNDS; at a bound the drift stops pushing outward."""
        low, high = (math.log(bound) for bound in SCALE_BOUNDS)
        log_scale = (self.scale.log() + log_step).clamp(low, high)
        outward = ((log_scale >= high) & (self.drift > 0)) | ((log_scale <= low) & (self.drift < 0))
        self.drift.masked_fill_(outward, 0.0)
        self.scale.copy_(log_scale.exp())

    def error(self) -> Tensor:
        """e = log(L̄0 / target), clipped to ±MAX_ERROR."""
        return (self.fast_average.clamp(min=MIN_L0) / self.target).log().clamp(-MAX_ERROR, MAX_ERROR)

    def at_bound(self) -> Tensor:
        low, high = SCALE_BOUNDS
        return (self.scale <= low * (1 + 1e-6)) | (self.scale >= high * (1 - 1e-6))

    def check(self, step: int) -> str | None:
        """Every CHECK_STEPS steps after the warmup (one host read): a message, once, when L0 has stopped
        answering λ (λ at a bound, or an error outside ±BAND that did not shrink to SHRINK of the window's start);
        None otherwise. `step` counts the steps trained."""
        if step <= self.warmup_steps or (step - self.warmup_steps) % CHECK_STEPS or int(self.unresponsive_step) >= 0:
            return None
        error, start = float(self.error().abs()), float(self.window_error)
        stalled = error >= BAND and start >= 0 and error > SHRINK * start  # the first window sets `start`
        self.window_error.fill_(error)
        if not (stalled or bool(self.at_bound())):
            return None
        self.unresponsive_step.fill_(step)
        where = "at its bound" if bool(self.at_bound()) else "moving"
        return (f"Step {step}: L0 does not answer λ (training L0 {float(self.fast_average):.4g} against the target "
                f"{self.target:g}, λ's scale {float(self.scale):.3g} {where}). Try a lower or higher "
                f"model.sparsity_coefficient to start nearer, a larger model.target_l0_rate, or a target this SAE "
                f"can reach (docs/method.md, \"Asking for an L0\").")
