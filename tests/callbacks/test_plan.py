"""The planned cadence (fake clock) and the automatic probe size."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest

from lightning_landscape.callbacks import HessianEigenvalues, Sharpness
from lightning_landscape.callbacks.cadence import Cadence
from lightning_landscape.callbacks.plan import (
    EARLY_FRACTION,
    affordable_points,
    budget_seconds,
    planned_steps,
)
from lightning_landscape.callbacks.probing import Calibration, choose_size

from .helpers import Net, RecordingLogger, loader, trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("points, total", [(15, 1000), (31, 20000), (5, 40), (50, 60)])
def test_planned_steps_are_distinct_dense_early_and_end_at_the_end(points, total):
    steps = planned_steps(points, total)
    assert steps[0] == 0 and steps[-1] == total
    assert steps == sorted(set(steps)) and len(steps) == min(points, total) + 1
    early = [s for s in steps[1:] if s <= EARLY_FRACTION * total]
    room = math.floor(EARLY_FRACTION * total)  # distinct steps the early part has
    assert len(early) >= min(math.ceil(points / 2), room) - 1  # half of them early


def simulate(
    f: float, total: int, step_time: float, cold: float, warm: float
) -> tuple[list[int], float, Cadence]:
    """Drive a planned cadence through a run; return measured steps and the final share."""
    clock = FakeClock()
    c = Cadence(max_overhead=f, clock=clock)
    c.start(0, total_steps=total)
    measured = [0]
    clock.now += cold
    c.record(cold)
    c.next_check = c.replan(0)
    for step in range(1, total + 1):
        clock.now += step_time
        if c.is_check(step):
            due, c.next_check = c.decide(step, busy=c.spent)
            if due:
                measured.append(step)
                clock.now += warm
                c.record(warm)
                c.next_check = c.replan(step)
    return measured, c.spent / clock.now, c


@pytest.mark.parametrize(
    "f, total, step_time, cold, warm",
    [
        (0.025, 1000, 0.01, 0.05, 0.01),  # quickstart-like
        (0.025, 20000, 0.004, 0.6, 0.05),  # an expensive cold first point
        (0.05, 1000, 0.2, 2.0, 0.5),  # a ResNet-like step
        (0.025, 300, 0.01, 0.05, 0.001),  # cheap: nearly every step
        (0.025, 1000, 0.01, 0.5, 0.02),  # the cold point alone eats the budget: one point
    ],
)
def test_plan_holds_the_budget_within_one_point(f, total, step_time, cold, warm):
    measured, share, c = simulate(f, total, step_time, cold, warm)
    want = min(
        affordable_points(
            f, total_steps=total, step_time=step_time, first_cost=cold, warm_cost=warm
        ),
        total + 1,
    )
    assert abs(len(measured) - want) <= 1, (len(measured), want)
    # the share of the run spent measuring stays at f (one point's worth of slack)
    budget = budget_seconds(f, total, step_time)
    assert c.spent <= max(budget, cold) + warm + 1e-9
    if len(measured) > 2:
        assert measured[1] <= EARLY_FRACTION * total  # the second point comes early
        assert measured[-1] >= 0.9 * total  # and the points reach the end


def test_a_costly_cold_point_does_not_push_the_second_past_the_run():
    """The old budget put the second point at cold/f: here past the end of the run."""
    measured, _, _ = simulate(0.025, 10800, 0.004, 0.5, 0.03)
    assert len(measured) >= 16 and measured[1] < 0.01 * 10800


def test_plan_resumes(tmp_path):
    """A checkpointed plan continues: the steps after a resume are those of the full run."""
    full, _, ref = simulate(0.025, 2000, 0.01, 1.0, 0.05)
    clock = FakeClock()
    c = Cadence(max_overhead=0.025, clock=clock)
    state = None
    # replay the first half with the same clock, then restart from the state at step 1000
    c.start(0, total_steps=2000)
    clock.now += 1.0
    c.record(1.0)
    c.next_check = c.replan(0)
    for step in range(1, 1001):
        clock.now += 0.01
        if c.is_check(step):
            due, c.next_check = c.decide(step, busy=c.spent)
            if due:
                clock.now += 0.05
                c.record(0.05)
                c.next_check = c.replan(step)
    state = c.state_dict()
    d = Cadence(max_overhead=0.025, clock=clock)
    d.load_state_dict(state)
    d.start(1000, total_steps=2000)
    d.run_spent = state["run_spent"]
    after = []
    for step in range(1001, 2001):
        clock.now += 0.01
        if d.is_check(step):
            due, d.next_check = d.decide(step, busy=0.0)
            if due:
                after.append(step)
                clock.now += 0.05
                d.record(0.05)
                d.next_check = d.replan(step)
    late = [s for s in full if s > 1000]
    assert abs(len(after) - len(late)) <= 1


class _FakeCb:
    def __init__(self, f: float, total: int | None, products=(20.0, 8.0), min_points=16):
        self.cadence = Cadence(max_overhead=f, min_points=min_points)
        self.cadence.total_steps = total
        self._products = products

    def expected_products(self):
        return self._products


class _FakeTrainer:
    world_size = 1


@pytest.mark.parametrize(
    "gradient, product, total, want",
    [
        (1e-5, 1e-8, 10_000, 1024),  # products cheap against a step: the largest probe
        (1e-4, 1.5e-4, 200_000, None),  # a long run: something in between
        (1e-4, 1.5e-4, 1_000, 32),  # nothing fits: the floor (one training batch)
    ],
)
def test_auto_probe_size_fits_min_points(gradient, product, total, want):
    calib = Calibration(gradient=gradient, product=product, cold_product=2 * product)
    cb = _FakeCb(0.025, total)
    size = choose_size([cb], _FakeTrainer(), calib, available=4096, batch_size=32)  # type: ignore[list-item,arg-type]
    assert size == want if want is not None else 32 < size < 1024
    if size > 32:  # the chosen size gives min_points; twice that size would not
        step = gradient * 32
        pts = lambda n: affordable_points(  # noqa: E731
            0.025,
            total_steps=total,
            step_time=step,
            first_cost=40 * product * n,
            warm_cost=8 * product * n,
        )
        assert pts(size) >= 16 and (size == 1024 or pts(2 * size) < 16)


@pytest.mark.parametrize("max_overhead", [0.025, 0.15])
def test_defaults_give_a_curve_through_lightning(max_overhead):
    """Sharpness() + HessianEigenvalues() through Lightning: the second point (when the
    budget pays for one) comes early, and the summaries agree with what was logged. At the
    default 2.5% this tiny model's 1 s run may pay for the cold step-0 point only (it costs
    several % of the run: RESULTS §11); at 15% it gets a curve. No clock is asserted on, but
    the plan follows the real clock: another job on the machine can slow a run mid-way (CI saw
    the second point at step 246 while a second test suite ran beside it), so the fit is tried
    up to three times and must pass the checks once."""
    for attempt in range(3):
        try:
            _check_defaults_give_a_curve(max_overhead)
            return
        except AssertionError:
            if attempt == 2:
                raise


def _check_defaults_give_a_curve(max_overhead: float) -> None:
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    cbs = [Sharpness(max_overhead=max_overhead), HessianEigenvalues(max_overhead=max_overhead)]
    total = 1500
    t = trainer(cbs, logger=log, max_steps=total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), loader(96, batch_size=8))
    for cb, tag in zip(cbs, ("landscape/sharpness/lambda_max", "landscape/hessian/eig_1")):
        steps = sorted(log.series(tag))
        assert steps[0] == 0 and (len(steps) == 1 or steps[1] <= 0.1 * total), (tag, steps)
        if max_overhead > 0.1:  # (where the points fall depends on this machine's clock)
            assert len(steps) >= 4, (tag, steps)
        assert cb.plan_summary["auto"] and 8 <= cb.plan_summary["probe_size"] <= 96
        assert cb.run_summary["points"] == len(steps)
        assert cb.cadence.per_step_cost > 0  # Lightning's dispatch is charged


def test_fewer_than_min_points_warns_once_with_the_numbers():
    log = RecordingLogger()
    pl.seed_everything(0, verbose=False)
    cb = Sharpness(max_overhead=0.001)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([cb], logger=log, max_steps=60).fit(Net(), loader(96, batch_size=8))
    msgs = [str(w.message) for w in caught if "will measure ~" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "0.1% of its time" in msgs[0] and "raise `max_overhead`" in msgs[0]
