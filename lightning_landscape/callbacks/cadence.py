"""When to measure: every N steps, on a schedule, or within a share of the wall time.

A time budget is the default because a fixed cadence is wrong for small and large models
alike: a λ_max on a 1024-sample probe costs a few training steps of a large model but tens of
steps of a small one. With ``max_overhead = f``:

- when the run's length is known (``total_steps``, from ``trainer.estimated_stepping_batches``)
  the budget is *planned* (:mod:`~lightning_landscape.callbacks.plan`): from the measured step
  time and the measured cost of a steady-state (warm-started) measurement — not the cold first
  one — it works out how many points fit ``f`` of the whole run and spreads them with the early
  part denser, re-planning at every measurement;
- otherwise the callback measures whenever its cumulative measurement time would stay at or
  below ``f`` of the wall time since training started (costs estimated the same way).

**The step time** is the training wall time between checks (measurements taken out), but the
first steps of a run are slow (allocator, caches, the loader's first batches: the average from
the start read 1.6–15× the steady step at step 1 and up to 2× at step 20 on the RESULTS §11
models), and an overestimate early spends a short run's budget at once. So the estimate is the
smaller of the average since the start and the rate over the latest interval between checks;
and it is not trusted before :data:`WARMUP_STEPS` steps were timed: until then the calibration's
estimate (``prior_step_time``, one probe gradient of a training batch: a low estimate) is used,
or, without one, no point is taken. The budget counts the training time that has passed as it
was and extrapolates the rest with this estimate.

**The points** follow the current plan by index: the ``p``-th point goes at the ``p``-th step of
the plan (so when the plan shrinks the next point moves later, not sooner); when the plan has
grown past steps already passed, the next point goes at the plan's next step or at the even
spacing of what is left, whichever is sooner (no burst). When nothing more fits, the decision is
looked at again every ``T / (2·min_points)`` steps (a cheap check, no measurement).

The budget decision depends on clocks, which differ between ranks; so decisions are only taken
at *check steps* agreed on by all ranks: at a check, rank 0's decision and its estimate of the
next check step are broadcast (one tiny collective per check, not per step). Between checks no
rank measures and no collective runs.

Example::

    >>> c = Cadence(every_n_steps=10)
    >>> [s for s in range(35) if c.is_check(s)]
    [0, 10, 20, 30]
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from lightning_landscape.callbacks.plan import EARLY_FRACTION, planned_steps
from lightning_landscape.checks import check_int, check_number, check_that

__all__ = ["COLD_FACTOR", "WARMUP_STEPS", "Cadence"]

#: A cold first measurement (no warm start, graphs and caches built) is taken to cost this many
#: steady-state ones until a steady-state one has been timed.
COLD_FACTOR = 2.0
#: Steps timed before the measured step time is trusted (see the module docstring).
WARMUP_STEPS = 16


class Cadence:
    """Decides at which optimizer steps a measurement runs.

    Exactly one mode is active: ``every_n_steps``, ``schedule`` (a callable ``step -> bool``),
    or the time budget ``max_overhead`` (the default).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        max_overhead: float | None = 0.025,
        min_points: int = 16,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.min_points = check_int("min_points", min_points)
        check_int("every_n_steps", every_n_steps, none=True)
        ok = schedule is None or callable(schedule)
        check_that("schedule", schedule, ok, "a callable step -> bool or None")
        if every_n_steps is not None and schedule is not None:
            raise ValueError("give at most one of `every_n_steps` and `schedule`")
        check_number("max_overhead", max_overhead, high=1.0, none=True)
        if every_n_steps is None and schedule is None and max_overhead is None:
            raise ValueError("one of `every_n_steps`, `schedule` or `max_overhead` must be set")
        self.every_n_steps = every_n_steps
        self.schedule = schedule
        self.max_overhead = None if (every_n_steps or schedule) else max_overhead
        self.clock = clock
        # budget state since the last (re)start
        self.start_time: float | None = None
        self.start_step = 0
        self.spent = 0.0
        self.last_cost = 0.0
        self.last_end: float | None = None
        self.next_check = 0
        self.train_time = 0.0  # training wall time since the (re)start, at the latest check
        self.steps_timed = 0  # the steps it covers
        self._mark: tuple[int, float] | None = None  # (step, train_time) at the latest check
        # the run's plan (checkpointed: a resumed run continues it)
        self.total_steps: int | None = None
        self.points = 0  # measurements so far in the run
        self.last_point = -1  # the step of the latest one
        self.run_spent = 0.0  # their seconds
        self.first_cost = 0.0
        self.warm_costs: list[float] = []  # the latest steady-state costs
        self.planned_points: int | None = None  # the latest plan's total (None: no plan yet)
        self.step_time: float | None = None  # the latest estimate
        #: a step time to plan with before :data:`WARMUP_STEPS` steps were timed (calibration)
        self.prior_step_time: float | None = None
        #: the calibration's estimate of a warm point's cost (places the second point only)
        self.prior_warm_cost: float | None = None
        #: seconds per training step this callback costs whether or not it measures (e.g.
        #: Lightning's dispatch of its hooks), charged against the budget
        self.per_step_cost = 0.0

    def warm_cost(self) -> float:
        """Estimated cost of a steady-state measurement (median of the latest warm ones)."""
        if self.warm_costs:
            return statistics.median(self.warm_costs)
        return self.first_cost / COLD_FACTOR if self.first_cost > 0 else self.last_cost

    @property
    def budgeted(self) -> bool:
        return self.max_overhead is not None

    @property
    def planned(self) -> bool:
        """Whether the budget is planned over a run of known length."""
        return self.budgeted and self.total_steps is not None

    def start(self, step: int, total_steps: int | None = None) -> None:
        """Training (re)starts at ``step`` of a run of ``total_steps`` (``None``: unknown)."""
        self.start_time = self.clock()
        self.start_step = step
        self.spent = 0.0
        self.last_end = None
        self.next_check = step
        self.train_time, self.steps_timed, self._mark = 0.0, 0, None
        self.total_steps = total_steps if total_steps and total_steps > step else None
        if step == 0:
            self.points, self.run_spent, self.first_cost = 0, 0.0, 0.0
            self.warm_costs, self.planned_points, self.last_point = [], None, -1
            self.step_time = self.prior_step_time = self.prior_warm_cost = None

    def is_check(self, step: int) -> bool:
        """Whether ``step`` is a step at which a decision is taken (identical on all ranks)."""
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if self.schedule is not None:
            return bool(self.schedule(step))
        return step >= self.next_check

    def _time_steps(self, step: int, busy: float) -> None:
        """Update the step-time estimate at a check (see the module docstring)."""
        assert self.start_time is not None
        steps = step - self.start_step
        train = max(self.clock() - self.start_time - busy, 0.0)
        if steps > 0:
            estimate = train / steps
            if self._mark is not None and step > self._mark[0]:
                latest = max(train - self._mark[1], 0.0) / (step - self._mark[0])
                estimate = min(estimate, latest)
            self.step_time = max(estimate, 1e-9)
            self.train_time, self.steps_timed = train, steps
        self._mark = (step, train)

    def _tau(self) -> float | None:
        """The step time to plan with (``None``: none known yet): the measured one once enough
        steps were timed (:meth:`first_check`), the prior before."""
        if self.step_time is not None and self.steps_timed >= self.first_check() - self.start_step:
            return self.step_time
        return self.prior_step_time

    def decide(self, step: int, busy: float | None = None) -> tuple[bool, int]:
        """At a check step: ``(measure now, next check step)``. Only rank 0's answer counts.

        Args:
            step: the current optimizer step.
            busy: wall time spent measuring since :meth:`start` by *all* measurement
                callbacks (to estimate the time of one training step); default: this one's.
        """
        if not self.budgeted:
            return True, step + 1
        assert self.max_overhead is not None
        if self.start_time is None:
            self.start(step)
        busy = self.spent if busy is None else max(busy, self.spent)
        self._time_steps(step, busy)
        if self.planned:
            return self._decide_planned(step)
        f = self.max_overhead
        now = self.clock()
        elapsed = now - (self.start_time or 0.0)
        cost = self.warm_cost()
        # measure now iff the share stays <= f once this measurement (≈ its cost) is done ...
        wait = (self.spent + cost) / f - cost - elapsed
        # ... and the last one is at least cost·(1−f)/f in the past: credit left over from an
        # expensive first measurement must not be spent in a burst of back-to-back measurements
        if self.last_end is not None:
            wait = max(wait, cost * (1.0 - f) / f - (now - self.last_end))
        if wait <= 0.0 or cost == 0.0:
            return True, step + 1
        step_time = self.step_time if self.step_time is not None else 1e-9
        return False, step + max(1, math.ceil(wait / step_time))

    def plan(self) -> list[int]:
        """The steps of the current plan (the whole run's, from step 0)."""
        assert self.total_steps is not None
        points = self.planned_points if self.planned_points is not None else 1
        return planned_steps(points - 1, self.total_steps)

    def budget(self) -> float:
        """Seconds of measurement the whole run may take (planned mode, step time known): ``f``
        of the run once they are added, the steps timed so far as they were, the rest at the
        estimated step time, less what the callback costs per step anyway."""
        assert self.max_overhead is not None and self.total_steps is not None
        tau = self._tau()
        assert tau is not None
        f = self.max_overhead
        train = self.train_time + max(self.total_steps - self.steps_timed, 0) * tau
        return f / (1.0 - f) * train - self.per_step_cost * self.total_steps

    def _left(self, warm: float | None = None) -> int:
        """Further measurements the rest of the budget pays for (planned mode), each at
        ``warm`` seconds (default: :meth:`warm_cost`)."""
        assert self.total_steps is not None
        warm = self.warm_cost() if warm is None else warm
        left = self.budget() - self.run_spent
        return max(math.floor(left / warm), 0) if warm > 0 else self.total_steps

    def _hopeful_warm(self) -> float:
        """A low estimate of a warm point's cost, before one was timed: the calibration's
        (``prior_warm_cost``) or the cold one over ``2·COLD_FACTOR``, whichever is lower."""
        guess = self.first_cost / (2.0 * COLD_FACTOR)
        return min(guess, self.prior_warm_cost) if self.prior_warm_cost else guess

    def _next_point(self) -> int | None:
        """The step of the next point of the current plan (``None``: the budget pays for no
        more), re-planned from the latest estimates (see the module docstring)."""
        assert self.total_steps is not None
        left = self._left()
        self.planned_points = self.points + left
        if left < 1:
            return None
        after = self.last_point
        if self.points == 1 and not self.warm_costs:
            # the second point teaches the warm cost: it is affordable at the (high) estimate,
            # and placed by a plan made with a low one, so it comes early when it may be cheap
            hopeful = self.points + self._left(self._hopeful_warm())
            return max(planned_steps(hopeful - 1, self.total_steps)[1], after + 1)
        later = [s for s in self.plan() if s > after]
        if len(later) >= left:
            return later[len(later) - left]  # the p-th point at the p-th step of the plan
        return min([after + max(1, (self.total_steps - after) // left), *later[:1]])

    def _recheck(self, step: int) -> int:
        """The next check when nothing more fits now (the estimates may change): when the step
        time is trusted (the prior is a low estimate), else every ``T/(2·min_points)`` steps."""
        assert self.total_steps is not None
        if self.steps_timed < self.first_check() - self.start_step:
            return max(step + 1, self.first_check())
        gap = max(1, self.total_steps // (2 * self.min_points))
        return min(step + gap, self.total_steps) if step < self.total_steps else step + 1

    def _decide_planned(self, step: int) -> tuple[bool, int]:
        if self.points == 0:
            return True, step + 1
        if self._tau() is None:  # the step time is not known yet: no point before it is
            return False, max(step + 1, self.first_check())
        target = self._next_point()
        if target is None:
            return False, self._recheck(step)
        return (True, step + 1) if step >= target else (False, target)

    def replan(self, step: int) -> int:
        """After a measurement at ``step``: the next check, from the updated costs.

        Only rank 0's answer counts (the caller broadcasts it). Before the step time is known
        the next check is :meth:`first_check`.
        """
        assert self.total_steps is not None
        self.last_point = step
        if self._tau() is None:  # first a check after the (slow) first step, to time from it
            return step + 1 if step == self.start_step else max(step + 1, self.first_check())
        target = self._next_point()
        return self._recheck(step) if target is None else max(target, step + 1)

    def expected_points(self) -> int | None:
        """Points the current plan gives the whole run (``None`` before a plan exists)."""
        if not self.planned or self._tau() is None or self.points == 0:
            return None
        return self.points + self._left()

    def first_check(self) -> int:
        """The first check whose step time can be trusted: after :data:`WARMUP_STEPS` timed
        steps, or at the end of the early part of a run shorter than that allows."""
        if not self.planned:
            return self.start_step + 1
        assert self.total_steps is not None
        early = max(1, round(EARLY_FRACTION * (self.total_steps - self.start_step)))
        return self.start_step + min(WARMUP_STEPS, early)

    def record(self, seconds: float) -> None:
        """A measurement took ``seconds`` (called on every rank after measuring)."""
        self.spent += seconds
        self.run_spent += seconds
        self.last_cost = seconds
        self.last_end = self.clock()
        if self.points == 0:
            self.first_cost = seconds
        else:
            self.warm_costs = [*self.warm_costs[-4:], seconds]
        self.points += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "spent": self.spent,
            "last_cost": self.last_cost,
            "next_check": self.next_check,
            "points": self.points,
            "last_point": self.last_point,
            "run_spent": self.run_spent,
            "first_cost": self.first_cost,
            "warm_costs": list(self.warm_costs),
            "planned_points": self.planned_points,
            "step_time": self.step_time,
            "per_step_cost": self.per_step_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_cost = float(state.get("last_cost", 0.0))
        self.next_check = int(state.get("next_check", 0))
        self.points = int(state.get("points", 0))
        self.last_point = int(state.get("last_point", -1))
        self.run_spent = float(state.get("run_spent", 0.0))
        self.first_cost = float(state.get("first_cost", 0.0))
        self.warm_costs = [float(c) for c in state.get("warm_costs", [])]
        planned = state.get("planned_points")
        self.planned_points = None if planned is None else int(planned)
        tau = state.get("step_time")  # a resumed run plans with it until it has timed its own
        self.prior_step_time = None if tau is None else float(tau)
        self.per_step_cost = float(state.get("per_step_cost", 0.0))
