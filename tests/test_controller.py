"""The target-L0 controller (sagsae/training/controller.py) against model plants, without an SAE or Lightning: what it
guarantees (docs/method.md, "Asking for an L0"), asserted over the last third of each run, and one real
skip-transcoder steered by a TrainingState alone."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from sagsae.training import TargetL0Controller, TrainingPlan
from sagsae.training.controller import CHECK_STEPS, SCALE_BOUNDS
from sagsae.training.schedules import linear_warmup

pytestmark = pytest.mark.slow(57)  # seconds in all: the longest files run first (tests/conftest.py)

Plant = Callable[[int, list[float]], float]  # (step, every λ so far) → the L0 that the controller reads


def steer(plant: Plant, target: float, steps: int, coefficient: float = 1.0, warmup: int = 0
          ) -> tuple[list[tuple[float, float]], TargetL0Controller, list[str]]:
    """The controller against `plant`: [(L0 read, λ)] of every step, the controller, and its messages."""
    controller = TargetL0Controller(target, warmup_steps=warmup)
    lambdas, trace, messages = [], [], []
    for step in range(steps):
        lambdas.append(coefficient * linear_warmup(step, warmup) * float(controller.scale))
        l0 = plant(step, lambdas)
        controller.update(torch.tensor(l0), step)
        message = controller.check(step + 1)
        messages += [message] if message else []
        trace.append((l0, lambdas[-1]))
    return trace, controller, messages


def lagging_plant(l0_at_one: float, power: float = 1.0, delay: int = 0, noise: float = 0.0, ramp: float = 0.0,
                  follow_steps: int = 50) -> Plant:
    """An SAE whose L0 heads for l0_at_one · e^(−ramp·t) · λ^(−power) within ~`follow_steps` steps, answering the λ
    of `delay` steps ago; the controller reads it with ±`noise` uniform relative noise (a batch's sampling)."""
    state = {"l0": None}
    generator = random.Random(0)

    def plant(step: int, lambdas: list[float]) -> float:
        lam = lambdas[max(0, len(lambdas) - 1 - delay)]
        goal = l0_at_one * math.exp(-ramp * step) * lam ** -power
        state["l0"] = goal if state["l0"] is None else state["l0"] + (goal - state["l0"]) / follow_steps
        return state["l0"] * (1 + noise * (2 * generator.random() - 1))

    return plant


PLANTS = {  # keyword arguments of lagging_plant besides where it starts
    "inverse": {},  # L0 ∝ 1/λ
    "weak": {"power": 0.2},  # L0 ∝ λ^−0.2: λ must move 5× as far in log
    "delayed": {"delay": 200},  # answers λ 200 steps late
    "noisy": {"noise": 0.1},  # ±10% a step
    "slow ramp": {"ramp": 0.00016},  # sparser codes at a fixed λ as the SAE learns: the full default run's ramp
    "fast ramp": {"ramp": 0.0007},  # the SA-GSAE(H)+skip transcoder's ramp at target 80
}


@pytest.mark.parametrize("start", [2.0, 0.5])
@pytest.mark.parametrize("target", [10.0, 200.0])
@pytest.mark.parametrize("plant", list(PLANTS))
def test_l0_settles_within_five_percent_of_its_target(plant, target, start):
    """From an L0 at `start` × the target at the first λ, every plant that answers λ holds L0 within ±5% of the
    target over the last third of 6,000 steps, with no word that L0 does not answer."""
    trace, controller, messages = steer(lagging_plant(start * target, **PLANTS[plant]), target, steps=6000)
    worst = max(abs(l0 / target - 1) for l0, _ in trace[4000:])
    assert worst < 0.05 + PLANTS[plant].get("noise", 0.0), worst  # the noise is in the L0 read, not the SAE
    assert not messages, messages


def test_the_learned_drift_takes_over_a_ramp():
    """Against a ramp of 0.07% a step, the drift ends equal to the ramp, so the integral term holds no standing error
    (it alone would hold log(L0 / target) at −ramp / rate = −0.23)."""
    _, controller, _ = steer(lagging_plant(20.0, ramp=0.0007), 10.0, steps=6000)
    assert float(controller.drift) == pytest.approx(-0.0007, rel=0.05)


def test_an_unresponsive_l0_is_reported_once_with_lambda_bounded():
    """An L0 stuck at twice its target, whatever λ: λ rises to its bound and stays there (finite), the drift stays
    within ±rate, and the controller says so once, at a check step, naming the step."""
    trace, controller, messages = steer(lambda step, lambdas: 20.0, 10.0, steps=3 * CHECK_STEPS + 100)
    assert len(messages) == 1 and "does not answer λ" in messages[0]
    step = int(controller.unresponsive_step)
    assert step % CHECK_STEPS == 0 and f"Step {step}" in messages[0]
    assert all(math.isfinite(lam) and SCALE_BOUNDS[0] * 0.999 <= lam <= SCALE_BOUNDS[1] * 1.001 for _, lam in trace)
    assert abs(float(controller.drift)) <= controller.rate
    assert max(lam for _, lam in trace) == pytest.approx(SCALE_BOUNDS[1], rel=1e-3)


def test_a_stall_below_the_target_reports_without_reaching_a_bound():
    """An L0 that answers λ only down to 1.4 × its target: the error stays outside the band, so the second check
    reports it, while λ is still inside its bounds."""
    trace, controller, messages = steer(lambda step, lambdas: max(14.0, 20.0 / lambdas[-1]), 10.0,
                                        steps=2 * CHECK_STEPS)
    assert len(messages) == 1 and "moving" in messages[0]
    assert SCALE_BOUNDS[0] < float(controller.scale) < SCALE_BOUNDS[1]


def test_the_sae_slow_to_follow_still_lands_without_winding_up():
    """An SAE that lowers its L0 by at most 0.1% a step whatever λ (Adam's bounded speed): from 40 to the target 10
    takes it ~1,400 steps. λ overshoots the 4 that holds L0 at 10 by a bounded factor, and L0 ends at the target."""
    def slow(step: int, lambdas: list[float], l0=[40.0]) -> float:
        l0[0] = max(l0[0] * 0.999, min(l0[0] * 1.001, 40 / lambdas[-1]))
        return l0[0]

    trace, _, _ = steer(slow, 10.0, steps=4000)
    assert max(lam for _, lam in trace) < 4 * 4.0, max(lam for _, lam in trace)
    assert all(abs(l0 / 10.0 - 1) < 0.05 for l0, _ in trace[2700:])


def following(at_most: float) -> Plant:
    """An SAE whose L0 follows 40/λ, by at most `at_most` of itself a step."""
    def plant(step: int, lambdas: list[float], l0=[None]) -> float:
        l0[0] = 40 / lambdas[-1] if l0[0] is None else max(l0[0] * (1 - at_most), min(l0[0] * (1 + at_most),
                                                                                      40 / lambdas[-1]))
        return l0[0]
    return plant


def test_the_warmup_stops_where_l0_heads_for_the_target():
    """λ warms up to 16 over 200 steps (L0 2.5 there) against a target of 10 (λ 4): a ramp that went on would take L0
    to 2.5; the warmup stops within 1.5× of λ = 4, L0 stays above 0.75 of the target and ends at it."""
    start = following(0.02)
    trace, _, _ = steer(lambda step, lambdas: start(step, lambdas[:1] if step == 0 else lambdas), 10.0, steps=3000,
                        coefficient=16.0, warmup=200)
    assert max(lam for _, lam in trace) < 1.5 * 4.0, max(lam for _, lam in trace)
    assert min(l0 for l0, _ in trace[1:]) > 0.75 * 10.0
    assert all(abs(l0 / 10.0 - 1) < 0.05 for l0, _ in trace[2000:])


def test_a_target_above_the_starting_l0_is_approached_without_overshoot():
    """L0 starts at half the target and follows 40/λ by at most 2% a step; λ warms up to 8 over 50 steps (the
    target 10 needs 4). The warmup climbs once L0 heads past the target, so L0 peaks below 1.5× the target and
    stays within 5% of it from step 600 on."""
    def lagging(step: int, lambdas: list[float], l0=[5.0]) -> float:
        l0[0] = max(l0[0] * 0.98, min(l0[0] * 1.02, 40 / lambdas[-1]))
        return l0[0]

    trace, _, _ = steer(lagging, 10.0, steps=3000, coefficient=8.0, warmup=50)
    assert max(l0 for l0, _ in trace) < 1.5 * 10.0, max(l0 for l0, _ in trace)
    assert all(abs(l0 / 10.0 - 1) < 0.05 for l0, _ in trace[600:])


def test_a_restored_controller_continues_exactly():
    """Its state travels in checkpoints: a copy restored mid-run takes the same steps as the original."""
    plant = lagging_plant(20.0, ramp=0.0007)
    original = TargetL0Controller(10.0)
    lambdas = []
    for step in range(700):
        lambdas.append(float(original.scale))
        original.update(torch.tensor(plant(step, lambdas)), step)
    restored = TargetL0Controller(10.0)
    restored.load_state_dict(original.state_dict())
    for step in range(700, 900):
        l0 = torch.tensor(plant(step, lambdas + [float(original.scale)]))
        original.update(l0, step)
        restored.update(l0, step)
        assert torch.equal(original.scale, restored.scale) and torch.equal(original.drift, restored.drift)


def test_a_skip_transcoder_lands_on_its_target_under_a_training_state_alone():
    """A real skip-transcoder (Gated, whose codes share the target with a linear skip) on a nonlinear map, trained by
    a TrainingState and a plain Adam loop. Its L0 answers λ weakly and late: it overshoots to ~0.8 of the target
    while λ holds, and comes back over thousands of steps. Held-out L0 stays within ±5% of the target at every
    check of the last third of 4,500 steps."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(40_000, 16, generator=generator)
    mixing = torch.randn(16, 16, generator=generator) / 4
    target = source @ mixing + torch.relu(source @ torch.randn(16, 64, generator=generator)) @ torch.randn(
        64, 16, generator=generator) / 8
    pairs = torch.stack([source, target], 1)
    plan = TrainingPlan.from_arguments("gated", width=64, sparsity_coefficient=1.0, sparsity_warmup_steps=50,
                                       lr=3e-3, lr_warmup_steps=10, target_l0=6.0, skip_connection=True, init_seed=0)
    state = plan.build(16, transcoder=True)
    state.sae.set_scales([1.0, 1.0])
    optimizer = torch.optim.Adam(state.optimizer_groups())
    train, held_out = pairs[:36_000], pairs[36_000:]
    steps, batch, held_out_l0 = 4500, 256, []
    for step in range(steps):
        rows = train[torch.randint(0, len(train), (batch,), generator=generator)]
        if not state.data_initialized():
            state.initialize(rows)
        result = state.evaluate_batch(rows, train=True)
        result["loss"].backward()
        state.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        state.record_step(result["firing"], batch, result["loss"].detach())
        state.after_optimizer_step()
        if (step + 1) % 250 == 0 and step + 1 >= 3000:
            with torch.no_grad():
                held_out_l0.append(float((state.evaluate_batch(held_out)["codes"] != 0).sum(1).float().mean()))
    assert max(abs(l0 / 6.0 - 1) for l0 in held_out_l0) < 0.05, held_out_l0
    assert state.controller.unresponsive_step == -1
